# Cython binding: kernels (see ckernels/src/kernels.h). Thin: it checks dtypes,
# contiguity and shapes, then calls C. The forward pass calls the C API directly; this
# binding serves tests, benchmarks and `kiln info`.
from libc.stdint cimport int64_t, uint8_t, uint64_t
from collections import namedtuple
import numpy as np

cdef extern from "kernels.h":
    enum: KILN_MAX_THREADS
    ctypedef struct kiln_pool:
        pass
    ctypedef struct kiln_matrix:
        int type
        int64_t rows, cols
        const void *data
        void *packed
        size_t packed_size
    kiln_pool *kiln_pool_create(int n_threads)
    void kiln_pool_free(kiln_pool *pool)
    int kiln_pool_size(const kiln_pool *pool)
    int kiln_matrix_init(kiln_matrix *m, int type, int64_t rows, int64_t cols, const void *data)
    void kiln_matrix_free(kiln_matrix *m)
    void kiln_matmul(kiln_pool *pool, const kiln_matrix *w, const float *x, int n_tokens,
                     float *y) nogil
    void kiln_matmul_multi(kiln_pool *pool, int n, const kiln_matrix *const *ws, const float *x,
                           int n_tokens, float *const *ys) nogil
    const char *kiln_active_isa()
    int kiln_known_isas(const char **names, int max_names)
    int kiln_supported_isas(const char **names, int max_names)
    int kiln_set_isa(const char *name)

cdef extern from "kernels_impl.h":
    ctypedef struct kiln_isa_ops:
        void (*quantize_row_q8_0)(const float *x, void *y, int64_t n)
        void (*quantize_row_q8_1)(const float *x, void *y, int64_t n)
        void (*quantize_row_q8_K)(const float *x, void *y, int64_t n)
    const kiln_isa_ops *kiln_ops()
    uint64_t kiln_stream_read(kiln_pool *pool, const void *p, size_t n) nogil

cdef extern from "type_traits.h":
    ctypedef struct kiln_type_traits:
        const char *name
        int type, block_size, type_size, is_weight, act_type, packed_block_bytes
    const kiln_type_traits *kiln_type_traits_of(int type)
    const kiln_type_traits *kiln_type_traits_at(int i)

MAX_THREADS = KILN_MAX_THREADS

BlockType = namedtuple("BlockType", "name ggml_id block_size type_size act_type repacked weight")
BlockType.__doc__ = """A block type of the C type table (ckernels/src/type_traits.c).
name: ggml's name ("Q4_1"); ggml_id: its ggml type id; block_size, type_size: elements
and bytes per block; act_type: name of the type the activations are quantized to when
it is a weight (None: they stay float); repacked: kiln_matrix_init keeps a packed copy;
weight: a weight type of ckernels.Matrix (False: a codec only, e.g. Q8_1)."""


cdef object _block_type(const kiln_type_traits *t):
    cdef const kiln_type_traits *act = kiln_type_traits_of(t.act_type)
    # None for float weights (act_type F32: the activations stay float) and non-weights
    act_name = act.name.decode() if act != NULL and act.block_size > 1 else None
    return BlockType(t.name.decode(), t.type, t.block_size, t.type_size, act_name,
                     t.packed_block_bytes > 0, bool(t.is_weight))


def block_types():
    """Every block type the C code knows (weights and activation formats), in ggml id
    order, as BlockType tuples."""
    out = []
    cdef int i = 0
    cdef const kiln_type_traits *t = kiln_type_traits_at(0)
    while t != NULL:
        out.append(_block_type(t))
        i += 1
        t = kiln_type_traits_at(i)
    return tuple(out)


def weight_types():
    """The block types ckernels.Matrix (kiln_matmul) takes."""
    return tuple(b for b in block_types() if b.weight)


def _check_n_threads(int n_threads):
    if n_threads < 1 or n_threads > KILN_MAX_THREADS:
        raise ValueError(f"n_threads must be between 1 and {KILN_MAX_THREADS} "
                         f"(the thread pool's limit, KILN_MAX_THREADS), got {n_threads}")


def active_isa():
    """Name of the ISA variant the kernels use (scalar, avx2, avxvnni, avx512vnni, neon)."""
    return kiln_active_isa().decode()


def known_isas():
    """Every ISA variant kiln knows, on any architecture (ckernels/src/isa_variants.h)."""
    cdef const char *names[16]
    cdef int n = kiln_known_isas(names, 16)
    return [names[i].decode() for i in range(min(n, 16))]


def supported_isas():
    """Variants this CPU and build support, best last."""
    cdef const char *names[16]
    cdef int n = kiln_supported_isas(names, 16)
    return [names[i].decode() for i in range(min(n, 16))]


def set_isa(name):
    """Force a variant for the rest of the process (tests); ValueError if unsupported."""
    if kiln_set_isa(name.encode()) != 0:
        raise ValueError(f"ISA variant {name!r} is not supported here; supported: {supported_isas()}")


cdef class Pool:
    """A persistent pool of n_threads worker threads (the caller is worker 0)."""
    cdef kiln_pool *pool

    def __cinit__(self, int n_threads=1):
        _check_n_threads(n_threads)
        self.pool = kiln_pool_create(n_threads)
        if self.pool == NULL:
            raise MemoryError("could not start the thread pool")

    def __dealloc__(self):
        if self.pool != NULL:
            kiln_pool_free(self.pool)

    @property
    def n_threads(self):
        return kiln_pool_size(self.pool)


cdef class Matrix:
    """A weight matrix (rows, cols) of ggml type `type`, from its GGUF bytes/values.
    Keeps a reference to `data` (the kernels may also keep a repacked copy)."""
    cdef kiln_matrix m
    cdef object data
    cdef bint ready

    def __cinit__(self, int type, int64_t rows, int64_t cols, data):
        self.ready = False
        cdef const kiln_type_traits *t = kiln_type_traits_of(type)
        if t == NULL or not t.is_weight:
            what = f"{t.name.decode()} (ggml type {type})" if t != NULL else f"ggml type {type}"
            raise ValueError(f"unsupported weight type {what}: the kernels take "
                             f"{', '.join(b.name for b in weight_types())}")
        per_block, block_bytes = t.block_size, t.type_size
        if rows < 1 or cols < 1 or cols % per_block:
            raise ValueError(f"bad shape ({rows}, {cols}) for type {type}")
        arr = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        if arr.nbytes != rows * (cols // per_block) * block_bytes:
            raise ValueError(f"data has {arr.nbytes} bytes, expected "
                             f"{rows * (cols // per_block) * block_bytes}")
        self.data = arr
        cdef const uint8_t[::1] view = arr
        if kiln_matrix_init(&self.m, type, rows, cols, &view[0]) != 0:
            raise MemoryError("kiln_matrix_init failed")
        self.ready = True

    def __dealloc__(self):
        if self.ready:
            kiln_matrix_free(&self.m)

    @property
    def shape(self):
        return (self.m.rows, self.m.cols)

    @property
    def packed_size(self):
        return self.m.packed_size


def matmul(Pool pool, Matrix w, x):
    """y = x @ W.T for x (n_tokens, cols) or (cols,) float32 -> float32 (n_tokens, rows)
    or (rows,)."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise ValueError("x must be a float32 numpy array")
    if not x.flags.c_contiguous:
        raise ValueError("x must be C-contiguous")
    if x.ndim not in (1, 2) or x.shape[x.ndim - 1] != w.m.cols:
        raise ValueError(f"x has shape {x.shape}, expected (n_tokens, {w.m.cols})")
    cdef int n_tokens = 1 if x.ndim == 1 else x.shape[0]
    rows = int(w.m.rows)
    out_shape = (rows,) if x.ndim == 1 else (n_tokens, rows)
    y = np.empty(out_shape, dtype=np.float32)
    if n_tokens == 0:
        return y
    cdef const float[::1] xv = x.reshape(-1)
    cdef float[::1] yv = y.reshape(-1)
    with nogil:
        kiln_matmul(pool.pool, &w.m, &xv[0], n_tokens, &yv[0])
    return y


def matmul_multi(Pool pool, list ws, x):
    """[x @ W.T for W in ws] for matrices with the same cols, in one pass of the pool."""
    cdef int n = len(ws)
    if n < 1 or n > 64:
        raise ValueError("matmul_multi takes 1 to 64 matrices")
    for w in ws:
        if not isinstance(w, Matrix):
            raise ValueError("ws must hold Matrix objects")
    cdef Matrix w0 = ws[0]
    cdef int64_t cols = w0.m.cols
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise ValueError("x must be a float32 numpy array")
    if not x.flags.c_contiguous:
        raise ValueError("x must be C-contiguous")
    if x.ndim not in (1, 2) or x.shape[x.ndim - 1] != cols:
        raise ValueError(f"x has shape {x.shape}, expected (n_tokens, {cols})")
    cdef Matrix wi
    for w in ws:
        wi = w
        if wi.m.cols != cols:
            raise ValueError("all matrices must have the same number of columns")
    cdef int n_tokens = 1 if x.ndim == 1 else x.shape[0]
    ys = [np.empty((int((<Matrix>w).m.rows),) if x.ndim == 1 else (n_tokens, int((<Matrix>w).m.rows)),
                   dtype=np.float32) for w in ws]
    if n_tokens == 0:
        return ys
    cdef const kiln_matrix *mp[64]
    cdef float *yp[64]
    cdef float[::1] yv
    for i in range(n):
        wi = ws[i]
        mp[i] = &wi.m
        yv = ys[i].reshape(-1)
        yp[i] = &yv[0]
    cdef const float[::1] xv = x.reshape(-1)
    with nogil:
        kiln_matmul_multi(pool.pool, n, mp, &xv[0], n_tokens, yp)
    return ys


def _quantize_act(x, int block_size, int block_bytes, str kind):
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 1:
        raise ValueError("x must be a 1-D float32 numpy array")
    if x.shape[0] % block_size:
        raise ValueError(f"length {x.shape[0]} is not a multiple of {block_size}")
    x = np.ascontiguousarray(x)
    out = np.zeros(x.shape[0] // block_size * block_bytes, dtype=np.uint8)
    if x.shape[0] == 0:
        return out
    cdef const float[::1] xv = x
    cdef uint8_t[::1] ov = out
    if kind == "q8_1":
        kiln_ops().quantize_row_q8_1(&xv[0], <void *>&ov[0], x.shape[0])
    elif kind == "q8_K":
        kiln_ops().quantize_row_q8_K(&xv[0], <void *>&ov[0], x.shape[0])
    else:
        kiln_ops().quantize_row_q8_0(&xv[0], <void *>&ov[0], x.shape[0])
    return out


def quantize_act_q8_0(x):
    """Q8_0 blocks of a float32 row, by the active variant's activation quantizer."""
    return _quantize_act(x, 32, 34, "q8_0")


def quantize_act_q8_1(x):
    """Q8_1 blocks of a float32 row, by the active variant's activation quantizer."""
    return _quantize_act(x, 32, 36, "q8_1")


def quantize_act_q8_K(x):
    """Q8_K blocks of a float32 row (a multiple of 256 long), by the active variant's
    activation quantizer."""
    return _quantize_act(x, 256, 292, "q8_K")


def stream_read(Pool pool, buf):
    """Reads every byte of a Matrix's kernel-side weights (its packed copy, else its
    data) or of a C-contiguous uint8 array, with the active variant's widest loads split
    over the pool's threads: the bandwidth yardstick for the kernels. Returns a checksum."""
    cdef Matrix m
    cdef const uint8_t[::1] v
    cdef const void *p
    cdef size_t n
    cdef uint64_t s
    if isinstance(buf, Matrix):
        m = buf
        if m.m.packed != NULL:
            p = m.m.packed
            n = m.m.packed_size
        else:
            p = m.m.data
            n = m.data.nbytes
    elif isinstance(buf, np.ndarray) and buf.dtype == np.uint8 and buf.flags.c_contiguous:
        if buf.size == 0:
            return 0
        v = buf.reshape(-1)
        p = &v[0]
        n = v.shape[0]
    else:
        raise ValueError("buf must be a Matrix or a C-contiguous uint8 numpy array")
    with nogil:
        s = kiln_stream_read(pool.pool, p, n)
    return s
