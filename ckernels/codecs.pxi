# Cython binding: codecs (see ckernels/src)
