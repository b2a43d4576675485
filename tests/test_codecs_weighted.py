"""Importance-weighted quantizers (formats.weighted): kiln's NumPy equals ggml's
ggml_quantize_chunk given the same importance weights (quantize_row_*_impl), bit for bit,
for every type that takes them, on adversarial rows and importance vectors."""
import ctypes

import numpy as np
import pytest

import formats
from formats import GGMLType as T
from oracles import ggml_quantizer

pytestmark = pytest.mark.oracle

N = 512  # two super-blocks, sixteen 32-blocks


def _rows():
    rng = np.random.default_rng(14)
    spikes = np.zeros(N)
    spikes[[3, 77, 200, 300, 511]] = [40.0, -65.0, 90.0, -30.0, 55.0]
    sub = np.arange(N) // 16
    rows = {
        "normal": rng.standard_normal(N),
        "outliers": rng.standard_normal(N) + spikes,
        "constant": np.full(N, 0.37),
        "constant_negative": np.full(N, -1.25),
        "zero": np.zeros(N),
        "negative_zeros": np.full(N, -0.0),
        "positive": rng.uniform(0.5, 1.0, N),
        "negative": -rng.uniform(0.5, 1.0, N),
        "zero_sub_blocks": rng.standard_normal(N) * (sub % 2),
        "sub_block_magnitudes": rng.standard_normal(N) * 2.0 ** (sub % 16 - 8),
        "tiny": rng.standard_normal(N) * 1e-6,
        "large": rng.standard_normal(N) * 3e4,
        "integers": rng.integers(-8, 8, N).astype(np.float64),
    }
    return np.stack([np.asarray(v, np.float32) for v in rows.values()]), list(rows)


def _importances():
    rng = np.random.default_rng(7)
    zeros = rng.exponential(1.0, N)
    zeros[::3] = 0.0
    block_zero = rng.exponential(1.0, N)
    block_zero[32:64] = 0.0       # a whole block (and half a Q2_K/Q3_K sub-block pair) weightless
    huge = np.ones(N)
    huge[[5, 100, 257]] = 1e6     # ratios of a million between columns
    return {
        "random": rng.exponential(1.0, N), "zeros": zeros, "block_zero": block_zero,
        "huge_ratios": huge, "all_zero": np.zeros(N), "uniform": np.ones(N),
        "tiny": rng.exponential(1e-8, N),
    }


ROWS, ROW_NAMES = _rows()
IMPORTANCE = {k: np.asarray(v, np.float32) for k, v in _importances().items()}


@pytest.fixture(scope="module")
def ggml():
    lib = ggml_quantizer()
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    return lib


def ggml_quantize(lib, x, qtype, qw) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    rows, n = x.shape
    out = np.zeros((rows, formats.row_nbytes(qtype, n)), np.uint8)
    qw = np.ascontiguousarray(qw, np.float32)
    assert lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, n,
                                   qw.ctypes.data) == out.size
    return out


@pytest.mark.parametrize("qtype", formats.WEIGHTED_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("imp", list(IMPORTANCE), ids=str)
def test_weighted_quantize_matches_ggml(ggml, qtype, imp):
    qw = IMPORTANCE[imp]
    got = formats.quantize_weighted(ROWS, qtype, qw)
    want = ggml_quantize(ggml, ROWS, qtype, qw)
    bad = [ROW_NAMES[i] for i in range(len(ROWS)) if not np.array_equal(got[i], want[i])]
    assert not bad, f"{qtype.name} with {imp} importance differs from ggml on rows {bad}"


@pytest.mark.parametrize("qtype", formats.WEIGHTED_TYPES, ids=lambda t: t.name)
def test_weighted_quantize_of_a_matrix_matches_ggml(ggml, qtype):
    """A matrix of many rows at once (the chunked, vectorized path), with a realistic
    importance spread, and leading dimensions kept."""
    rng = np.random.default_rng(int(qtype))
    x = (rng.standard_normal((64, 768)) * rng.exponential(1.0, 768)).astype(np.float32)
    qw = (rng.lognormal(0.0, 2.0, 768)).astype(np.float32)
    got = formats.quantize_weighted(x.reshape(4, 16, 768), qtype, qw)
    assert got.shape == (4, 16, formats.row_nbytes(qtype, 768))
    assert np.array_equal(got.reshape(64, -1), ggml_quantize(ggml, x, qtype, qw))


def test_weights_change_the_result_and_none_are_required(ggml):
    """The weighted path is not the plain one (else these tests could not fail), and
    ggml requires an importance matrix for none of the types kiln weights."""
    qw = IMPORTANCE["huge_ratios"]
    for qtype in formats.WEIGHTED_TYPES:
        assert not ggml.ggml_quantize_requires_imatrix(int(qtype)), qtype.name
        assert not np.array_equal(formats.quantize_weighted(ROWS[:2], qtype, qw),
                                  formats.quantize(ROWS[:2], qtype)), qtype.name


def test_q8_0_ignores_weights_and_bad_lengths_are_refused():
    assert np.array_equal(formats.quantize_weighted(ROWS, T.Q8_0, IMPORTANCE["random"]),
                          formats.quantize(ROWS, T.Q8_0))
    with pytest.raises(ValueError, match="importance weights have 256 values for rows of 512"):
        formats.quantize_weighted(ROWS, T.Q4_0, np.ones(256, np.float32))
