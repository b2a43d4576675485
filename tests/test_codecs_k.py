"""Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and Q8_K codecs: kiln's NumPy quantizers equal ggml's
(ggml_quantize_chunk without an importance matrix, what llama.cpp's quantizer runs, and
quantize_row_q8_K_ref), its dequantizers equal ggml's dequantize_row_* and gguf-py's, and
the scalar C codecs equal the NumPy ones, bit for bit."""
import ctypes

import numpy as np
import pytest

import formats
from ckernels import _ext
from formats import GGMLType as T
from formats import kquants
from oracles import ggml_base_library
from test_codecs import ROWS

TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_K]
WEIGHT_TYPES = TYPES[:-1]  # gguf-py decodes these; Q8_K is ggml's activation format only
N = 512  # elements per test row: two super-blocks


def _extra_rows():
    rng = np.random.default_rng(2024)
    sub = np.arange(N) // 16
    spikes = np.zeros(N)
    spikes[[3, 77, 200, 300, 511]] = [40.0, -65.0, 90.0, -30.0, 55.0]
    rows = {
        # fp16-subnormal super-scales (|d| < 2^-14), down to fp16's smallest
        "fp16_subnormal_scales": rng.standard_normal(N) * 1e-4,
        "fp16_tiny_scales": rng.standard_normal(N) * 1e-6,
        "float32_subnormal": rng.standard_normal(N) * 1e-39,
        # super-scales near and beyond fp16's largest finite value
        "large": rng.standard_normal(N) * 3e4,
        "fp16_overflow": rng.standard_normal(N) * 1e8,
        # a few outliers: one sub-block's scale dwarfs the others
        "outliers": rng.standard_normal(N) + spikes,
        # sub-blocks of very different sizes: the 4/6-bit sub-scales round and clamp
        "sub_block_magnitudes": rng.standard_normal(N) * 2.0 ** (sub % 16 - 8),
        # every other sub-block zero: those keep the search's quants (their d is 0)
        "zero_sub_blocks": rng.standard_normal(N) * (sub % 2),
        "one_sub_block": rng.standard_normal(N) * (sub == 5),
        # no negative values (the affine types' min clamps to 0) and none positive
        "positive": rng.uniform(0.5, 1.0, N),
        "negative": -rng.uniform(0.5, 1.0, N),
        # quantized values exactly between two levels: nearest_int rounds to even
        "halves": np.tile(np.r_[-127.0, np.arange(15) + 0.5], N // 16),
        "integers": rng.integers(-8, 8, N).astype(np.float64),
        "negative_zeros": np.full(N, -0.0),
    }
    return {k: np.asarray(v, dtype=np.float32) for k, v in rows.items()}


# every row of the shared adversarial set (256 wide) twice over, and the rows above
ROWS_K = {**{k: np.tile(v[0], 2) for k, v in ROWS.items()}, **_extra_rows()}
MATRIX = np.stack(list(ROWS_K.values()))  # every row at once: (rows, N)


@pytest.fixture(scope="module")
def ggml():
    lib = ggml_base_library()
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    names = ["quantize_row_q8_K_ref"] + [f"dequantize_row_{t.name[:2].lower()}_K" for t in TYPES]
    for name in names:
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        getattr(lib, name).restype = None
    return lib


def _ggml_quantize(lib, x: np.ndarray, qtype) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1])
    rows, n = x.shape
    # zeroed: ggml's Q8_K leaves an all-zero block's bsums unwritten, kiln writes zeros
    out = np.zeros((rows, formats.row_nbytes(qtype, n)), np.uint8)
    if qtype == T.Q8_K:  # an activation format: ggml_quantize_chunk does not take it
        lib.quantize_row_q8_K_ref(x.ctypes.data, out.ctypes.data, x.size)
    else:
        assert lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, n, None) == out.size
    return out


def _ggml_dequantize(lib, q: np.ndarray, qtype, n: int) -> np.ndarray:
    q = np.ascontiguousarray(q)
    out = np.empty(n, np.float32)
    getattr(lib, f"dequantize_row_{qtype.name[:2].lower()}_K")(q.ctypes.data, out.ctypes.data, n)
    return out


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32).reshape(-1)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_numpy_quantize_matches_ggml_row_by_row(ggml, qtype):
    for name, row in ROWS_K.items():
        want = _ggml_quantize(ggml, row[None], qtype)[0]
        assert np.array_equal(formats.quantize(row, qtype), want), name


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_numpy_quantize_matches_ggml_on_matrices(ggml, qtype):
    rng = np.random.default_rng(17)
    mats = [MATRIX,
            (rng.standard_normal((48, 1024)) * 0.02).astype(np.float32),
            # rows of very different magnitudes in one call
            (rng.standard_normal((16, 768)) * np.logspace(-6, 4, 16)[:, None]).astype(np.float32)]
    for x in mats:
        mine = formats.quantize(x, qtype)
        assert mine.shape == (x.shape[0], formats.row_nbytes(qtype, x.shape[1]))
        assert np.array_equal(mine, _ggml_quantize(ggml, x, qtype))


# where each type keeps its super-scales: fp16 fields (Q8_K: one float32 at 0)
SCALE_FIELDS = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def _random_blocks(qtype, count: int, seed: int) -> np.ndarray:
    """Random bytes with random finite scales (a NaN scale has no defined payload)."""
    rng = np.random.default_rng(seed)
    size = formats.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, (count, size), dtype=np.uint8)
    if qtype == T.Q8_K:
        blocks[:, 0:4] = (rng.standard_normal(count) * 10).astype(np.float32).view(np.uint8).reshape(count, 4)
        return blocks
    for at in SCALE_FIELDS[qtype]:
        scales = (rng.standard_normal(count) * 10).astype(np.float16)
        scales[::7] = np.float16(65504.0)
        scales[1::7] = np.float16(6e-8)  # the smallest fp16 subnormal
        blocks[:, at : at + 2] = scales.view(np.uint8).reshape(count, 2)
    return blocks


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_numpy_dequantize_matches_ggml_and_gguf_py(ggml, qtype):
    size = formats.GGML_QUANT_SIZES[qtype][1]
    for q in (_ggml_quantize(ggml, MATRIX, qtype), _random_blocks(qtype, 256, 5)):
        n = q.size // size * 256
        mine = formats.dequantize(q, qtype, (n,))
        assert np.array_equal(_bits(mine), _bits(_ggml_dequantize(ggml, q, qtype, n)))


@pytest.mark.parametrize("qtype", WEIGHT_TYPES, ids=lambda t: t.name)
def test_numpy_dequantize_matches_gguf_py(qtype):
    quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType as GT
    size = formats.GGML_QUANT_SIZES[qtype][1]
    for q in (formats.quantize(MATRIX, qtype), _random_blocks(qtype, 256, 6)):
        with np.errstate(all="ignore"):
            ref = quants.dequantize(q.reshape(-1, size), GT[qtype.name])
        mine = formats.dequantize(q, qtype, (q.size // size * 256,))
        assert np.array_equal(_bits(mine), _bits(ref))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_c_matches_numpy(qtype):
    rows = list(ROWS_K.values()) + [
        (np.random.default_rng(3).standard_normal(8192) * 0.1).astype(np.float32)]
    for row in rows:
        c = _ext.quantize_row(int(qtype), row)
        assert np.array_equal(c, formats.quantize(row, qtype))
        assert np.array_equal(_bits(_ext.dequantize_row(int(qtype), c, row.size)),
                              _bits(formats.dequantize(c, qtype, row.shape)))
    raw = _random_blocks(qtype, 512, 8).reshape(-1)
    n = 512 * 256
    assert np.array_equal(_bits(_ext.dequantize_row(int(qtype), raw, n)),
                          _bits(formats.dequantize(raw, qtype, (n,))))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_row_length_not_a_multiple_of_256_is_refused(qtype):
    size = formats.GGML_QUANT_SIZES[qtype][1]
    for bad in (32, 288, 300):
        with pytest.raises(ValueError, match=rf"row length {bad} is not a multiple of {qtype.name}'s block size 256"):
            formats.quantize(np.zeros((2, bad), np.float32), qtype)
        with pytest.raises(ValueError, match=rf"row length {bad} is not a multiple"):
            formats.dequantize(np.zeros(2 * size, np.uint8), qtype, (2, bad))
        with pytest.raises(ValueError):
            _ext.quantize_row(int(qtype), np.zeros(bad, np.float32))
        with pytest.raises(ValueError):
            _ext.dequantize_row(int(qtype), np.zeros(size, np.uint8), bad)


def test_q8_k_layout_and_semantics():
    x = ROWS_K["outliers"].reshape(2, 256)
    b = formats.quantize(x, T.Q8_K).reshape(2, 292)
    d = b[:, 0:4].copy().view(np.float32)[:, 0]
    q = b[:, 4:260].view(np.int8)
    bsums = b[:, 260:].copy().view(np.int16)
    assert np.array_equal(bsums, q.reshape(2, 16, 16).sum(axis=2))
    first_max = np.argmax(np.abs(x) == np.abs(x).max(axis=1, keepdims=True), axis=1)
    assert np.all(q[[0, 1], first_max] == -127)  # the largest magnitude maps to -127
    assert np.all(np.abs(q.astype(np.float32) * d[:, None] - x) <= np.abs(d)[:, None] * 0.5001)
    assert not formats.quantize(np.zeros(256, np.float32), T.Q8_K).any()


def test_nearest_int_rounds_halves_to_even():
    # max -127 gives Q8_K iscale 1: 0.5, 1.5, 2.5, 3.5 -> 0, 2, 2, 4 (roundf would give 1, 2, 3, 4)
    x = np.zeros(256, np.float32)
    x[:5] = [-127.0, 0.5, 1.5, 2.5, 3.5]
    q = formats.quantize(x, T.Q8_K)[4:9].view(np.int8)
    assert list(q) == [-127, 0, 2, 2, 4]
    assert np.array_equal(_ext.quantize_row(int(T.Q8_K), x), formats.quantize(x, T.Q8_K))


def test_scale_packings_round_trip():
    rng = np.random.default_rng(4)
    ls, lm = rng.integers(0, 64, (2, 100, 8), dtype=np.uint8)
    packed = kquants.pack_scale_min_k4(ls, lm)
    assert packed.shape == (100, 12)
    got = kquants.unpack_scale_min_k4(packed)
    assert np.array_equal(got[0], ls) and np.array_equal(got[1], lm)
    s = rng.integers(0, 64, (100, 16), dtype=np.uint8)
    assert np.array_equal(kquants.unpack_scales_q3(kquants.pack_scales_q3(s)), s)


@pytest.mark.parametrize("qtype, tol", [(T.Q2_K, 0.35), (T.Q3_K, 0.2), (T.Q4_K, 0.1),
                                         (T.Q5_K, 0.05), (T.Q6_K, 0.025), (T.Q8_K, 0.01)],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_round_trip_error_shrinks_with_bits(qtype, tol):
    x = np.random.default_rng(9).standard_normal((16, 1024)).astype(np.float32)
    back = formats.dequantize(formats.quantize(x, qtype), qtype, x.shape)
    assert np.sqrt(np.mean((back - x) ** 2)) < tol
