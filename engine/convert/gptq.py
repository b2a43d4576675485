"""Error-feedback rounding (`kiln convert --method gptq`), GPTQ's idea for block types.

A matrix W (rows x n) multiplies inputs x whose Hessian H = sum x x^T the calibration text
gives (engine.convert.calibrate). The output error of a quantized row q is
(w - q) H (w - q)^T; GPTQ quantizes the columns in order and, each time some are fixed,
moves the rest of the row to cancel the error they made, through the inverse Hessian:
with Hinv = U^T U (U upper triangular, the Cholesky factor of H^-1) and a set B of columns
fixed with error E_B, the remaining columns R change by -E_B U_BB^-1 U_BR (the optimal
update of R given B, Optimal Brain Surgeon's, in GPTQ's Cholesky form).

The scales of each block of the type (32 weights, or a 256-weight super-block for the K
types) are chosen when GPTQ reaches it, from the row as the earlier blocks' errors left
it, by the type's own importance-weighted quantizer (formats.quantize_weighted, llama.cpp's
scale search), so the output is plain blocks of that type. Its column weights are the
diagonal of (Hinv_BB)^-1, what each column's error costs once the columns after it are
free to move. For the 32-weight types the block's scale (and minimum) then stay fixed and
its columns are rounded one at a time onto that grid, each column's error moving the
block's later columns as GPTQ does (`_GRIDS`); the K types' super-blocks are fixed whole
(B is the super-block).
H gets GPTQ's dampening (a share of its mean diagonal) so that it is safely invertible;
a column no calibration row ever touched (zero diagonal) is quantized as zero.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

import formats
from formats import _blocks, iquants, quants

DAMP = 0.01  # share of the mean diagonal added to H's diagonal (GPTQ's default)
GPTQ_TYPES = tuple(t for t in formats.GGMLType
                   if t in formats.ENCODABLE_TYPES and formats.GGML_QUANT_SIZES[t][0] > 1)


@dataclass(frozen=True)
class _Grid:
    """A 32-weight block type as d * levels[code] (+ m): where d (and m) sit in the block,
    the levels, and how codes (blocks, 32) go into the bytes after the header."""
    header: int                 # bytes of fp16 fields before the codes
    levels: np.ndarray          # float32, code -> multiple of d
    pack: Callable              # (codes uint8 (blocks, 32), block bytes[:, header:]) -> None
    has_min: bool = False       # the second fp16 field is m


def _pack4(codes, out):
    out[:] = _blocks.pack_nibbles(codes)


def _pack5(codes, out):
    quants._q5_bits(codes, out)


def _pack8(codes, out):
    out[:] = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)


GT = formats.GGMLType
_GRIDS = {
    GT.Q4_0: _Grid(2, np.arange(-8, 8, dtype=np.float32), _pack4),
    GT.Q5_0: _Grid(2, np.arange(-16, 16, dtype=np.float32), _pack5),
    GT.Q4_1: _Grid(4, np.arange(16, dtype=np.float32), _pack4, has_min=True),
    GT.Q5_1: _Grid(4, np.arange(32, dtype=np.float32), _pack5, has_min=True),
    GT.Q8_0: _Grid(2, np.arange(-128, 128, dtype=np.float32), _pack8),
    GT.IQ4_NL: _Grid(2, iquants.KVALUES_IQ4NL.astype(np.float32), _pack4),
}


def _round_onto(grid: _Grid, w: np.ndarray, d: np.ndarray, m: np.ndarray):
    """The code of each row's nearest level to w (rows,) on the grid d * levels + m, and
    the level's value (float64)."""
    lv = grid.levels
    if np.all(np.diff(lv) == 1):  # uniform: round and clamp
        with np.errstate(divide="ignore", invalid="ignore"):
            k = np.rint((w - m) / np.where(d == 0, 1.0, d)) - lv[0]
        k = np.clip(np.nan_to_num(k), 0, lv.size - 1).astype(np.intp)
    else:
        k = np.argmin(np.abs(d[:, None] * lv[None, :] + m[:, None] - w[:, None]), axis=1)
    return k, d * lv[k] + m


class GPTQError(ValueError):
    """A Hessian that does not fit the matrix it is given for."""


def factor(hessian: np.ndarray, damp: float = DAMP):
    """(dead columns, U) of a Hessian: dampened, dead columns cut loose, and U upper
    triangular with U^T U = H^-1. A stack (g, n, n) gives a list, one per Hessian."""
    h = np.array(hessian, dtype=np.float64)
    if h.ndim == 3:
        return [factor(x, damp) for x in h]
    n = h.shape[0]
    if h.ndim != 2 or h.shape != (n, n) or n == 0:
        raise GPTQError(f"a Hessian must be square, got shape {h.shape}")
    if not np.all(np.isfinite(h)):
        raise GPTQError("the Hessian has NaN or infinite entries (calibration "
                        "activations that overflowed?)")
    diag = np.diag(h).copy()
    dead = ~(diag > 0)
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    live = diag[~dead]
    h[np.diag_indices(n)] += damp * (float(live.mean()) if live.size else 1.0)
    h[dead, dead] = 1.0
    # from the Cholesky factor L of H (H = L L^T): H^-1 = L^-T L^-1, whose own Cholesky
    # factor's transpose is U
    try:
        lower = np.linalg.cholesky(h)
        l_inv = np.linalg.inv(lower)
        u = np.linalg.cholesky(l_inv.T @ l_inv).T
    except np.linalg.LinAlgError:
        raise GPTQError("the Hessian is not positive semi-definite: not a sum of "
                        "x x^T") from None
    return dead, u


class GPTQ:
    """The solver for one matrix: factor its Hessian once, then quantize rows in chunks
    (rows are independent: each row's error moves only its own later columns). A stack of
    Hessians (g, n, n) gives each of g equal groups of rows its own (attn_v's KV heads)."""

    def __new__(cls, hessian, type_, damp: float = DAMP, fact=None):
        if np.ndim(hessian) == 3:
            return _Grouped(hessian, type_, damp, fact)
        return super().__new__(cls)

    def __init__(self, hessian: np.ndarray, type_, damp: float = DAMP, fact=None):
        """fact: factor(hessian, damp), when the caller has it already (one Hessian, many
        types: engine.convert.auto)."""
        self.type = formats.GGMLType(type_)
        if self.type not in GPTQ_TYPES:
            raise GPTQError(f"{self.type.name} is not a block type GPTQ can round into")
        shape = np.shape(hessian)
        n = shape[-1] if shape else 0
        if shape != (n, n) or n == 0:
            raise GPTQError(f"a Hessian must be square, got shape {shape}")
        self.block = formats.GGML_QUANT_SIZES[self.type][0]
        if n % self.block:
            raise GPTQError(f"rows of {n} are not whole {self.type.name} blocks "
                            f"of {self.block}")
        self.dead, u = factor(hessian, damp) if fact is None else fact
        self.n = n
        # per block: start, stop, the column weights of its scale search, the propagation
        # of its error to the columns after it, and its rows of U from its start on
        self.steps = []
        for b0 in range(0, n, self.block):
            b1 = b0 + self.block
            u_bb_inv = np.linalg.inv(u[b0:b1, b0:b1])
            hinv_bb = u[b0:b1, b0:b1].T @ u[b0:b1, b0:b1]
            weights = np.diag(np.linalg.inv(hinv_bb)).astype(np.float32)
            self.steps.append((b0, b1, weights, u_bb_inv @ u[b0:b1, b1:], u[b0:b1, b0:]))
        self.grid = _GRIDS.get(self.type)

    def quantize(self, x: np.ndarray, first_row: int = 0, n_rows: int | None = None):
        """float32 rows (m, n) -> uint8 blocks (m, row bytes) of the solver's type (rows
        first_row.. of a matrix of n_rows; they matter to _Grouped only)."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.n:
            raise GPTQError(f"rows of {x.shape[-1]} given to a solver for rows of {self.n}")
        w = x.astype(np.float64)
        w[:, self.dead] = 0.0
        block_bytes = formats.GGML_QUANT_SIZES[self.type][1]
        out = np.empty((x.shape[0], self.n // self.block * block_bytes), np.uint8)
        for k, (b0, b1, weights, prop, u_rows) in enumerate(self.steps):
            wb = w[:, b0:b1].astype(np.float32)
            q = formats.quantize_weighted(wb, self.type, weights)
            if self.grid is not None:
                self._round_block(w, q, b0, b1, u_rows)
            elif b1 < self.n:
                err = w[:, b0:b1] - formats.dequantize(q, self.type, wb.shape).astype(np.float64)
                w[:, b1:] -= err @ prop
            out[:, k * block_bytes:(k + 1) * block_bytes] = q
        return out

    def _round_block(self, w, q, b0, b1, u_rows):
        """Round block [b0, b1) of rows w onto the grid of its scales in q (the quantizer's
        block, rewritten in place with the new codes), one column at a time: each error,
        over its diagonal of U, moves the block's later columns and then all the rest."""
        g = self.grid
        d = _blocks.fp16_field(q, 0, np.float64)[:, 0]
        m = _blocks.fp16_field(q, 2, np.float64)[:, 0] if g.has_min else np.zeros_like(d)
        codes = np.empty((w.shape[0], b1 - b0), np.uint8)
        errs = np.empty((w.shape[0], b1 - b0))
        for j in range(b1 - b0):
            c = b0 + j
            k, v = _round_onto(g, w[:, c], d, m)
            codes[:, j] = k
            errs[:, j] = (w[:, c] - v) / u_rows[j, j]
            w[:, c + 1:b1] -= np.outer(errs[:, j], u_rows[j, j + 1:b1 - b0])
        g.pack(codes, q[:, g.header:])
        if b1 < self.n:
            w[:, b1:] -= errs @ u_rows[:, b1 - b0:]


class _Grouped:
    """GPTQ with a Hessian per group of consecutive rows (a stack (g, n, n))."""

    def __init__(self, hessians, type_, damp: float = DAMP, fact=None):
        self.solvers = [GPTQ(h, type_, damp, None if fact is None else f)
                        for h, f in zip(hessians, fact or [None] * len(hessians))]

    def quantize(self, x: np.ndarray, first_row: int = 0, n_rows: int | None = None):
        """As GPTQ.quantize; n_rows: the whole matrix's rows (default: these rows)."""
        n_rows = x.shape[0] if n_rows is None else n_rows
        per = n_rows // len(self.solvers)
        if per == 0 or per * len(self.solvers) != n_rows:
            raise GPTQError(f"{n_rows} rows do not split into {len(self.solvers)} equal "
                            "groups (one per Hessian)")
        groups = (first_row + np.arange(x.shape[0])) // per
        return np.concatenate([self.solvers[g].quantize(x[groups == g])
                               for g in np.unique(groups)], axis=0)
