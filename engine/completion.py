"""What one generate() call produces and how it ends: the Completion and its Timings,
and the stop-string matching. A leaf of the library: `llm` (generation) and `chat` (turns)
both use it and it imports neither."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Timings:
    """Where the time of one generate() call went. `prompt_tokens_evaluated` is what the
    model actually ran after reusing the cached prefix."""
    prompt_tokens: int = 0
    prompt_tokens_evaluated: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens_evaluated / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generation speed: generated tokens per second of generation time."""
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens,
                "prompt_tokens_evaluated": self.prompt_tokens_evaluated,
                "prompt_seconds": self.prompt_seconds,
                "prompt_tokens_per_second": self.prompt_tokens_per_second,
                "generated_tokens": self.generated_tokens,
                "generation_seconds": self.generation_seconds,
                "tokens_per_second": self.tokens_per_second}


@dataclass
class Completion:
    """Result of a blocking generate(). `tokens` are the sampled ids (no prompt, no
    end-of-generation token); when a stop string ended the text, `text` is cut before it
    while `tokens` still holds every token that was sampled."""
    text: str
    tokens: list[int]
    finish_reason: str          # "stop" (end token or stop string) | "length"
    timings: Timings = field(default_factory=Timings)
    prompt_tokens: list[int] = field(default_factory=list)
    # per token of `tokens`: (log p(token), [(id, log p) of the most likely tokens]), when asked
    logprobs: list | None = None


def stop_list(stop) -> list[str]:
    """`stop` as generate() takes it (None, one string or several) as a list of strings."""
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else list(stop)
    for s in stop:
        if not isinstance(s, str):
            raise ValueError(f"stop must be a string or a list of strings, got {s!r}")
    return stop


class StopMatcher:
    """Holds back generated text that could still turn into a stop string, so a stop
    string is never emitted, even when split across tokens."""

    def __init__(self, stop):
        self.stop = [s for s in stop_list(stop) if s]
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was found)."""
        self.pending += piece
        if not self.stop:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        keep = self._longest_stop_prefix_suffix(self.pending)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
