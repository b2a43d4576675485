"""Calibration: the importance matrix of a model on a text (`kiln imatrix`, and
`kiln convert --calibration`), accumulated as llama.cpp's llama-imatrix does.

The text is tokenized once and cut into chunks of n_ctx tokens (the tail dropped; each
chunk's first token BOS when the model adds one, as llama-imatrix and llama-perplexity
do); each chunk runs through the NumPy reference model (engine.reference, float weights)
from an empty context, and for every matrix of every layer the activations it multiplies
are summed column by column as squares (attn_q/k/v share one input, as do ffn_gate and
ffn_up; each gets its own entry, as in llama-imatrix), with the count of rows. The
reference computes in float32/float64, close to any engine's arithmetic; importance is a
statistic, so that suffices. Only `blk.*` matrices are recorded (llama-imatrix without
--process-output): token_embd is a lookup, and output is left out by default.
"""
from __future__ import annotations

import sys
import time

import numpy as np

import formats
from engine.errors import KilnError
from formats.imatrix import Imatrix


class CalibrationError(KilnError):
    """A calibration that cannot run as asked (text too short, bad --ctx / --chunks)."""


class _Recorder:
    """Wraps a reference Linear: accumulates the sum of squares of its input columns."""

    def __init__(self, linear, sums: dict, counts: dict):
        self.linear, self.sums, self.counts = linear, sums, counts
        self.name = linear.name

    def __call__(self, x):
        x2 = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        s = np.einsum("ij,ij->j", x2, x2)
        if self.name in self.sums:
            self.sums[self.name] += s
            self.counts[self.name] += x2.shape[0]
        else:
            self.sums[self.name] = s
            self.counts[self.name] = x2.shape[0]
        return self.linear(x)


def _instrument(model, sums: dict, counts: dict) -> None:
    """Replace every Linear of every layer by a recorder of its inputs."""
    from engine.reference import Linear
    for layer in model.layers:
        for attr, value in list(vars(layer).items()):
            if isinstance(value, Linear) and (value.name or "").startswith("blk."):
                setattr(layer, attr, _Recorder(value, sums, counts))


def collect_imatrix(model_path, text: str, n_ctx: int = 512, n_chunks: int | None = None,
                    dataset: str | None = None, quiet: bool = False) -> Imatrix:
    """The importance matrix of the GGUF model at `model_path` on `text`."""
    from tqdm import tqdm

    from engine.perplexity import PerplexityError, split_chunks
    from engine.reference import ReferenceModel
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
    model = ReferenceModel(model_path, emulate_q8=False)
    sums: dict = {}
    counts: dict = {}
    _instrument(model, sums, counts)
    with tqdm(total=len(chunks) * n_ctx, unit="tok", desc="imatrix", disable=quiet,
              file=sys.stderr, leave=False) as bar:
        for chunk in chunks:
            x = model.token_embd[chunk]
            for i in range(model.config.n_layer):
                x = model.layer(i, x)
            bar.update(n_ctx)
    im = Imatrix(datasets=[dataset] if dataset else [], chunk_count=len(chunks),
                 chunk_size=n_ctx)
    for name in sorted(sums):
        im.sums[name] = sums[name][None, :]
        im.counts[name] = np.array([counts[name]], np.float64)
    return im
