# Cython binding: kernels (see ckernels/src)
