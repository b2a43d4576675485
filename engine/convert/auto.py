"""`kiln convert --type auto --target-bpw B`: each tensor's type chosen from the calibration
so that the file meets a bits-per-weight budget with the least predicted loss.

Sensitivity. For every matrix t the KL cost of quantizing t alone is measured: the float
reference model (engine.reference, exact=False) runs a probe text (the calibration's first
PROBE_TOKENS tokens) with t replaced by its plain PROBE_TYPE rounding, from the hidden state
cached at t's layer, and KL_t is the mean KL(float || perturbed) over the positions. t's
output error under its calibration Hessian, e_t(c) = sum over rows of dW H dW^T, gives
its gain g_t = KL_t / e_t(PROBE_TYPE): what a unit of that matrix's output error costs at
the logits. Each candidate type c is predicted to cost g_t * e_t(c), e_t(c) measured on a
sample of rows with the importance-weighted quantizer; with --method gptq scaled by the
ratio of GPTQ's error to that quantizer's, measured on one type of each block size (32,
256), since GPTQ for every candidate would cost more than the rest together. The KL is quadratic in small perturbations and
the matrices' errors are nearly independent, so the costs add.

Allocation. Minimize sum_t g_t e_t(c_t) subject to sum_t bits(c_t) n_t <= B * N (N: every
value in the file, vectors included, so B is the bits per weight the converter prints): a
Lagrangian sweep finds the best plan on the lower convex hull of each tensor's
(bits, cost) options, then what is left of the budget goes to the upgrades that buy the
most predicted KL per bit.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

import formats
from engine.convert.mixes import MIXES, bits_per_weight, block_size
from engine.convert.plan import Plan
from engine.errors import ConvertError

T = formats.GGMLType
PROBE_TYPE = T.Q4_0      # the rounding whose KL is measured; rows of 32 fit every model
PROBE_TOKENS = 64        # positions of the probe text
SAMPLE_ROWS = 128        # rows of each matrix whose errors are measured per candidate
ALLOC_UNITS = 20000      # steps the budget is cut into for the allocation
# the types auto chooses from (those whose block divides a tensor's rows)
CANDIDATES = (T.Q3_K, T.IQ4_XS, T.Q4_0, T.IQ4_NL, T.Q4_1, T.Q4_K, T.Q5_0, T.Q5_1, T.Q5_K,
              T.Q6_K, T.Q8_0)


@dataclass
class Choice:
    """One tensor's options and the type chosen."""
    name: str
    n_elements: int
    gain: float                                   # KL per unit of output error
    kl_probe: float                               # measured KL of PROBE_TYPE alone
    errors: dict = field(default_factory=dict)    # type -> output error (whole tensor)
    type: T | None = None

    def cost(self, t: T) -> float:
        return self.gain * self.errors[t]

    def bits(self, t: T) -> float:
        return bits_per_weight(t) * self.n_elements


def candidates(n_cols: int, types=CANDIDATES) -> list:
    return [t for t in types if n_cols % block_size(t) == 0]


def _sample(n_rows: int) -> np.ndarray:
    return np.unique(np.linspace(0, n_rows - 1, min(n_rows, SAMPLE_ROWS)).round().astype(int))


def _output_error(w, q, t, h, rows, n_rows) -> float:
    """sum over the sampled rows of dW H dW^T, scaled to the whole tensor; a stack of
    Hessians gives each group of rows its own."""
    e = w.astype(np.float64) - formats.dequantize(q, t, w.shape).astype(np.float64)
    if h.ndim == 3:
        group = rows // (n_rows // h.shape[0])
        total = sum(float(np.sum((e[group == g] @ h[g]) * e[group == g]))
                    for g in np.unique(group))
    else:
        total = float(np.sum((e @ h) * e))
    return total * n_rows / len(rows)


def _round(w, t, h, fact, imatrix, method, rows, n_rows):
    """The sampled rows w rounded into t as the conversion will round them."""
    from engine.convert.gptq import GPTQ
    if method == "gptq" and h is not None:
        if h.ndim == 3:
            per = n_rows // h.shape[0]
            return np.concatenate([GPTQ(h[g], t, fact=fact[g]).quantize(w[rows // per == g])
                                   for g in np.unique(rows // per)])
        return GPTQ(h, t, fact=fact).quantize(w)
    if imatrix is not None:
        return formats.quantize_weighted(w, t, imatrix)
    return formats.quantize(w, t)


class _Probe:
    """The float reference on the probe tokens with each layer's input cached, to measure
    the KL of one tensor's rounding from that tensor's layer on."""

    def __init__(self, model_path, tokens):
        from engine.reference import ReferenceModel
        self.m = m = ReferenceModel(model_path, emulate_q8=False, exact=False)
        self.tokens = np.asarray(tokens)
        x = m.token_embd[self.tokens] * np.float32(m.config.embd_scale)
        self.inputs = [x]
        for i in range(m.config.n_layer):
            x = m.layer(i, x)
            self.inputs.append(x)
        self.base = self._log_probs(x)

    def _log_probs(self, x):
        from engine.perplexity import log_softmax
        return log_softmax(self.m.logits(x).astype(np.float64))

    def _kl(self, x) -> float:
        p = np.exp(self.base)
        return float(np.mean(np.sum(p * (self.base - self._log_probs(x)), axis=-1)))

    def kl(self, name: str, w: np.ndarray) -> float:
        """Mean KL with tensor `name`'s values replaced by w (its whole 2-D matrix)."""
        m = self.m
        if name == "token_embd.weight" or name == "output.weight":
            swapped = [m.output] if (name == "output.weight" or m.config.tied_output) else []
            saved = [(lin, lin.w) for lin in swapped]
            for lin in swapped:
                lin.w = w
            try:
                if name == "output.weight":
                    return self._kl(self.inputs[-1])
                embd, m.token_embd = m.token_embd, w
                try:
                    x = m.token_embd[self.tokens] * np.float32(m.config.embd_scale)
                    for i in range(m.config.n_layer):
                        x = m.layer(i, x)
                    return self._kl(x)
                finally:
                    m.token_embd = embd
            finally:
                for lin, old in saved:
                    lin.w = old
        i = int(name.split(".")[1])
        layer = m.layers[i]
        saved = []
        for attr, lin in vars(layer).items():
            if getattr(lin, "name", None) == name:
                saved.append((lin, lin.w))
                lin.w = w[lin.first:lin.first + lin.w.shape[0]]
        if not saved:
            raise ConvertError(f"--type auto: {name} is not a matrix of layer {i}")
        try:
            x = self.inputs[i]
            for j in range(i, m.config.n_layer):
                x = m.layer(j, x)
            return self._kl(x)
        finally:
            for lin, old in saved:
                lin.w = old


def measure(plan: Plan, model_path, calibration, tokens, method: str = "imatrix",
            quiet: bool = False, types=CANDIDATES) -> list:
    """Every 2-D tensor's Choice (gain and per-candidate errors); see the module's doc."""
    from tqdm import tqdm

    from engine.convert.gptq import factor
    probe = _Probe(model_path, tokens)
    hessians = calibration.hessians
    out = []
    matrices = [tp for tp in plan.tensors if len(tp.shape) == 2]
    for tp in tqdm(matrices, desc="sensitivity", unit="tensor", disable=quiet,
                   file=sys.stderr, leave=False):
        h = hessians.get(tp.name)
        if h is None:
            raise ConvertError(f"--type auto: the calibration has no Hessian for {tp.name}")
        n_rows, n = tp.shape
        fits = candidates(n, types)
        if not fits:
            raise ConvertError(f"--type auto: {tp.name}'s rows of {n} fit none of the types "
                               f"{', '.join(t.name for t in types)}")
        imatrix = calibration.imatrix.importance(tp.name)
        w_all = tp.read_rows(0, n_rows).reshape(n_rows, n).astype(np.float32)
        rows = _sample(n_rows)
        w = w_all[rows]
        probe_q = formats.quantize(w_all, PROBE_TYPE)
        kl = probe.kl(tp.name, formats.dequantize(probe_q, PROBE_TYPE, w_all.shape))
        kl = max(kl, 0.0)  # a KL below 0 is float rounding of a zero one
        e_probe = _output_error(w, probe_q[rows], PROBE_TYPE, h, rows, n_rows)
        c = Choice(tp.name, tp.n_elements, kl / e_probe if e_probe > 0 else 0.0, kl)
        for t in fits:
            c.errors[t] = _output_error(w, _round(w, t, None, None, imatrix, "imatrix", rows,
                                                  n_rows), t, h, rows, n_rows)
        if method == "gptq" and tp.name != "token_embd.weight":
            # GPTQ's errors from one run per family of blocks: its ratio to the weighted
            # quantizer's error, measured on the family's first candidate, scales the rest
            fact = factor(h)
            for family in ([t for t in fits if block_size(t) == 32],
                           [t for t in fits if block_size(t) == 256]):
                if family:
                    t0 = family[0]
                    q = _round(w, t0, h, fact, imatrix, "gptq", rows, n_rows)
                    ratio = _output_error(w, q, t0, h, rows, n_rows) / max(c.errors[t0], 1e-30)
                    for t in family:
                        c.errors[t] *= ratio
        out.append(c)
        del w_all
    return out


def allocate(choices: list, budget_bits: float) -> None:
    """Set each Choice's type: least total predicted cost within budget_bits."""
    options = {}
    for c in choices:
        # the options not dominated: a type costing as much as a smaller one is out
        opts = sorted(c.errors, key=c.bits)
        hull = []
        for t in opts:
            if hull and c.cost(t) >= c.cost(hull[-1]):
                continue
            hull.append(t)
        options[c.name] = hull
    least = sum(c.bits(options[c.name][0]) for c in choices)
    if least > budget_bits:
        raise ConvertError(f"--target-bpw is below what the smallest types reach "
                           f"({least:.4g} bits for these matrices)")
    # dynamic programming over the budget in ALLOC_UNITS steps (each option's bits rounded
    # up, so the plan found fits): best[u] = least cost of the tensors so far in <= u units
    unit = budget_bits / ALLOC_UNITS
    best = np.zeros(ALLOC_UNITS + 1)
    picks = np.empty((len(choices), ALLOC_UNITS + 1), np.int16)
    widths = []
    for k, c in enumerate(choices):
        new = np.full(ALLOC_UNITS + 1, np.inf)
        arg = np.full(ALLOC_UNITS + 1, -1, np.int16)
        w_k = [int(np.ceil(c.bits(t) / unit)) for t in options[c.name]]
        for j, (t, w) in enumerate(zip(options[c.name], w_k)):
            if w > ALLOC_UNITS:
                continue
            cand = np.full(ALLOC_UNITS + 1, np.inf)
            cand[w:] = best[:ALLOC_UNITS + 1 - w] + c.cost(t)
            better = cand < new
            new[better], arg[better] = cand[better], j
        best, picks[k] = new, arg
        widths.append(w_k)
    if not np.isfinite(best[-1]):  # the rounding up took the last sliver: smallest types
        sel = {c.name: options[c.name][0] for c in choices}
    else:
        sel, u = {}, ALLOC_UNITS
        for k in range(len(choices) - 1, -1, -1):
            j = int(picks[k][u])
            sel[choices[k].name] = options[choices[k].name][j]
            u -= widths[k][j]

    def total(sel):
        return sum(c.bits(sel[c.name]) for c in choices)
    left = budget_bits - total(sel)
    by_name = {c.name: c for c in choices}
    while True:  # spend what is left on the upgrades with the most saved cost per bit
        up, up_rate = None, 0.0
        for name, t in sel.items():
            c = by_name[name]
            for v in options[name]:
                extra = c.bits(v) - c.bits(t)
                if 0 < extra <= left:
                    rate = (c.cost(t) - c.cost(v)) / extra
                    if rate > up_rate:
                        up, up_rate = (name, v, extra), rate
        if up is None:
            break
        sel[up[0]] = up[1]
        left -= up[2]
    for c in choices:
        c.type = sel[c.name]


def assign(plan: Plan, model_path, calibration, tokens, target_bpw: float,
           method: str = "imatrix", quiet: bool = False, types=CANDIDATES) -> list:
    """Choose and set every 2-D tensor's type in `plan` for target_bpw; returns the
    Choices (the plan to print)."""
    if not (isinstance(target_bpw, (int, float)) and np.isfinite(target_bpw)
            and target_bpw > 0):
        raise ConvertError(f"--target-bpw must be a positive number, got {target_bpw!r}")
    choices = measure(plan, model_path, calibration, tokens, method, quiet, types)
    n_total = sum(tp.n_elements for tp in plan.tensors)
    fixed = sum(8.0 * tp.out_nbytes for tp in plan.tensors if len(tp.shape) != 2)
    allocate(choices, target_bpw * n_total - fixed)
    chosen = {c.name: c.type for c in choices}
    for tp in plan.tensors:
        if tp.name in chosen:
            tp.out_type = chosen[tp.name]
            tp.raw = None
            tp.note = None
    # general.file_type: the type that holds the most weights
    weight = {}
    for c in choices:
        weight[c.type] = weight.get(c.type, 0) + c.n_elements
    main = max(weight, key=weight.get)
    plan.metadata["general.file_type"] = int(next(
        m.file_type for m in MIXES.values() if m.default == main))
    return choices


def describe(choices: list) -> list[str]:
    """The plan as lines: tensor, type, its bits, the measured gain and predicted KL."""
    width = max(len(c.name) for c in choices)
    lines = [f"{'tensor':<{width}}  type    bpw   KL({PROBE_TYPE.name} alone)  predicted KL"]
    for c in choices:
        lines.append(f"{c.name:<{width}}  {c.type.name:<6} {bits_per_weight(c.type):5.2f}  "
                     f"{c.kl_probe:17.5f}  {c.cost(c.type):12.5f}")
    lines.append(f"predicted total KL {sum(c.cost(c.type) for c in choices):.4f} "
                 f"(the sum of the matrices' costs)")
    return lines


__all__ = ["assign", "describe", "measure", "allocate", "Choice", "CANDIDATES"]
