"""Kernels under every ISA variant this CPU supports, against the scalar variant and a
float64 NumPy oracle.

Weight blocks are built here from random integers and scales (so the oracle is
independent of the kernels); activations are quantized by the kernels and dequantized
in NumPy. Scales that are powers of two make every float operation exact, so for those
inputs each variant must match the oracle bit for bit: that checks the integer parts.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import ckernels
from cpu_isas import expected_isas
from formats.iquants import KVALUES_IQ4NL  # the grid, checked against ggml in test_codecs_5bit_iq.py

ISAS = expected_isas()  # from /proc/cpuinfo, not from the code under test
COLS = [32, 64, 96, 576, 1536, 4096, 11008]  # 1, 2, 3, 18, ... blocks: every tail of a block group
# ggml type ids by name, and the weight types the kernels take (the C type table):
# block types with quantized activations, and float types
TYPE = {b.name: b.ggml_id for b in ckernels.block_types()}
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, BF16 = (
    TYPE[n] for n in ("F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "BF16"))
QUANT_TYPES = {b.name.lower(): b.ggml_id for b in ckernels.weight_types()
               if b.act_type in ("Q8_0", "Q8_1")}
# the super-block types (isa/kgemm.c), with Q8_K activations
K_TYPES = {b.name.lower(): b.ggml_id for b in ckernels.weight_types() if b.act_type == "Q8_K"}
ACT_TYPE = {b.ggml_id: b.act_type for b in ckernels.weight_types()}
FLOAT_TYPES = {b.name.lower(): b.ggml_id for b in ckernels.weight_types() if not b.act_type}


@pytest.fixture
def isa(request):
    """Switches the process to one variant for the test, then back."""
    before = ckernels.active_isa()
    ckernels.set_isa(request.param)
    yield request.param
    ckernels.set_isa(before)


def per_isa(fn):
    return pytest.mark.parametrize("isa", ISAS, indirect=True)(fn)


# ---- weight blocks and their exact values ----

def _fp16(a):
    return np.asarray(a, dtype=np.float16)


def make_quant_weights(type_, rows, cols, rng, pow2=False):
    """(GGUF bytes (rows, row_bytes), dequantized float64 (rows, cols)); make_quant_weights.m
    keeps the last Q4_1 / Q5_1 minimums (rows, blocks) for the oracle's m * s term."""
    nb = cols // 32
    if pow2:  # power-of-two scales: products with activation scales are exact
        d = _fp16(2.0 ** -rng.integers(0, 2, size=(rows, nb)))
    else:
        d = _fp16(rng.uniform(-0.02, 0.02, size=(rows, nb)))
    d64 = d.astype(np.float64)[..., None]
    fields = [d.view(np.uint8).reshape(rows, nb, 2)]
    if type_ in (Q4_1, Q5_1):
        m = _fp16(rng.integers(-8, 8, size=(rows, nb)) / 16.0 if pow2
                  else rng.uniform(-0.1, 0.1, size=(rows, nb)))
        fields.append(m.view(np.uint8).reshape(rows, nb, 2))
        make_quant_weights.m = m.astype(np.float64)
    if type_ == Q8_0:
        q = rng.integers(-128, 128, size=(rows, nb, 32)).astype(np.int8)
        fields.append(q.view(np.uint8))
        w = q.astype(np.float64) * d64
    else:
        bits = 5 if type_ in (Q5_0, Q5_1) else 4
        q = rng.integers(0, 1 << bits, size=(rows, nb, 32)).astype(np.uint32)
        if bits == 5:  # qh: bit j = bit 4 of element j, little-endian
            qh = ((q >> 4) << np.arange(32, dtype=np.uint32)).sum(axis=-1, dtype=np.uint32)
            fields.append(qh.astype("<u4").view(np.uint8).reshape(rows, nb, 4))
        fields.append(((q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)).astype(np.uint8))
        value = {Q4_0: q - 8.0, Q5_0: q - 16.0, IQ4_NL: KVALUES_IQ4NL[q & 15]}.get(type_, q)
        w = value.astype(np.float64) * d64
        if type_ in (Q4_1, Q5_1):
            w = w + make_quant_weights.m[..., None]
    blocks = np.concatenate(fields, axis=-1)
    return np.ascontiguousarray(blocks.reshape(rows, -1)), w.reshape(rows, cols)


def make_float_weights(type_, rows, cols, rng):
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    if type_ == F32:
        return w, w.astype(np.float64)
    if type_ == F16:
        h = w.astype(np.float16)
        return h, h.astype(np.float64)
    bits = (w.view(np.uint32) >> 16).astype(np.uint16)  # truncation is a valid bf16 too
    return bits, (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def dequant_act(blocks, q8_1=False):
    """float64 values of Q8_0 / Q8_1 activation blocks."""
    bs = 36 if q8_1 else 34
    b = blocks.reshape(-1, bs)
    d = b[:, :2].copy().view(np.float16).astype(np.float64)
    q = b[:, bs - 32:].view(np.int8).astype(np.float64)
    return (q * d).reshape(-1)


def quantized_x(type_, x):
    """The kernels' activation quantization of each row of x (active variant), as
    float64 values."""
    q81 = ACT_TYPE[type_] == "Q8_1"
    fn = ckernels.quantize_act_q8_1 if q81 else ckernels.quantize_act_q8_0
    return np.stack([dequant_act(fn(row), q81) for row in x])


def q8_1_oracle(x, w):
    """Q4_1 or Q5_1 x Q8_1 as ggml defines it: sum over blocks of d_w d_x sum(q_w q_x) +
    m_w s_x, where s_x = fp16(d_x sum(q_x)) is rounded (so it is not quite sum of x
    values); the m_w of the last make_quant_weights."""
    xq = quantized_x(Q4_1, x)
    blocks = np.stack([ckernels.quantize_act_q8_1(row).reshape(-1, 36) for row in x])
    s = blocks[..., 2:4].copy().view(np.float16).astype(np.float64)[..., 0]  # (tokens, nb)
    xsum = xq.reshape(len(x), -1, 32).sum(-1)
    return xq @ w.T + (s - xsum) @ make_quant_weights.m.T


def pow2_activations(n_tokens, cols, rng):
    """Rows whose Q8 quantization is exact: each block is integers up to 127 (one of
    them +-127) times a power of two."""
    q = rng.integers(-127, 128, size=(n_tokens, cols // 32, 32)).astype(np.float64)
    q[..., 0] = rng.choice([-127.0, 127.0], size=q.shape[:2])
    scale = 2.0 ** -rng.integers(0, 2, size=(n_tokens, cols // 32, 1))
    return (q * scale).reshape(n_tokens, cols).astype(np.float32)


def run_matmul(type_, data, rows, cols, x, n_threads):
    m = ckernels.Matrix(type_, rows, cols, data)
    return ckernels.matmul(ckernels.Pool(n_threads), m, x)


# ---- activation quantization ----

@per_isa
@pytest.mark.parametrize("cols", COLS)
def test_q8_activation_bit_exact_with_numpy(isa, cols):
    import formats

    rng = np.random.default_rng(cols)
    x = (rng.standard_normal(cols) * rng.uniform(0.01, 100)).astype(np.float32)
    x[:32] = 0.0  # an all-zero block: d = 0
    if cols > 32:  # absmax 127 makes 1/d exactly 1, so the .5 values are ties for roundf
        x[32:64] = np.concatenate([[127.0], np.arange(31) - 15.5])
    ref = formats.quantize(x, formats.GGMLType.Q8_0)
    assert np.array_equal(ckernels.quantize_act_q8_0(x), ref.reshape(-1))
    ref = formats.quantize(x, formats.GGMLType.Q8_1)
    assert np.array_equal(ckernels.quantize_act_q8_1(x), ref.reshape(-1))


@per_isa
@pytest.mark.parametrize("cols", COLS)
def test_q8_activation_matches_scalar_reference(isa, cols):
    rng = np.random.default_rng(cols + 1)
    x = (rng.standard_normal(cols) * 3).astype(np.float32)
    # exact .5 ties after scaling (absmax 127 gives id = 1): roundf goes away from zero
    x[:32] = np.concatenate([[127.0], np.arange(31) - 15.5]).astype(np.float32)
    got0, got1 = ckernels.quantize_act_q8_0(x), ckernels.quantize_act_q8_1(x)
    ckernels.set_isa("scalar")
    assert np.array_equal(got0, ckernels.quantize_act_q8_0(x))
    assert np.array_equal(got1, ckernels.quantize_act_q8_1(x))
    q = got0[:34][2:].view(np.int8)
    assert q[1] == -16 and q[-1] == 15  # -15.5 -> -16, 14.5 -> 15


# ---- quantized matrix kernels ----

@per_isa
@pytest.mark.parametrize("name", list(QUANT_TYPES))
@pytest.mark.parametrize("cols", COLS)
def test_quantized_matmul_exact_with_pow2_scales(isa, name, cols):
    type_ = QUANT_TYPES[name]
    rng = np.random.default_rng(cols * 7 + type_)
    rows, n_tokens = 37, 13  # neither a multiple of the row group nor of the threads; 13 = 8 + 4 + 1
    data, w = make_quant_weights(type_, rows, cols, rng, pow2=True)
    x = pow2_activations(n_tokens, cols, rng)
    xq = quantized_x(type_, x)
    assert np.array_equal(xq, x.astype(np.float64))  # the quantization is exact here
    want = (q8_1_oracle(x, w) if ACT_TYPE[type_] == "Q8_1" else xq @ w.T).astype(np.float32)
    for n_threads in (1, 2, 3):
        y = run_matmul(type_, data, rows, cols, x, n_threads)
        assert np.array_equal(y, want), f"{name} {isa} threads={n_threads}"


@per_isa
@pytest.mark.parametrize("name", list(QUANT_TYPES))
@pytest.mark.parametrize("cols", COLS)
def test_quantized_matmul_is_the_rounded_exact_product(isa, name, cols):
    # the kernels sum blocks in double and round once (qgemm.c), so with any scales
    # every variant, batched or not, gives the float64 product of the quantized
    # operands rounded to float32: bit for bit, not just close
    type_ = QUANT_TYPES[name]
    rng = np.random.default_rng(cols * 11 + type_)
    rows = 21 if cols > 4096 else 43
    data, w = make_quant_weights(type_, rows, cols, rng)
    x = rng.standard_normal((6, cols)).astype(np.float32)
    y = run_matmul(type_, data, rows, cols, x, 2)
    y1 = run_matmul(type_, data, rows, cols, x[1], 1)  # matrix x vector path
    oracle = q8_1_oracle(x, w) if ACT_TYPE[type_] == "Q8_1" else quantized_x(type_, x) @ w.T
    ckernels.set_isa("scalar")
    ref = run_matmul(type_, data, rows, cols, x, 1)
    want = oracle.astype(np.float32)
    assert np.array_equal(ref, want)
    assert np.array_equal(y, want)
    assert np.array_equal(y1, want[1])


@pytest.mark.parametrize("name", list(QUANT_TYPES))
def test_weight_blocks_are_ggmls(name):
    """The blocks built here mean what ggml says they mean (gguf-py's dequantizer), so
    the oracle of these tests is the format's, not this file's reading of it."""
    from gguf import GGMLQuantizationType, quants

    type_ = QUANT_TYPES[name]
    data, w = make_quant_weights(type_, 5, 96, np.random.default_rng(type_))
    got = quants.dequantize(data, GGMLQuantizationType(type_))
    assert np.array_equal(got.astype(np.float64), w)


@per_isa
@pytest.mark.parametrize("name", list(QUANT_TYPES))
def test_quantized_matmul_tiles_agree(isa, name):
    """Every token tile (8, 4, 1..3 tokens) and row group tail gives each output the
    same sum: a batch equals its tokens one by one, and scalar's bits."""
    type_ = QUANT_TYPES[name]
    rng = np.random.default_rng(type_ + 3)
    rows, cols = 45, 160  # 11 row groups + 1 row; 5 blocks: a full group + a tail of 1
    data, _ = make_quant_weights(type_, rows, cols, rng)
    x = rng.standard_normal((23, cols)).astype(np.float32)  # 8 + 8 + 4 + 3
    y = run_matmul(type_, data, rows, cols, x, 2)
    for t in range(len(x)):
        assert np.array_equal(run_matmul(type_, data, rows, cols, x[t], 1), y[t]), t
    for n in (2, 3, 5, 9, 12):
        assert np.array_equal(run_matmul(type_, data, rows, cols, x[:n], 3), y[:n]), n
    ckernels.set_isa("scalar")
    assert np.array_equal(run_matmul(type_, data, rows, cols, x, 1), y)


@per_isa
@pytest.mark.parametrize("name", list(QUANT_TYPES))
def test_quantized_prompt_batches_agree(isa, name):
    """Prompt-sized batches (AVX2 decodes 8-row panels of up to 64 blocks once for 64
    tokens): tokens past a pass of 64, a row tile of 64 blocks plus a tail inside a
    partial block group, an odd number of row groups per thread: each output has
    scalar's bits and equals its token alone."""
    type_ = QUANT_TYPES[name]
    rng = np.random.default_rng(type_ + 17)
    rows, cols = 45, 67 * 32
    data, w = make_quant_weights(type_, rows, cols, rng)
    x = rng.standard_normal((70, cols)).astype(np.float32)  # 64 + 6
    y = run_matmul(type_, data, rows, cols, x, 3)
    for n in (16, 17, 33):
        assert np.array_equal(run_matmul(type_, data, rows, cols, x[:n], 2), y[:n]), n
    for t in (0, 15, 63, 64, 69):
        assert np.array_equal(run_matmul(type_, data, rows, cols, x[t], 1), y[t]), t
    oracle = q8_1_oracle(x, w) if ACT_TYPE[type_] == "Q8_1" else quantized_x(type_, x) @ w.T
    assert np.array_equal(y, oracle.astype(np.float32))
    ckernels.set_isa("scalar")
    assert np.array_equal(run_matmul(type_, data, rows, cols, x, 1), y)


@per_isa
def test_results_do_not_depend_on_thread_count(isa):
    rng = np.random.default_rng(5)
    rows, cols = 101, 1536
    for type_ in list(QUANT_TYPES.values()) + list(FLOAT_TYPES.values()):
        if type_ in FLOAT_TYPES.values():
            data, _ = make_float_weights(type_, rows, cols, rng)
        else:
            data, _ = make_quant_weights(type_, rows, cols, rng)
        x = rng.standard_normal((7, cols)).astype(np.float32)
        ys = [run_matmul(type_, data, rows, cols, x, n) for n in (1, 2, 3, 4)]
        for y in ys[1:]:
            assert np.array_equal(y, ys[0])


@per_isa
def test_matmul_multi_equals_separate_calls(isa):
    rng = np.random.default_rng(9)
    cols = 576
    # Q8_0 and IQ4_NL share an activation layout, as do Q4_1 and Q5_1; Q4_0 and Q5_0 do not
    specs = [(Q4_1, 576), (Q4_1, 192), (Q4_0, 37), (Q8_0, 101), (F16, 13), (Q4_1, 1536),
             (Q5_0, 21), (Q5_1, 45), (IQ4_NL, 19)]
    mats = []
    for type_, rows in specs:
        if type_ == F16:
            data, _ = make_float_weights(type_, rows, cols, rng)
        else:
            data, _ = make_quant_weights(type_, rows, cols, rng)
        mats.append(ckernels.Matrix(type_, rows, cols, data))
    for n_tokens in (1, 6):
        x = rng.standard_normal((n_tokens, cols)).astype(np.float32)
        for n_threads in (1, 2, 3):
            pool = ckernels.Pool(n_threads)
            ys = ckernels.matmul_multi(pool, mats, x)
            for m, y in zip(mats, ys):
                assert np.array_equal(y, ckernels.matmul(pool, m, x))
    with pytest.raises(ValueError, match="same number of columns"):
        ckernels.matmul_multi(pool, [mats[0], ckernels.Matrix(F32, 2, 64, np.zeros(128, np.float32))], x)


# ---- super-block (K type, IQ4_XS) matrix kernels, Q8_K activations ----
# The blocks are random bytes with chosen fp16 d (and dmin): every bit pattern of the
# quants and sub-block scales is a valid block. The oracle decodes them here, in NumPy,
# from the GGUF layouts (checked against gguf-py's dequantizer), into integer quants
# q, chunk scales sc (per 16 elements) and bsums weights coef, and evaluates the
# kernels' contract: per super-block the exact integers isum, msum, then
# acc += isum * (d * d_x); acc -= msum * (dmin * d_x) in float64, super-blocks in order.

K_BLOCK_BYTES = {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210, "iq4_xs": 136}
# byte offsets of d and dmin (None: no mins) in each block
K_SCALE_AT = {"q2_k": (80, 82), "q3_k": (108, None), "q4_k": (0, 2), "q5_k": (0, 2),
              "q6_k": (208, None), "iq4_xs": (0, None)}
IQ4NL_GRID = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113])


def _k_scales_k4(s):
    """Q4_K / Q5_K 6-bit scales and mins (..., 12 bytes) -> (..., 8) each."""
    s = s.astype(np.int64)
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], -1)
    m = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
    return sc, m


def k_decode(name, blocks):
    """blocks (rows, nb, bytes) -> q (rows, nb, 256) with the offset removed,
    sc (rows, nb, 16), mins (rows, nb, 16) or None, d, dmin (rows, nb) float64."""
    b = blocks.astype(np.int64)
    di, mi = K_SCALE_AT[name]
    h16 = lambda at: blocks[..., at:at + 2].copy().view(np.float16)[..., 0].astype(np.float64)  # noqa: E731
    d, dmin = h16(di), (h16(mi) if mi is not None else None)
    mins = None
    if name in ("q2_k", "q3_k"):
        qs = b[..., 16:80] if name == "q2_k" else b[..., 32:96]
        qs = qs.reshape(*b.shape[:2], 2, 1, 32)
        q = (qs >> (2 * np.arange(4))[:, None]) & 3  # (rows, nb, half, j, l)
        if name == "q2_k":
            sc, mins = b[..., 0:16] & 15, b[..., 0:16] >> 4
        else:
            hm = b[..., 0:32][..., None, None, :]
            bit = (4 * np.arange(2)[:, None] + np.arange(4)[None, :])[..., None]
            q = q + 4 * ((hm >> bit) & 1) - 4
            s = b[..., 96:108]
            lo = np.concatenate([s[..., 0:8] & 15, s[..., 0:8] >> 4], -1)
            c = np.arange(16)
            hi = (s[..., 8 + c % 4] >> (2 * (c // 4))) & 3
            sc = (lo | hi << 4) - 32
    elif name in ("q4_k", "q5_k"):
        qs = b[..., 16:144] if name == "q4_k" else b[..., 48:176]
        qs = qs.reshape(*b.shape[:2], 4, 1, 32)
        q = np.concatenate([qs & 15, qs >> 4], axis=-2)  # (rows, nb, c, lo/hi, l)
        if name == "q5_k":
            qh = b[..., 16:48][..., None, None, :]
            bit = (2 * np.arange(4)[:, None] + np.arange(2)[None, :])[..., None]
            q = q + 16 * ((qh >> bit) & 1)
        sc8, m8 = _k_scales_k4(b[..., 4:16])
        sc, mins = np.repeat(sc8, 2, -1), np.repeat(m8, 2, -1)
    elif name == "q6_k":
        ql = b[..., 0:128].reshape(*b.shape[:2], 2, 2, 32)  # (half, k % 2, l)
        qh = b[..., 128:192].reshape(*b.shape[:2], 2, 1, 32)
        lo = np.stack([ql[..., 0, :] & 15, ql[..., 1, :] & 15, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4], -2)
        hi = (qh >> (2 * np.arange(4))[:, None]) & 3
        q = (lo | hi << 4) - 32
        sc = blocks[..., 192:208].view(np.int8).astype(np.int64)
    else:  # iq4_xs
        qs = b[..., 8:136].reshape(*b.shape[:2], 8, 1, 16)
        q = IQ4NL_GRID[np.concatenate([qs & 15, qs >> 4], axis=-2)]
        sh = b[..., 2] | (b[..., 3] << 8)
        j = np.arange(8)
        ls = ((b[..., 4 + j // 2] >> (4 * (j % 2))) & 15) | (((sh[..., None] >> (2 * j)) & 3) << 4)
        sc = np.repeat(ls - 32, 2, -1)
    return q.reshape(*b.shape[:2], 256), sc, mins, d, dmin


def make_k_weights(name, rows, cols, rng, pow2=False):
    """(GGUF bytes (rows, row_bytes), the decoded parts of k_decode, float64 W)."""
    nb = cols // 256
    blocks = rng.integers(0, 256, size=(rows, nb, K_BLOCK_BYTES[name]), dtype=np.uint8)
    for at in K_SCALE_AT[name]:
        if at is None:
            continue
        v = (2.0 ** -rng.integers(4, 8, size=(rows, nb)) if pow2
             else rng.uniform(0.0005, 0.01, size=(rows, nb)) * rng.choice([-1, 1], size=(rows, nb)))
        blocks[..., at:at + 2] = _fp16(v)[..., None].view(np.uint8).reshape(rows, nb, 2)
    parts = k_decode(name, blocks)
    q, sc, mins, d, dmin = parts
    w = d[..., None] * np.repeat(sc, 16, -1) * q
    if mins is not None:
        w = w - dmin[..., None] * np.repeat(mins, 16, -1)
    return blocks.reshape(rows, -1), parts, w.reshape(rows, cols)


def q8k_parts(x):
    """The active variant's Q8_K quantization of each row of x: q (n, nb, 256),
    bsums (n, nb, 16), d (n, nb) float64."""
    blocks = np.stack([ckernels.quantize_act_q8_K(row).reshape(-1, 292) for row in np.atleast_2d(x)])
    d = blocks[..., 0:4].copy().view(np.float32)[..., 0].astype(np.float64)
    q = blocks[..., 4:260].view(np.int8).astype(np.int64)
    bsums = blocks[..., 260:292].copy().view(np.int16).astype(np.int64)
    assert np.array_equal(bsums, q.reshape(*q.shape[:2], 16, 16).sum(-1))
    return q, bsums, d


def k_oracle(parts, x):
    """The kernels' contract, evaluated in NumPy: (n_tokens, rows) float32."""
    q, sc, mins, d, dmin = parts
    aq, bsums, dx = q8k_parts(x)
    nbk = q.shape[1]
    dots = np.einsum("rbce,tbce->trbc", q.reshape(*q.shape[:2], 16, 16), aq.reshape(*aq.shape[:2], 16, 16))
    isum = (dots * sc[None]).sum(-1)  # (t, r, b), exact in int64
    msum = (bsums[:, None] * mins[None]).sum(-1) if mins is not None else np.zeros_like(isum)
    assert np.abs(isum).max() < 2 ** 31 and np.abs(msum).max() < 2 ** 31
    acc = np.zeros(isum.shape[:2])
    for b in range(nbk):
        acc = acc + isum[..., b] * (d[None, :, b] * dx[:, None, b])
        if mins is not None:
            acc = acc - msum[..., b] * (dmin[None, :, b] * dx[:, None, b])
    return acc.astype(np.float32), (aq * dx[..., None]).reshape(len(dx), -1)


def pow2_k_activations(n_tokens, cols, rng):
    """Rows whose Q8_K quantization is exact: each super-block is integers up to 127
    (its first element -127, so d = 1 / (-127 / -127 ...) stays a power of two) times
    a power of two."""
    q = rng.integers(-126, 127, size=(n_tokens, cols // 256, 256)).astype(np.float64)
    q[..., 0] = -127.0
    scale = 2.0 ** -rng.integers(0, 3, size=(n_tokens, cols // 256, 1))
    return (q * scale).reshape(n_tokens, cols).astype(np.float32)


K_COLS = [256, 512, 1536, 2816]


@pytest.mark.parametrize("name", list(K_TYPES))
def test_k_decoding_matches_gguf_py(name):
    gguf = pytest.importorskip("gguf")
    from gguf import quants
    rng = np.random.default_rng(K_TYPES[name])
    data, _, w = make_k_weights(name, 5, 512, rng, pow2=True)
    got = quants.dequantize(data, gguf.GGMLQuantizationType[name.upper()])
    # power-of-two d and dmin: gguf-py's float32 arithmetic is exact too
    assert np.array_equal(np.asarray(got, np.float64).reshape(w.shape), w)


@per_isa
@pytest.mark.parametrize("cols", K_COLS)
def test_q8_K_activation_matches_ggml_and_scalar(isa, cols, ggml_q8k):
    rng = np.random.default_rng(cols + 3)
    x = (rng.standard_normal(cols) * rng.uniform(0.01, 100)).astype(np.float32)
    x[:256] = 0.0  # an all-zero super-block: all zeros
    if cols > 256:  # ties for round-half-even: absmax 127 makes iscale exactly -1
        x[256:512] = np.concatenate([[-127.0], np.arange(255) % 40 - 19.5])
        x[300] = 127.0  # |x| ties with the first: the first sets the sign
    got = ckernels.quantize_act_q8_K(x)
    assert np.array_equal(got, ggml_q8k(x))
    import formats
    assert np.array_equal(got, formats.quantize(x, formats.GGMLType.Q8_K).reshape(-1))
    ckernels.set_isa("scalar")
    assert np.array_equal(got, ckernels.quantize_act_q8_K(x))


@pytest.fixture(scope="module")
def ggml_q8k():
    import ctypes
    from oracles import ggml_base_library
    fn = ggml_base_library().quantize_row_q8_K_ref  # skips without llama-cpp-python
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]

    def q8k(x):
        out = np.zeros(len(x) // 256 * 292, np.uint8)
        fn(x.ctypes.data, out.ctypes.data, len(x))
        out = out.reshape(-1, 292)
        out[(out[:, :4].copy().view(np.float32)[:, 0] == 0), 260:] = 0  # ggml leaves bsums as they were
        return out.reshape(-1)
    return q8k


@per_isa
@pytest.mark.parametrize("name", list(K_TYPES))
@pytest.mark.parametrize("cols", K_COLS)
def test_k_matmul_exact_with_pow2_scales(isa, name, cols):
    rng = np.random.default_rng(cols * 5 + K_TYPES[name])
    rows, n_tokens = 37, 13  # 13 = 8 + 5 tokens: a full tile and a partial one
    data, parts, w = make_k_weights(name, rows, cols, rng, pow2=True)
    x = pow2_k_activations(n_tokens, cols, rng)
    _, xq = k_oracle(parts, x)
    assert np.array_equal(xq, x.astype(np.float64))  # the quantization is exact here
    want = (x.astype(np.float64) @ w.T).astype(np.float32)
    for n_threads in (1, 2, 3):
        assert np.array_equal(run_matmul(K_TYPES[name], data, rows, cols, x, n_threads), want), n_threads


@per_isa
@pytest.mark.parametrize("name", list(K_TYPES))
@pytest.mark.parametrize("cols", K_COLS)
def test_k_matmul_is_the_contract_bit_for_bit(isa, name, cols):
    # any scales: every variant, thread count and batch split gives the oracle's bits,
    # and those are the float64 product of the dequantized operands up to double
    # roundings (at most one float32 ulp, almost always none)
    type_ = K_TYPES[name]
    rng = np.random.default_rng(cols * 3 + type_)
    rows = 29
    data, parts, w = make_k_weights(name, rows, cols, rng)
    x = rng.standard_normal((19, cols)).astype(np.float32)  # 8 + 8 + 3
    want, xq = k_oracle(parts, x)
    for n_threads in (1, 2):
        assert np.array_equal(run_matmul(type_, data, rows, cols, x, n_threads), want), n_threads
    for t in (0, 9, 18):  # the matrix x vector path
        assert np.array_equal(run_matmul(type_, data, rows, cols, x[t], 1), want[t]), t
    exact = (xq @ w.T).astype(np.float32)
    assert np.abs(exact.view(np.int32).astype(np.int64) - want.view(np.int32)).max() <= 1
    assert np.mean(exact == want) > 0.99


@per_isa
def test_k_matmul_multi_mixes_types(isa):
    rng = np.random.default_rng(21)
    cols = 512
    mats = []
    for name, rows in (("q4_k", 33), ("q6_k", 7), ("iq4_xs", 12)):
        data, _, _ = make_k_weights(name, rows, cols, rng)
        mats.append(ckernels.Matrix(K_TYPES[name], rows, cols, data))
    data, _ = make_quant_weights(Q8_0, 9, cols, rng)
    mats.append(ckernels.Matrix(Q8_0, 9, cols, data))
    x = rng.standard_normal((10, cols)).astype(np.float32)
    for n_threads in (1, 3):
        pool = ckernels.Pool(n_threads)
        for m, y in zip(mats, ckernels.matmul_multi(pool, mats, x)):
            assert np.array_equal(y, ckernels.matmul(pool, m, x))


def test_k_matrix_needs_whole_super_blocks():
    data = np.zeros(2 * 144, np.uint8)
    with pytest.raises(ValueError, match="shape"):
        ckernels.Matrix(K_TYPES["q4_k"], 2, 288, data)


# ---- float matrix kernels ----

@per_isa
@pytest.mark.parametrize("name", list(FLOAT_TYPES))
@pytest.mark.parametrize("cols", [32, 64, 576, 1536, 4096, 11008, 45])
def test_float_matmul_close_to_scalar_and_oracle(isa, name, cols):
    type_ = FLOAT_TYPES[name]
    rng = np.random.default_rng(cols * 13 + type_)
    rows = 13
    data, w = make_float_weights(type_, rows, cols, rng)
    x = rng.standard_normal((5, cols)).astype(np.float32)
    y = run_matmul(type_, data, rows, cols, x, 2)
    ckernels.set_isa("scalar")
    ref = run_matmul(type_, data, rows, cols, x, 1)
    oracle = x.astype(np.float64) @ w.T
    tol = 1e-5 * np.sqrt(cols) * np.abs(x).max() * np.abs(w).max()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=tol)
    np.testing.assert_allclose(ref, oracle, rtol=1e-5, atol=tol)



@per_isa
@pytest.mark.parametrize("name", list(FLOAT_TYPES))
@pytest.mark.parametrize("cols", [37, 576])
def test_float_matmul_tiles_agree(isa, name, cols):
    """Every tile shape (8-row matrix x vector passes, rows x tokens tiles for batches,
    their remainders, a masked column tail) gives each output element the same
    arithmetic: a batch equals its tokens one by one, for any thread count."""
    type_ = FLOAT_TYPES[name]
    rng = np.random.default_rng(cols * 17 + type_)
    rows = 45  # 5 x 8 + 4 + 1
    data, w = make_float_weights(type_, rows, cols, rng)
    x = rng.standard_normal((7, cols)).astype(np.float32)  # 4 + 3 tokens
    y = run_matmul(type_, data, rows, cols, x, 1)
    for n_threads in (2, 3):
        assert np.array_equal(run_matmul(type_, data, rows, cols, x, n_threads), y)
    for t in range(len(x)):
        assert np.array_equal(run_matmul(type_, data, rows, cols, x[t], 2), y[t]), t
    ckernels.set_isa("scalar")
    ref = run_matmul(type_, data, rows, cols, x, 1)
    tol = 1e-5 * np.sqrt(cols) * np.abs(x).max() * np.abs(w).max()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=tol)


# ---- binding checks and dispatch ----

def test_binding_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    data, _ = make_quant_weights(Q4_0, 4, 64, rng)
    m = ckernels.Matrix(Q4_0, 4, 64, data)
    pool = ckernels.Pool(1)
    with pytest.raises(ValueError, match="float32"):
        ckernels.matmul(pool, m, np.zeros(64, dtype=np.float64))
    with pytest.raises(ValueError, match="shape"):
        ckernels.matmul(pool, m, np.zeros(63, dtype=np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        ckernels.matmul(pool, m, np.zeros((2, 128), dtype=np.float32)[:, ::2])
    with pytest.raises(ValueError, match="bytes"):
        ckernels.Matrix(Q4_0, 5, 64, data)
    with pytest.raises(ValueError, match="shape"):
        ckernels.Matrix(Q4_0, 4, 48, data)
    with pytest.raises(ValueError, match="type"):
        ckernels.Matrix(12, 4, 64, data)
    with pytest.raises(ValueError, match="n_threads"):
        ckernels.Pool(0)
    with pytest.raises(ValueError):
        ckernels.set_isa("no-such-isa")


def test_dispatch_picks_best_and_lists_supported():
    assert ISAS[0] == "scalar"
    assert set(ISAS) <= set(ckernels.ISA_NAMES)
    if "KILN_ISA" not in os.environ:
        assert ckernels.active_isa() == ISAS[-1]


def _python(code, **env):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True)


@pytest.mark.parametrize("name", ISAS)
def test_kiln_isa_env_forces_variant(name):
    r = _python("import ckernels; print(ckernels.active_isa())", KILN_ISA=name)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == name


def test_kiln_isa_env_rejects_unsupported_variant():
    missing = [n for n in ckernels.ISA_NAMES if n not in ISAS]
    for name in missing + ["bogus"]:
        r = _python("import ckernels", KILN_ISA=name)
        assert r.returncode != 0
        assert f"KILN_ISA={name!r}" in r.stderr and "supported" in r.stderr
