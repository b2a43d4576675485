"""Perplexity of a model on a text, and its KL divergence from a base model, computed the
way llama.cpp's `llama-perplexity` does so the numbers compare:

- the whole text is tokenized once (with BOS when the file's add_bos_token says so) and
  cut into non-overlapping chunks of n_ctx tokens; the incomplete tail is dropped;
- when the model adds BOS, each chunk's first token is replaced by BOS;
- each chunk is evaluated teacher-forced from an empty context, and only its second half
  is scored: with first = n_ctx // 2, the logits of positions first..n_ctx-2 predict
  tokens first+1..n_ctx-1 (the early positions have too little context to be fair);
- PPL = exp(mean NLL) over every scored token, +/- PPL times the standard error of that
  mean (llama.cpp's estimate);
- with a base model (--kl-base): KL(base || model) per scored position, the share of
  positions where both models rank the same token first, and both perplexities
  (llama.cpp's --kl-divergence statistics). llama.cpp stores the base log-probabilities
  in 16 bits and skips base probabilities below e^-16; here every term is exact float64.

    from engine import LLM
    from engine.perplexity import perplexity
    r = perplexity(LLM("model.gguf", n_ctx=512), text, n_ctx=512)
    print(r.ppl, r.ppl_err)
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import KilnError

MIN_CTX = 3  # the smallest chunk that scores a token: n_ctx - 1 - n_ctx // 2 >= 1
ROWS_PER_BLOCK = 32  # log-softmax this many positions at once (float64 temporaries stay small)


class PerplexityError(KilnError):
    """A perplexity run that cannot be done as asked: text too short, bad n_ctx,
    unreadable text file, base model with another vocabulary."""


@dataclass
class KLDivergence:
    """How far the model's next-token distributions are from the base model's, over the
    scored positions (llama.cpp's --kl-divergence statistics)."""
    mean_kl: float               # mean KL(base || model), nats
    kl_err: float                # standard error of that mean
    kl_max: float
    kl_p99: float                # 99th percentile
    kl_median: float
    top1_agreement: float        # share of positions whose top token is the same (0..1)
    top1_agreement_err: float
    base_ppl: float
    base_ppl_err: float
    ln_ppl_ratio: float          # mean ln(PPL(model) / PPL(base)) = mean NLL difference
    ln_ppl_ratio_err: float


@dataclass
class PerplexityResult:
    ppl: float
    ppl_err: float               # llama.cpp's +/-: PPL x standard error of the mean NLL
    n_chunks: int                # chunks evaluated
    n_ctx: int                   # tokens per chunk
    n_tokens: int                # tokens of the whole text
    n_tokens_scored: int
    seconds: float = 0.0         # evaluation time (both models)
    chunk_ppls: list[float] = field(default_factory=list)  # running estimate after each chunk
    kl: KLDivergence | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        kl = d.pop("kl")
        if kl is not None:
            d.update(kl)
        return d


def read_text(path) -> str:
    """A text file's contents as `llama-perplexity -f` reads them (one trailing newline
    dropped). Missing, unreadable or non-UTF-8 files raise PerplexityError."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise PerplexityError(f"text file not found: {path}") from None
    except IsADirectoryError:
        raise PerplexityError(f"{path} is a directory, not a text file") from None
    except OSError as e:
        raise PerplexityError(f"cannot read text file {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PerplexityError(f"{path} is not UTF-8 text (invalid byte at offset {e.start})") from None
    return text[:-1] if text.endswith("\n") else text


def mean_and_err(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error, as llama.cpp computes them:
    sqrt((mean(v^2) - mean(v)^2) / (n - 1)); the error is 0 below two values."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    mean = float(np.mean(values))
    var = float(np.mean(np.square(values))) - mean * mean
    return mean, (math.sqrt(var / (n - 1)) if n > 1 and var > 0 else 0.0)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def check_n_ctx(n_ctx: int, n_ctx_train: int | None = None) -> None:
    """Refuse a chunk size that scores nothing or exceeds what the model was trained on."""
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer)) or n_ctx < MIN_CTX:
        raise PerplexityError(f"--ctx must be an integer >= {MIN_CTX} (the second half of each "
                              f"chunk is scored), got {n_ctx!r}")
    if n_ctx_train and n_ctx > n_ctx_train:
        raise PerplexityError(f"--ctx {n_ctx} is longer than the model's training context "
                              f"({n_ctx_train} tokens)")


def _n_ctx_train(llm) -> int | None:
    cfg = getattr(getattr(llm, "model", None), "config", None)
    return getattr(cfg, "n_ctx_train", None)


def check_same_vocab(llm, base) -> None:
    """KL divergence compares distributions token by token: both models need one vocabulary."""
    a, b = llm.tokenizer.vocab.tokens, base.tokenizer.vocab.tokens
    if a != b:
        where = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise PerplexityError(
            f"the base model's vocabulary differs from the model's ({len(b)} vs {len(a)} "
            f"tokens, first difference at id {where}): KL divergence needs the same tokenizer")
    if llm.model.config.n_vocab != base.model.config.n_vocab:
        raise PerplexityError(f"the base model has {base.model.config.n_vocab} output logits, "
                              f"the model {llm.model.config.n_vocab}: KL divergence needs the same")


def split_chunks(tokens: list[int], n_ctx: int, bos_id: int | None, n_chunks: int | None = None) -> np.ndarray:
    """(n_chunks, n_ctx) token ids: consecutive non-overlapping chunks, tail dropped, each
    chunk's first token set to bos_id when it is not None."""
    n_max = len(tokens) // n_ctx
    if n_max < 1:
        raise PerplexityError(f"the text is {len(tokens)} tokens, shorter than one chunk of "
                              f"--ctx {n_ctx} tokens: use a longer text or a smaller --ctx")
    n = n_max if n_chunks is None else min(n_chunks, n_max)
    chunks = np.asarray(tokens[: n * n_ctx], dtype=np.int64).reshape(n, n_ctx)
    if bos_id is not None:
        chunks[:, 0] = bos_id
    return chunks


def _scored_log_probs(llm, chunk: np.ndarray, first: int):
    """Yield blocks of float64 log-probabilities for positions first..n_ctx-2 of a chunk."""
    logits = llm.logits(chunk.tolist())[first:-1]
    for i in range(0, len(logits), ROWS_PER_BLOCK):
        yield log_softmax(logits[i:i + ROWS_PER_BLOCK])


def perplexity(llm, text: str, n_ctx: int = 512, base=None, n_chunks: int | None = None,
               progress=None) -> PerplexityResult:
    """Perplexity of `llm` (an engine.LLM) on `text`, in chunks of n_ctx tokens; with
    `base` (another LLM on the same vocabulary) also the KL divergence from it.
    n_chunks None = every whole chunk of the text. progress(result_so_far, n_chunks_total)
    is called after each chunk."""
    check_n_ctx(n_ctx, _n_ctx_train(llm))
    if n_chunks is not None and (isinstance(n_chunks, bool) or n_chunks < 1):
        raise PerplexityError(f"the number of chunks must be >= 1, got {n_chunks!r}")
    for m, what in ((llm, "model"), (base, "base model")):
        if m is not None and m.n_ctx < n_ctx:
            raise PerplexityError(f"the {what} was loaded with a context of {m.n_ctx} tokens, "
                                  f"less than the chunk size {n_ctx}")
    if base is not None:
        check_same_vocab(llm, base)

    tokens = llm.tokenize(text)   # the file's add_bos_token decides BOS; special text stays text
    tok = llm.tokenizer
    chunks = split_chunks(tokens, n_ctx, tok.bos_id if tok.add_bos else None, n_chunks)
    first = n_ctx // 2
    nll, base_nll, kl, same_top = [], [], [], []
    result = None
    t0 = time.perf_counter()
    for chunk in chunks:
        targets = chunk[first + 1:]
        rows = np.arange(ROWS_PER_BLOCK)
        blocks = _scored_log_probs(llm, chunk, first)
        base_blocks = _scored_log_probs(base, chunk, first) if base is not None else None
        for i, lp in enumerate(blocks):
            t = targets[i * ROWS_PER_BLOCK: i * ROWS_PER_BLOCK + len(lp)]
            r = rows[:len(lp)]
            nll.append(-lp[r, t])
            if base_blocks is not None:
                blp = next(base_blocks)
                base_nll.append(-blp[r, t])
                kl.append((np.exp(blp) * (blp - lp)).sum(axis=-1))
                same_top.append(blp.argmax(axis=-1) == lp.argmax(axis=-1))
        result = _result(nll, base_nll, kl, same_top, n_ctx, len(tokens),
                         time.perf_counter() - t0, result)
        if progress is not None:
            progress(result, len(chunks))
    return result


def _result(nll, base_nll, kl, same_top, n_ctx, n_tokens, seconds, previous) -> PerplexityResult:
    """The statistics over every position scored so far."""
    nll = np.concatenate(nll)
    mean_nll, nll_err = mean_and_err(nll)
    ppl = math.exp(mean_nll)
    chunk_ppls = (previous.chunk_ppls if previous else []) + [ppl]
    res = PerplexityResult(ppl=ppl, ppl_err=ppl * nll_err, n_chunks=len(chunk_ppls), n_ctx=n_ctx,
                           n_tokens=n_tokens, n_tokens_scored=len(nll), seconds=seconds,
                           chunk_ppls=chunk_ppls)
    if kl:
        base_nll, kl, same_top = (np.concatenate(x) for x in (base_nll, kl, same_top))
        # KL is >= 0; float64 rounding can leave -1e-17 where the models agree exactly.
        kl = np.maximum(kl, 0.0)
        mean_base, base_err = mean_and_err(base_nll)
        ratio, ratio_err = mean_and_err(nll - base_nll)
        mean_kl, kl_err = mean_and_err(kl)
        top1, top1_err = mean_and_err(same_top.astype(np.float64))
        res.kl = KLDivergence(
            mean_kl=mean_kl, kl_err=kl_err, kl_max=float(kl.max()),
            kl_p99=float(np.percentile(kl, 99)), kl_median=float(np.median(kl)),
            top1_agreement=top1, top1_agreement_err=top1_err,
            base_ppl=math.exp(mean_base), base_ppl_err=math.exp(mean_base) * base_err,
            ln_ppl_ratio=ratio, ln_ppl_ratio_err=ratio_err)
    return res
