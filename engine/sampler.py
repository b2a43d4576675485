"""Token sampling: llama.cpp's default chain, in NumPy.

Order and defaults follow llama.cpp's `common_sampler` chain: repetition penalty over the
last `penalty_last_n` tokens, then top-k, top-p, min-p, temperature, and a draw from the
softmax of what is left. Top-p and min-p therefore see the untempered distribution and
temperature only reshapes the survivors. `temperature=0` is greedy: the argmax of the
penalized logits, with no random draw.

Each filter works on a *candidate set* (token ids plus their logits) so that after top-k
the later steps touch 40 values, not the whole vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PENALTY_LAST_N = 64  # llama.cpp's default `penalty_last_n`


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling settings (llama.cpp's defaults)."""
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    penalty_last_n: int = PENALTY_LAST_N

    def __post_init__(self):
        _check_real("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)):
            raise ValueError(f"top_k must be an integer (0 = disabled), got {self.top_k!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = disabled), got {self.top_k}")
        _check_real("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = disabled), got {self.top_p}")
        _check_real("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 = disabled), got {self.min_p}")
        _check_real("repeat_penalty", self.repeat_penalty)
        if self.repeat_penalty <= 0:
            raise ValueError(f"repeat_penalty must be > 0 (1 = disabled), got {self.repeat_penalty}")
        if isinstance(self.penalty_last_n, bool) or not isinstance(self.penalty_last_n, (int, np.integer)) \
                or self.penalty_last_n < 0:
            raise ValueError(f"penalty_last_n must be an integer >= 0, got {self.penalty_last_n!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check_real(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def check_seed(seed):
    """A seed is None (fresh entropy) or an int >= 0; anything else is a ValueError."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}")
    return int(seed)


# The one place the sampling defaults live: generate()'s signature, the chat session's
# settings and the CLI's flags all read them from here.
DEFAULT_SAMPLING = SamplingParams()
# The knobs generate(), the chat and the CLI take (penalty_last_n is fixed).
SAMPLING_KNOBS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty")


def sampling_defaults() -> dict:
    """{knob: default} for the knobs in SAMPLING_KNOBS."""
    return {k: getattr(DEFAULT_SAMPLING, k) for k in SAMPLING_KNOBS}


# --- the filters, each on a candidate set (ids, logits), both 1-D and aligned -------------

def apply_repeat_penalty(logits: np.ndarray, recent_tokens, penalty: float) -> np.ndarray:
    """llama.cpp's repetition penalty: each distinct recent token's logit is divided by
    `penalty` if positive, multiplied if not (so it always moves down for penalty > 1).
    Returns a new array; `logits` is the full vocabulary row."""
    if penalty == 1.0 or len(recent_tokens) == 0:
        return logits
    out = logits.copy()
    ids = np.unique(np.asarray(recent_tokens, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < out.shape[0])]
    vals = out[ids]
    out[ids] = np.where(vals <= 0, vals * penalty, vals / penalty)
    return out


def top_k(ids: np.ndarray, logits: np.ndarray, k: int):
    """Keep the k highest logits, sorted descending (k = 0 or k >= n: keep all, sorted)."""
    n = logits.shape[0]
    if 0 < k < n:
        part = np.argpartition(-logits, k - 1)[:k]
        ids, logits = ids[part], logits[part]
    order = np.argsort(-logits, kind="stable")
    return ids[order], logits[order]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits.astype(np.float64) - np.max(logits))
    return z / z.sum()


def top_p(ids: np.ndarray, logits: np.ndarray, p: float):
    """Keep the smallest prefix (of candidates sorted descending) whose probability sums
    to >= p, and at least one token."""
    if p >= 1.0:
        return ids, logits
    cum = np.cumsum(softmax(logits))
    # first index where the running sum reaches p; that token is kept too
    last = int(np.searchsorted(cum, p, side="left")) + 1
    last = min(max(last, 1), logits.shape[0])
    return ids[:last], logits[:last]


def min_p(ids: np.ndarray, logits: np.ndarray, p: float):
    """Keep tokens whose probability is at least p times the most likely one's."""
    if p <= 0.0:
        return ids, logits
    keep = logits >= logits.max() + math.log(p)
    return ids[keep], logits[keep]


class Sampler:
    """Picks the next token from a row of logits. Owns the RNG of one generate() call, so
    the same seed and the same logits give the same tokens on any thread count."""

    def __init__(self, params: SamplingParams | None = None, seed: int | None = None):
        self.params = params or SamplingParams()
        self.seed = check_seed(seed)
        self.rng = np.random.default_rng(self.seed)

    def candidates(self, logits: np.ndarray, recent_tokens=()):
        """The (ids, probabilities) the draw is made from, sorted by probability descending."""
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)
        if p.penalty_last_n:
            recent = list(recent_tokens)[-p.penalty_last_n:]
            logits = apply_repeat_penalty(logits, recent, p.repeat_penalty)
        if p.greedy:
            best = int(np.argmax(logits))
            return np.array([best]), np.array([1.0])
        ids, cand = top_k(np.arange(logits.shape[0]), logits, p.top_k)
        ids, cand = top_p(ids, cand, p.top_p)
        ids, cand = min_p(ids, cand, p.min_p)
        return ids, softmax(cand / p.temperature)

    def sample(self, logits: np.ndarray, recent_tokens=()) -> int:
        ids, probs = self.candidates(logits, recent_tokens)
        if ids.shape[0] == 1:
            return int(ids[0])
        # Inverse-CDF draw on one uniform: one RNG step per token, whatever the set size.
        u = self.rng.random()
        i = int(np.searchsorted(np.cumsum(probs), u, side="right"))
        return int(ids[min(i, ids.shape[0] - 1)])
