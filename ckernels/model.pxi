# Cython binding: model (see ckernels/src)
