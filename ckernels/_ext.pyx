# cython: language_level=3
"""The one C extension of kiln. Each concern's binding lives in its own .pxi file."""
include "codecs.pxi"
include "kernels.pxi"
include "model.pxi"
