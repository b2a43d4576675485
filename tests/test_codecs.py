"""Block codecs: kiln's NumPy reference equals gguf-py's `gguf.quants` (itself checked
against ggml's C) bit for bit, and the scalar C codecs in the extension equal the NumPy
reference bit for bit, on random and adversarial rows."""
import numpy as np
import pytest

import ckernels
import formats
from ckernels import _ext
from formats import GGMLType as T
from oracles import ggml_base_library

N = 256  # elements per adversarial row (8 blocks)
# the types with a C codec (the C type table), and those of them made of blocks
CODEC_TYPES = [T(b.ggml_id) for b in ckernels.block_types()]
C_BLOCK_TYPES = [T(b.ggml_id) for b in ckernels.block_types() if b.block_size > 1]
# the block-quantized weight types
BLOCK_TYPES = [T(b.ggml_id) for b in ckernels.weight_types() if b.block_size > 1]
# those gguf-py can quantize: the 32-wide legacy types (it raises NotImplementedError for
# IQ4_NL and the super-block types, whose oracle is ggml: test_codecs_k.py,
# test_codecs_5bit_iq.py)
GGUF_PY_BLOCK_TYPES = [t for t in BLOCK_TYPES
                       if formats.GGML_QUANT_SIZES[t][0] == 32 and t != T.IQ4_NL]


def _adversarial_rows():
    rng = np.random.default_rng(1234)
    rows = {
        "normal": rng.standard_normal(N),
        "uniform_pos": rng.uniform(0, 1, N),
        "uniform_neg": rng.uniform(-3, 0, N),
        "constant": np.full(N, 0.7),
        "constant_neg": np.full(N, -123.25),
        "zeros": np.zeros(N),
        "tiny": rng.standard_normal(N) * 1e-30,
        "tinier": rng.standard_normal(N) * 1e-36,
        "huge": rng.uniform(-65504, 65504, N),
        "fp16_limit": np.tile([65504.0, -65504.0, 65503.0, 1.0], N // 4),
        "beyond_fp16": rng.standard_normal(N) * 3e5,
        "huge_dynamic_range": rng.standard_normal(N) * np.tile([1e-20, 1e20], N // 2),
        "one_spike": np.where(np.arange(N) % 32 == 5, 9.0, 0.0),
        "sign_tie": np.tile(np.r_[-2.0, np.linspace(-1, 1, 30), 2.0], N // 32),
        "sign_tie_pos_first": np.tile(np.r_[2.0, np.linspace(-1, 1, 30), -2.0], N // 32),
        "halves": np.tile(np.r_[127.0, np.arange(31) - 15.5], N // 32),  # Q8 d = 1: exact .5 cases
        "q4_halves": np.tile(np.r_[-8.0, (np.arange(31) % 16) - 7.5], N // 32),
        "steps": np.repeat(np.arange(N // 8), 8) * 0.25 - 3,
        "alternating": np.where(np.arange(N) % 2, 1.0, -1.0) * np.arange(N),
        "mixed_zero_signs": np.tile(np.r_[-0.0, 0.0, np.linspace(0, 5, 30)], N // 32),
    }
    return {k: np.asarray(v, dtype=np.float32).reshape(1, N) for k, v in rows.items()}


ROWS = _adversarial_rows()


@pytest.fixture(scope="module")
def gq():
    gguf = pytest.importorskip("gguf")
    from gguf import quants
    return quants, gguf.GGMLQuantizationType


@pytest.mark.parametrize("qtype", GGUF_PY_BLOCK_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("row", list(ROWS), ids=str)
def test_numpy_matches_gguf_py(gq, qtype, row):
    quants, GT = gq
    x = ROWS[row]
    mine = formats.quantize(x, qtype)
    with np.errstate(all="ignore"):  # rows beyond fp16 give inf scales, in gguf-py too
        ref = quants.quantize(x, GT[qtype.name])
        ref_back = quants.dequantize(ref, GT[qtype.name])
    assert np.array_equal(mine, ref)
    back = formats.dequantize(mine, qtype, x.shape)
    assert np.array_equal(back.view(np.uint32), ref_back.view(np.uint32))


@pytest.mark.parametrize("qtype", GGUF_PY_BLOCK_TYPES + [T.F16, T.BF16], ids=lambda t: t.name)
def test_numpy_matches_gguf_py_random_matrix(gq, qtype):
    quants, GT = gq
    x = (np.random.default_rng(7).standard_normal((64, 1024)) * 0.05).astype(np.float32)
    mine = formats.quantize(x, qtype)
    ref = np.ascontiguousarray(quants.quantize(x, GT[qtype.name])).view(np.uint8)
    assert mine.shape == (64, formats.row_nbytes(qtype, 1024))
    assert np.array_equal(mine, ref.reshape(mine.shape))
    back = formats.dequantize(mine, qtype, x.shape)
    assert back.shape == x.shape and back.dtype == np.float32
    assert np.array_equal(back, quants.dequantize(ref.reshape(mine.shape), GT[qtype.name]).astype(np.float32))


def test_negative_zero_block_follows_ggml():
    # ggml's Q4_0 keeps max = +0 when no |v| > 0, so d = +0 / -8 = -0 (fp16 0x8000);
    # gguf-py takes the first element instead, which differs only here.
    x = np.full((1, 32), -0.0, np.float32)
    assert formats.quantize(x, T.Q4_0)[0, :2].view(np.uint16)[0] == 0x8000
    assert np.array_equal(_ext.quantize_row(int(T.Q4_0), x[0]), formats.quantize(x, T.Q4_0)[0])


def test_q8_1_layout_and_semantics():
    x = ROWS["normal"]
    b = formats.quantize(x, T.Q8_1).reshape(-1, 36)
    q80 = formats.quantize(x, T.Q8_0).reshape(-1, 34)
    assert np.array_equal(b[:, :2], q80[:, :2]) and np.array_equal(b[:, 4:], q80[:, 2:])
    d = b[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
    dd = np.abs(x.reshape(-1, 32)).max(axis=1) / np.float32(127)  # s uses the float32 d
    s = b[:, 2:4].copy().view(np.float16)[:, 0]
    qsum = b[:, 4:].view(np.int8).sum(axis=1).astype(np.float32)
    assert np.array_equal(s, (qsum * dd).astype(np.float16))
    assert np.allclose(formats.dequantize(b, T.Q8_1, x.shape), x, atol=float(d.max()) / 2 + 1e-6)


@pytest.mark.parametrize("qtype", CODEC_TYPES, ids=lambda t: t.name)
def test_c_matches_numpy(qtype):
    rows = list(ROWS.values()) + [np.full((1, N), -0.0, np.float32),
                                  (np.random.default_rng(3).standard_normal((1, 4096)) * 2).astype(np.float32)]
    for x in rows:
        row = x[0]
        c = _ext.quantize_row(int(qtype), row)
        assert np.array_equal(c, formats.quantize(row, qtype))
        dc = _ext.dequantize_row(int(qtype), c, row.size)
        assert np.array_equal(dc.view(np.uint32), formats.dequantize(c, qtype, row.shape).view(np.uint32))


@pytest.mark.parametrize("qtype", C_BLOCK_TYPES, ids=lambda t: t.name)
def test_c_dequantize_matches_numpy_on_random_blocks(qtype):
    rng = np.random.default_rng(11)
    block, size = formats.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (512, size), dtype=np.uint8)
    # random finite fp16 scales (a NaN scale has no defined payload to compare)
    scales = (rng.standard_normal((512, 2)) * 10).astype(np.float16).view(np.uint8).reshape(512, 4)
    blocks[:, :2] = scales[:, :2]
    if qtype in (T.Q4_1, T.Q5_1, T.Q8_1):  # a second fp16 (m or s) follows d
        blocks[:, 2:4] = scales[:, 2:]
    raw = blocks.reshape(-1)
    n = 512 * block
    c = _ext.dequantize_row(int(qtype), raw, n)
    assert np.array_equal(c.view(np.uint32), formats.dequantize(raw, qtype, (n,)).view(np.uint32))


@pytest.mark.parametrize("qtype", [T.F16, T.BF16], ids=lambda t: t.name)
def test_half_conversions_on_all_kinds_of_floats(qtype):
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2**32, 1 << 16, dtype=np.uint64).astype(np.uint32)
    special = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e-8, 6e-8, 3e-8,
                        5.96e-8, np.inf, -np.inf, 1e38, 3.4e38, 1.0000001, 2.0**-24, 2.0**-25,
                        1.5 * 2.0**-24], np.float32)
    x = np.concatenate([bits.view(np.float32), special])
    finite = ~np.isnan(x)
    x = x[finite]
    c = _ext.quantize_row(int(qtype), x)
    assert np.array_equal(c, formats.quantize(x, qtype))
    assert np.array_equal(_ext.dequantize_row(int(qtype), c, x.size).view(np.uint32),
                          formats.dequantize(c, qtype, x.shape).view(np.uint32))
    nan = np.array([np.nan, -np.nan], np.float32)
    back = formats.dequantize(formats.quantize(nan, qtype), qtype, nan.shape)
    assert np.isnan(back).all() and np.isnan(_ext.dequantize_row(int(qtype), _ext.quantize_row(int(qtype), nan), 2)).all()


def test_codec_round_trip_error_is_bounded():
    x = np.random.default_rng(9).standard_normal((16, 512)).astype(np.float32)
    for qtype, tol in [(T.Q4_0, 0.2), (T.Q4_1, 0.1), (T.Q8_0, 0.01), (T.F16, 1e-3), (T.BF16, 1e-2)]:
        back = formats.dequantize(formats.quantize(x, qtype), qtype, x.shape)
        rel = np.abs(back - x).max() / np.abs(x).max()
        assert rel < tol, qtype


def test_binding_rejects_bad_arguments():
    x = np.zeros(64, np.float32)
    with pytest.raises(ValueError):
        _ext.quantize_row(int(T.Q4_0), np.zeros(64, np.float64))
    with pytest.raises(ValueError):
        _ext.quantize_row(int(T.Q4_0), np.zeros((2, 32), np.float32))
    with pytest.raises(ValueError):
        _ext.quantize_row(int(T.Q4_0), np.zeros(128, np.float32)[::2])
    with pytest.raises(ValueError):
        _ext.quantize_row(int(T.Q4_0), np.zeros(33, np.float32))
    with pytest.raises(ValueError):
        _ext.quantize_row(int(T.IQ2_XXS), np.zeros(256, np.float32))  # no C codec
    with pytest.raises(ValueError):
        _ext.dequantize_row(int(T.Q8_0), np.zeros(33, np.uint8), 32)
    with pytest.raises(ValueError):
        _ext.dequantize_row(int(T.Q8_0), np.zeros(34, np.uint8), 0)
    assert _ext.codec_row_size(int(T.Q4_1), 64) == 40


def test_numpy_codec_argument_errors():
    with pytest.raises(ValueError, match="multiple"):
        formats.quantize(np.zeros(33, np.float32), T.Q8_0)
    with pytest.raises(ValueError, match="bytes"):
        formats.dequantize(np.zeros(35, np.uint8), T.Q8_0, (32,))
    with pytest.raises(NotImplementedError, match="IQ2_XXS"):
        formats.quantize(np.zeros(256, np.float32), T.IQ2_XXS)


@pytest.fixture(scope="module")
def ggml():
    """ggml's own reference codecs, from the libggml-base that llama-cpp-python ships."""
    import ctypes
    lib = ggml_base_library()
    for name in ("quantize_row_q4_0_ref", "quantize_row_q4_1_ref", "quantize_row_q8_0_ref",
                 "quantize_row_q8_1_ref", "dequantize_row_q4_0", "dequantize_row_q4_1",
                 "dequantize_row_q8_0", "ggml_fp32_to_fp16_row", "ggml_fp16_to_fp32_row",
                 "ggml_fp32_to_bf16_row_ref", "ggml_bf16_to_fp32_row"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        getattr(lib, name).restype = None
    return lib


GGML_QUANTIZERS = {T.Q4_0: "quantize_row_q4_0_ref", T.Q4_1: "quantize_row_q4_1_ref",
                   T.Q8_0: "quantize_row_q8_0_ref", T.Q8_1: "quantize_row_q8_1_ref",
                   T.F16: "ggml_fp32_to_fp16_row", T.BF16: "ggml_fp32_to_bf16_row_ref"}
GGML_DEQUANTIZERS = {T.Q4_0: "dequantize_row_q4_0", T.Q4_1: "dequantize_row_q4_1",
                     T.Q8_0: "dequantize_row_q8_0", T.F16: "ggml_fp16_to_fp32_row",
                     T.BF16: "ggml_bf16_to_fp32_row"}


@pytest.mark.parametrize("qtype", list(GGML_QUANTIZERS), ids=lambda t: t.name)
def test_numpy_matches_ggml_reference(ggml, qtype):
    rows = list(ROWS.values()) + [np.full((1, N), -0.0, np.float32),
                                  (np.random.default_rng(8).standard_normal((1, 8192)) * 0.1).astype(np.float32)]
    for x in rows:
        row = np.ascontiguousarray(x[0])
        want = np.empty(formats.row_nbytes(qtype, row.size), np.uint8)
        getattr(ggml, GGML_QUANTIZERS[qtype])(row.ctypes.data, want.ctypes.data, row.size)
        mine = formats.quantize(row, qtype)
        assert np.array_equal(mine, want)
        if qtype in GGML_DEQUANTIZERS:
            back = np.empty(row.size, np.float32)
            getattr(ggml, GGML_DEQUANTIZERS[qtype])(want.ctypes.data, back.ctypes.data, row.size)
            assert np.array_equal(formats.dequantize(mine, qtype, row.shape).view(np.uint32), back.view(np.uint32))


@pytest.mark.parametrize("qtype", formats.DECODABLE_TYPES, ids=lambda t: t.name)
def test_dequantize_float64_gives_the_exact_weights(qtype):
    """float64 decodes the same formula without float32 rounding: the result, rounded to
    float32, is within half an ulp of ggml's float32 result, and types whose float32
    formula is already exact (no add after the multiply) agree bit for bit."""
    x = (np.random.default_rng(21).standard_normal((4, 512)) * 3).astype(np.float32)
    q = formats.quantize(x, qtype) if qtype in formats.ENCODABLE_TYPES else None
    if q is None:
        pytest.skip(f"no encoder for {qtype.name}")
    f32 = formats.dequantize(q, qtype, x.shape)
    f64 = formats.dequantize(q, qtype, x.shape, dtype=np.float64)
    assert f64.dtype == np.float64 and f64.shape == x.shape
    if qtype in (T.F32, T.F16, T.BF16, T.Q4_0, T.Q5_0, T.Q8_0, T.Q8_1, T.IQ4_NL, T.IQ4_XS):
        assert np.array_equal(f64.astype(np.float32), f32)
    assert np.all(np.abs(f64 - f32) <= np.spacing(np.abs(f32)) / 2)


def test_dequantize_float64_q4_1_is_d_times_q_plus_m_unrounded():
    # d = 1 + 2^-10, m = 2^-24, q = 15: d*q + m spans 28 bits, float32 keeps 24
    block = np.zeros((1, 20), np.uint8)
    block[0, :2] = np.array([1 + 2.0**-10], np.float16).view(np.uint8)
    block[0, 2:4] = np.array([2.0**-24], np.float16).view(np.uint8)
    block[0, 4:] = 0xFF
    exact = 15 * (1 + 2.0**-10) + 2.0**-24
    assert np.all(formats.dequantize(block, T.Q4_1, (32,), dtype=np.float64) == exact)
    assert np.all(formats.dequantize(block, T.Q4_1, (32,)) == np.float32(15 * (1 + 2.0**-10)))


def test_dequantize_refuses_other_dtypes():
    with pytest.raises(ValueError, match="float32 or float64"):
        formats.dequantize(np.zeros(34, np.uint8), T.Q8_0, (32,), dtype=np.float16)
