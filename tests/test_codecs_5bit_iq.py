"""Q5_0, Q5_1, IQ4_NL and IQ4_XS codecs: kiln's NumPy quantizers equal ggml's
ggml_quantize_chunk without an importance matrix (what llama.cpp's quantizer runs), its
dequantizers equal ggml's dequantize_row_* and gguf-py's, and the scalar C codecs equal
the NumPy ones, bit for bit."""
import ctypes

import numpy as np
import pytest

import formats
from ckernels import _ext
from formats import GGMLType as T
from formats import iquants
from oracles import ggml_base_library
from test_codecs import ROWS

TYPES = [T.Q5_0, T.Q5_1, T.IQ4_NL, T.IQ4_XS]
N = 512  # elements per test row: two IQ4_XS super-blocks, 16 blocks of 32


def _extra_rows():
    rng = np.random.default_rng(99)
    g = iquants.KVALUES_IQ4NL.astype(np.float64)
    mid = (g[:-1] + g[1:]) / 2
    rows = {
        # fp16-subnormal scales (|d| < 2^-14) for every type
        "fp16_subnormal_scales": rng.standard_normal(N) * 1e-5,
        "fp16_smallest_scales": rng.standard_normal(N) * 3e-8,
        # scales just below and above fp16's largest finite value, per type
        "q5_0_scale_near_fp16_max": rng.uniform(-1, 1, N) * 16 * 65000.0,
        "q5_0_scale_over_fp16_max": rng.uniform(-1, 1, N) * 16 * 66000.0,
        "iq4_scale_near_fp16_max": rng.uniform(-1, 1, N) * 127 * 60000.0,
        "iq4_xs_scale_near_fp16_max": rng.uniform(-1, 1, N) * 32 * 127 * 60000.0,
        # exact halves after scaling: Q5_0 d = 1 (max -16), Q5_1 d = 1 (0 .. 31)
        "q5_0_halves": np.tile(np.r_[-16.0, np.arange(31) - 15.5], N // 32),
        "q5_1_halves": np.tile(np.r_[0.0, 31.0, np.arange(30) + 0.5], N // 32),
        # values on the grid and exactly between grid points (best_index ties)
        "iq4_grid": np.tile(np.r_[g, g[::-1] * 0.5], N // 32) * 0.25,
        "iq4_midpoints": np.tile(np.r_[-127.0, mid, 113.0, mid], N // 32) * 0.125,
        # IQ4_XS: sub-block 0 on the grid gets scale 1 (d = -1/32), the others l = -16
        # (scale 1/2), and their midpoints / 2 then fall exactly between grid points
        "iq4_xs_ties": np.tile(np.r_[g, g[::-1], np.tile(np.r_[g, g[::-1][:12], mid[[2, 6, 9, 12]]] / 2, 7)], 2),
        # sub-blocks of very different sizes: IQ4_XS's 6-bit sub-scales clamp and round
        "iq4_xs_sub_scales": rng.standard_normal(N) * np.repeat(2.0 ** np.arange(-8, 8), 32),
        "one_large_per_super_block": np.where(np.arange(N) % 256 == 3, 1e4, 1.0) * rng.standard_normal(N),
        "negative_max_first": np.tile(np.r_[-5.0, rng.uniform(-1, 1, 30), 5.0], N // 32),
    }
    return {k: np.asarray(v, dtype=np.float32) for k, v in rows.items()}


# every row of the shared adversarial set (256 wide) twice over, and the rows above
ROWS_5BIT_IQ = {**{k: np.tile(v[0], 2) for k, v in ROWS.items()}, **_extra_rows(),
                "negative_zeros": np.full(N, -0.0, np.float32)}
MATRIX = np.stack(list(ROWS_5BIT_IQ.values()))  # every row at once: (rows, N)


@pytest.fixture(scope="module")
def ggml():
    lib = ggml_base_library()
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    for t in TYPES:
        fn = getattr(lib, f"dequantize_row_{t.name.lower()}")
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
    return lib


def _ggml_quantize(lib, x: np.ndarray, qtype) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1])
    rows, n = x.shape
    out = np.zeros((rows, formats.row_nbytes(qtype, n)), np.uint8)
    size = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, n, None)
    assert size == out.size
    return out


def _ggml_dequantize(lib, q: np.ndarray, qtype, n: int) -> np.ndarray:
    q = np.ascontiguousarray(q)
    out = np.empty(n, np.float32)
    getattr(lib, f"dequantize_row_{qtype.name.lower()}")(q.ctypes.data, out.ctypes.data, n)
    return out


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_numpy_quantize_matches_ggml_row_by_row(ggml, qtype):
    for name, row in ROWS_5BIT_IQ.items():
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


@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q5_1], ids=lambda t: t.name)
def test_numpy_quantize_matches_gguf_py(qtype):
    quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType as GT
    # not the all -0 row: gguf-py takes its first element as max there, ggml keeps +0
    x = MATRIX[[k != "negative_zeros" for k in ROWS_5BIT_IQ]]
    with np.errstate(all="ignore"):  # scales beyond fp16 become inf, in gguf-py too
        want = quants.quantize(x, GT[qtype.name])
    assert np.array_equal(formats.quantize(x, qtype), want)


def _random_blocks(qtype, count: int, seed: int) -> np.ndarray:
    """Random bytes with random finite fp16 scales (a NaN scale has no defined payload)."""
    rng = np.random.default_rng(seed)
    size = formats.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, (count, size), dtype=np.uint8)
    halves = 2 if qtype == T.Q5_1 else 1  # Q5_1: d and m
    scales = (rng.standard_normal((count, halves)) * 10).astype(np.float16)
    scales[::7] = np.float16(65504.0)
    scales[1::7] = np.float16(6e-8)  # the smallest fp16 subnormal
    blocks[:, : 2 * halves] = scales.view(np.uint8).reshape(count, 2 * halves)
    return blocks


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_numpy_dequantize_matches_ggml_and_gguf_py(ggml, qtype):
    quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType as GT
    block = formats.GGML_QUANT_SIZES[qtype][0]
    for q in (_ggml_quantize(ggml, MATRIX, qtype), _random_blocks(qtype, 256, 5)):
        n = q.size // formats.GGML_QUANT_SIZES[qtype][1] * block
        mine = formats.dequantize(q, qtype, (n,))
        assert np.array_equal(_bits(mine), _bits(_ggml_dequantize(ggml, q, qtype, n)))
        with np.errstate(all="ignore"):
            ref = quants.dequantize(q.reshape(-1, formats.GGML_QUANT_SIZES[qtype][1]), GT[qtype.name])
        assert np.array_equal(_bits(mine), _bits(ref.reshape(-1)))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_c_matches_numpy(qtype):
    rows = list(ROWS_5BIT_IQ.values()) + [
        (np.random.default_rng(3).standard_normal(8192) * 0.1).astype(np.float32)]
    for row in rows:
        c = _ext.quantize_row(int(qtype), row)
        assert np.array_equal(c, formats.quantize(row, qtype))
        assert np.array_equal(_bits(_ext.dequantize_row(int(qtype), c, row.size)),
                              _bits(formats.dequantize(c, qtype, row.shape)))
    raw = _random_blocks(qtype, 512, 8).reshape(-1)
    n = 512 * formats.GGML_QUANT_SIZES[qtype][0]
    assert np.array_equal(_bits(_ext.dequantize_row(int(qtype), raw, n)),
                          _bits(formats.dequantize(raw, qtype, (n,))))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_row_length_not_a_multiple_of_the_block_is_refused(qtype):
    block, size = formats.GGML_QUANT_SIZES[qtype]
    bad = block + 16
    with pytest.raises(ValueError, match=rf"row length {bad} is not a multiple of {qtype.name}'s block size {block}"):
        formats.quantize(np.zeros((2, bad), np.float32), qtype)
    with pytest.raises(ValueError, match=rf"row length {bad} is not a multiple"):
        formats.dequantize(np.zeros(2 * size, np.uint8), qtype, (2, bad))
    with pytest.raises(ValueError):
        _ext.quantize_row(int(qtype), np.zeros(bad, np.float32))
    with pytest.raises(ValueError):
        _ext.dequantize_row(int(qtype), np.zeros(size, np.uint8), bad)


def test_grid_is_ggmls(ggml):
    # an IQ4_NL block with d = 1 and index j at element j (and j + 16) decodes to the grid
    block = np.zeros(18, np.uint8)
    block[:2] = np.array([1.0], np.float16).view(np.uint8)
    block[2:] = np.arange(16, dtype=np.uint8) * np.uint8(17)
    assert np.array_equal(_ggml_dequantize(ggml, block, T.IQ4_NL, 32)[:16], iquants.KVALUES_IQ4NL)


def test_best_index_takes_the_upper_point_on_ties_and_clamps():
    g = iquants.KVALUES_IQ4NL.astype(np.float32)
    mid = (g[:-1] + g[1:]) / 2
    assert np.array_equal(iquants.best_index(mid), np.arange(1, 16))
    assert np.array_equal(iquants.best_index(np.nextafter(mid, -np.inf)), np.arange(15))
    assert np.array_equal(iquants.best_index(g), np.arange(16))
    assert list(iquants.best_index(np.array([-1e30, -np.inf, 1e30, np.inf, np.nan], np.float32))) == [0, 0, 15, 15, 15]


def test_iq4_xs_sub_scales_round_half_to_even():
    # sub-block k holds grid points times 2^-k, so its scale is exactly 2^-k of the
    # first's: l = -32 * 2^-k, and -0.5 and -0.25 round to 0 (nearest_int: halves to
    # even), so the 6-bit fields (l + 32) are 0, 16, 24, 28, 30, 31, 32, 32
    g = iquants.KVALUES_IQ4NL.astype(np.float32)
    x = (np.tile(np.r_[g, g[::-1]], 8) * np.repeat(2.0 ** -np.arange(8), 32)).astype(np.float32)
    q = formats.quantize(x, T.IQ4_XS)
    h = int(q[2:4].view(np.uint16)[0])
    ls = [int((q[4 + ib // 2] >> (4 * (ib % 2))) & 15) | (((h >> (2 * ib)) & 3) << 4) for ib in range(8)]
    assert ls == [0, 16, 24, 28, 30, 31, 32, 32]
    assert np.array_equal(q, _ext.quantize_row(int(T.IQ4_XS), x))
