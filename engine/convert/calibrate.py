"""Calibration: the importance matrix of a model on a text (`kiln imatrix`, and
`kiln convert --calibration`), accumulated as llama.cpp's llama-imatrix does, and for
`--method gptq` the Hessians of the matrices' inputs (the sum of x x^T over the rows).

The text is tokenized once and cut into chunks of n_ctx tokens (the tail dropped; each
chunk's first token BOS when the model adds one, as llama-imatrix and llama-perplexity
do); each chunk runs through the NumPy reference model (engine.reference, float weights)
from an empty context, and for every matrix of every layer the activations it multiplies
are summed column by column as squares (attn_q/k/v share one input, as do ffn_gate and
ffn_up; each gets its own entry, as in llama-imatrix), with the count of rows. The
reference runs with exact=False (float32 attention and FFN, all heads at once): importance
is a statistic of the model's values, not of an engine's last bits. Matrices that read the
same input (attn_q/k/v, ffn_gate/up) share one Hessian, computed once; attn_v's is
weighted (below).

attn_v's error reaches the output through the attention average: a query's output moves
by sum_t p(q, t) dV x_t, so the error of token t's value counts with sum_q p(q, t)^2, the
squared attention it receives. That weight is far from uniform: the first token of a
sequence takes most of many heads' attention (an attention sink), so an unweighted Hessian
lets GPTQ trade that token's values for the others'. attn_v gets one Hessian per KV head,
each token's row weighted by the attention its heads give it (summed over the group's
query heads, scaled to a mean of 1): (n_head_kv, n, n). The output matrix (token_embd when
tied) gets the Hessian of the normed final states too (`--type auto` sizes its errors). Only `blk.*` matrices are recorded (llama-imatrix without
--process-output): token_embd is a lookup, and output is left out by default.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

import formats
from engine.errors import KilnError
from formats.imatrix import Imatrix


class CalibrationError(KilnError):
    """A calibration that cannot run as asked (text too short, bad --ctx / --chunks)."""


@dataclass
class Calibration:
    """What a calibration text tells about a model: the importance matrix, and with
    hessians=True, for each matrix the sum of x x^T over its input rows (float64 (n, n);
    matrices reading one input share the array; the row count is imatrix.counts)."""
    imatrix: Imatrix
    hessians: dict = field(default_factory=dict)
    tokens: np.ndarray | None = None        # the first chunk (auto's probe text)


class _LayerInputs:
    """The Hessian of each distinct input one layer's matrices read: q, k and v get the
    same array object, and so do gate and up, so it is computed once for each."""

    def __init__(self, hessians: dict | None, weighted: dict):
        self.hessians, self.last, self.last_h = hessians, None, None
        self.weighted, self.pending_v = weighted, None

    def attention(self, probs: np.ndarray, n_head_kv: int) -> None:
        """The layer's attention probabilities (n_head, n, n): weight attn_v's rows."""
        if self.pending_v is None:
            return
        x, name = self.pending_v
        self.pending_v = None
        n_head, n, _ = probs.shape
        w = np.square(probs, dtype=np.float64).sum(axis=1)          # (n_head, n keys)
        w = w.reshape(n_head_kv, n_head // n_head_kv, n).sum(axis=1)
        w *= n / np.maximum(w.sum(axis=1, keepdims=True), 1e-30)
        xf = np.ascontiguousarray(x, np.float32)
        h = np.stack([(xf * wj[:, None].astype(np.float32)).T @ xf for wj in w])
        if name in self.weighted:
            self.weighted[name] += h
        else:
            self.weighted[name] = h.astype(np.float64)

    def hessian_of(self, x2: np.ndarray, name: str) -> None:
        if self.hessians is None:
            return
        if self.last is not x2:
            xf = np.ascontiguousarray(x2, np.float32)
            h = (xf.T @ xf).astype(np.float64)
            prev = self.hessians.get(name)
            self.last, self.last_h = x2, (h if prev is None else prev.__iadd__(h))
        self.hessians[name] = self.last_h


class _Recorder:
    """Wraps a reference Linear: accumulates the sum of squares of its input columns (and
    its input's Hessian)."""

    def __init__(self, linear, sums: dict, counts: dict, inputs: _LayerInputs):
        self.linear, self.sums, self.counts, self.inputs = linear, sums, counts, inputs
        self.name = linear.name

    def __call__(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        xd = np.asarray(x2, np.float64)
        s = np.einsum("ij,ij->j", xd, xd)
        if self.name in self.sums:
            self.sums[self.name] += s
            self.counts[self.name] += x2.shape[0]
        else:
            self.sums[self.name] = s
            self.counts[self.name] = x2.shape[0]
        self.inputs.hessian_of(x, self.name)
        if self.inputs.hessians is not None and self.name.endswith(".attn_v.weight"):
            self.inputs.pending_v = (x, self.name)
        return self.linear(x)


def _instrument(model, sums: dict, counts: dict, hessians: dict | None,
                weighted: dict) -> list:
    """Replace every Linear of every layer by a recorder of its inputs; returns each
    layer's _LayerInputs."""
    from engine.reference import Linear
    per_layer = []
    for layer in model.layers:
        inputs = _LayerInputs(hessians, weighted)
        per_layer.append(inputs)
        for attr, value in list(vars(layer).items()):
            if isinstance(value, Linear) and (value.name or "").startswith("blk."):
                setattr(layer, attr, _Recorder(value, sums, counts, inputs))
    return per_layer


def collect_imatrix(model_path, text: str, n_ctx: int = 512, n_chunks: int | None = None,
                    dataset: str | None = None, quiet: bool = False) -> Imatrix:
    """The importance matrix of the GGUF model at `model_path` on `text`."""
    return calibrate(model_path, text, n_ctx, n_chunks, dataset, quiet).imatrix


def calibrate(model_path, text: str, n_ctx: int = 512, n_chunks: int | None = None,
              dataset: str | None = None, quiet: bool = False,
              hessians: bool = False) -> Calibration:
    """Run the GGUF model at `model_path` over `text` and collect its Calibration."""
    from tqdm import tqdm

    from engine.perplexity import PerplexityError, split_chunks
    from engine.reference import ReferenceModel, rms_norm
    from engine.tokenizer import load_tokenizer
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer)) or n_ctx < 1:
        raise CalibrationError(f"--ctx must be a positive integer, got {n_ctx!r}")
    if n_chunks is not None and (isinstance(n_chunks, bool) or n_chunks < 1):
        raise CalibrationError(f"--chunks must be >= 1, got {n_chunks!r}")
    with formats.read_gguf(model_path) as f:
        tok = load_tokenizer(f.metadata)
    tokens = tok.encode(text)
    try:
        chunks = split_chunks(tokens, n_ctx, tok.bos_id if tok.add_bos else None, n_chunks)
    except PerplexityError as e:
        raise CalibrationError(str(e)) from None
    model = ReferenceModel(model_path, emulate_q8=False, exact=False)
    out_name = "output.weight" if model.config.untied_output else "token_embd.weight"
    sums: dict = {}
    counts: dict = {}
    hess: dict | None = {} if hessians else None
    weighted: dict = {}
    per_layer = _instrument(model, sums, counts, hess, weighted)
    current = [None]
    if hessians:
        model.attention_probe = lambda p: current[0].attention(p, model.config.n_head_kv)
    with tqdm(total=len(chunks) * n_ctx, unit="tok", disable=quiet,
              desc="calibration" if hessians else "imatrix",
              file=sys.stderr, leave=False) as bar:
        for chunk in chunks:
            x = model.token_embd[chunk] * np.float32(model.config.embd_scale)
            for i in range(model.config.n_layer):
                current[0] = per_layer[i]
                x = model.layer(i, x)
            if hess is not None:  # the output matrix's input, for the sensitivity of auto
                h = np.ascontiguousarray(rms_norm(x, model.output_norm, model.config.rms_eps))
                hess[out_name] = hess.get(out_name, 0.0) + (h.T @ h).astype(np.float64)
            bar.update(n_ctx)
    im = Imatrix(datasets=[dataset] if dataset else [], chunk_count=len(chunks),
                 chunk_size=n_ctx)
    for name in sorted(sums):
        im.sums[name] = sums[name][None, :]
        im.counts[name] = np.array([counts[name]], np.float64)
    if hess:
        hess.update(weighted)
    return Calibration(im, hess or {}, np.asarray(chunks[0]))
