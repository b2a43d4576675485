"""The Python API apps embed: `LLM(path).generate(...)`, streaming, stop strings, chat.

One LLM owns one model (weights + KV cache) and remembers which tokens its KV cache
holds, so a call whose prompt starts like the previous call's context only evaluates the
new tokens (what a chat or an app re-sending a growing prompt needs).
"""
from __future__ import annotations

import threading
import time

import numpy as np

from engine.chat import chat_completion
from engine.completion import Completion, StopMatcher, Timings
from engine.errors import ContextOverflowError, ModelError
from engine.model import Model
from engine.sampler import DEFAULT_SAMPLING, Sampler, SamplingParams, check_seed
from engine.tokenizer import load_tokenizer

DEFAULT_MAX_TOKENS = 256


def check_max_tokens(max_tokens):
    if max_tokens is None:
        return None
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 0:
        raise ValueError(f"max_tokens must be None (until the context is full) or an integer >= 0, "
                         f"got {max_tokens!r}")
    return int(max_tokens)


class LLM:
    """A GGUF model ready to generate text.

        llm = LLM("model.gguf", n_ctx=2048, n_threads=None)   # None = physical cores
        out = llm.generate("Once upon a time", max_tokens=64)
        for piece in llm.generate("Once upon a time", stream=True): print(piece, end="")
    """

    def __init__(self, model_path, n_ctx: int = 2048, n_threads: int | None = None, n_seq: int = 1):
        """n_seq > 1 gives the model more KV caches for a scheduler that drives
        generation_steps itself (the server's slots); generate() uses sequence 0."""
        self.model = Model(str(model_path), n_ctx=n_ctx, n_threads=n_threads, n_seq=n_seq)
        try:
            self.metadata = self.model.metadata
            self.tokenizer = load_tokenizer(self.metadata)
        except BaseException:
            self.model.close()
            raise
        self.model_path = str(model_path)
        self.n_ctx = self.model.n_ctx
        self.n_vocab = self.tokenizer.n_vocab
        # Tokens whose keys/values sit in the KV cache at positions 0..len-1.
        self._cache_tokens: list[int] = []
        # Every token the model has run, over the LLM's life (tests and chat assert on it).
        self.n_tokens_evaluated = 0
        self.last_completion: Completion | None = None
        self._active_call = 0
        self._closed = False
        # One model, one KV cache: a call from another thread waits while a call (or one
        # step of a stream) runs, so each sees the cache as its own; a call started while
        # a stream is unfinished makes that stream raise (the _active_call check).
        self._lock = threading.RLock()

    # --- lifetime ----------------------------------------------------------------------
    def close(self):
        with self._lock:
            if not self._closed:
                self._closed = True
                self._cache_tokens = []
                self.model.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self):
        if self._closed:
            raise RuntimeError("this LLM is closed")

    @property
    def n_threads(self) -> int:
        return self.model.n_threads

    @property
    def cached_tokens(self) -> tuple[int, ...]:
        """The tokens whose KV cache entries are valid, in order."""
        return tuple(self._cache_tokens)

    @property
    def last_timings(self) -> Timings | None:
        """Timings of the last finished generate() (a stream's, once it is exhausted)."""
        return self.last_completion.timings if self.last_completion else None

    def reset(self):
        """Forget the KV cache: the next call evaluates its whole prompt."""
        self._cache_tokens = []

    # --- tokens ------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = False,
                 plain_spans=()) -> list[int]:
        """Text -> token ids. add_bos None = the file's default; special=True lets text such
        as `<|im_start|>` become its special token (off for untrusted user text), except
        inside plain_spans ((start, end) ranges of text, e.g. messages in a chat prompt)."""
        return self.tokenizer.encode(text, add_bos=add_bos, special=special, plain_spans=plain_spans)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, (bytes, bytearray, memoryview)):
            # Text as UTF-8 bytes (what llama-cpp-python's tokenize takes), never a list of
            # token ids byte by byte.
            try:
                prompt = bytes(prompt).decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"the prompt's bytes are not valid UTF-8: byte "
                                 f"{bytes(prompt)[e.start]:#04x} at offset {e.start}") from None
        if isinstance(prompt, str):
            # A completion prompt is written by the app, template and all, so special-token
            # text in it is honoured (as llama.cpp and llama-cpp-python do).
            ids = self.tokenize(prompt, special=True)
        else:
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError):
                raise TypeError(f"prompt must be a str or a list of token ids, "
                                f"got {type(prompt).__name__}") from None
            bad = [t for t in ids if not 0 <= t < self.n_vocab]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary "
                                 f"(0..{self.n_vocab - 1})")
        if not ids and isinstance(prompt, str) and prompt:
            # Text that a usable vocabulary cannot fail to encode (it has byte fallback
            # or all 256 byte tokens): the file's vocabulary is broken, not the prompt.
            raise ModelError(f"the model's vocabulary encodes the prompt {prompt[:40]!r} "
                             "to no tokens")
        if not ids:
            raise ValueError("the prompt is empty (and this model adds no BOS token)")
        if len(ids) > self.n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(ids)} tokens but the context holds {self.n_ctx} "
                f"(raise n_ctx, up to the model's {self._n_ctx_train()}, or shorten the prompt)")
        return ids

    def _n_ctx_train(self):
        cfg = getattr(self.model, "config", None)
        return getattr(cfg, "n_ctx_train", "?")

    # --- evaluation --------------------------------------------------------------------
    def _eval(self, tokens: list[int], n_past: int, logits_all: bool = False) -> np.ndarray:
        # The model overwrites the cache from n_past on, so what we remember is cut there.
        del self._cache_tokens[n_past:]
        logits = self.model.eval(tokens, n_past, logits_all=logits_all)
        self._cache_tokens.extend(tokens)
        self.n_tokens_evaluated += len(tokens)
        return logits

    def logits(self, tokens) -> np.ndarray:
        """Teacher-forced logits of every position: row i predicts token i+1.
        Returns float32 (n_tokens, n_vocab)."""
        with self._lock:
            self._check_open()
            ids = self._prompt_ids(list(tokens))
            self._active_call += 1
            out = self._eval(ids, 0, logits_all=True)
        return np.asarray(out, dtype=np.float32).reshape(len(ids), -1)

    # --- generation --------------------------------------------------------------------
    def generate(self, prompt, max_tokens: int | None = DEFAULT_MAX_TOKENS, temperature: float = DEFAULT_SAMPLING.temperature,
                 top_k: int = DEFAULT_SAMPLING.top_k, top_p: float = DEFAULT_SAMPLING.top_p,
                 min_p: float = DEFAULT_SAMPLING.min_p,
                 repeat_penalty: float = DEFAULT_SAMPLING.repeat_penalty, seed: int | None = None, stop=None,
                 stream: bool = False, ignore_eos: bool = False):
        """Continue `prompt` (a str or a list of token ids).

        Returns a Completion, or with stream=True an iterator of str pieces (valid UTF-8;
        `llm.last_completion` holds the Completion once the iterator is exhausted).
        Generation ends at an end-of-generation token (unless ignore_eos), at a stop
        string (never part of the text; a stop string that is a special token's text,
        such as '<|im_end|>', also stops when that token is sampled, since special tokens
        add no text), after max_tokens tokens, or when the context is full
        (finish_reason "length"). temperature=0 is greedy.
        """
        with self._lock:  # a blocking call runs whole; a stream locks each step (_run)
            return self._generate(prompt, max_tokens, temperature, top_k, top_p, min_p,
                                  repeat_penalty, seed, stop, stream, ignore_eos)

    def _generate(self, prompt, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty,
                  seed, stop, stream, ignore_eos):
        self._check_open()
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty)
        seed = check_seed(seed)
        max_tokens = check_max_tokens(max_tokens)
        matcher = StopMatcher(stop)
        ids = self._prompt_ids(prompt)
        self._active_call += 1
        pieces = self._run(ids, max_tokens, Sampler(params, seed), matcher, ignore_eos,
                           self._active_call)
        if stream:
            return pieces
        text = "".join(pieces)
        completion = self.last_completion
        assert completion is not None and completion.text == text
        return completion

    def _run(self, ids, max_tokens, sampler, matcher, ignore_eos, call_id):
        """The generation loop, as a generator of text pieces: generation_steps driven
        with this LLM's model. The prompt is evaluated on the first next(), so creating a
        stream costs nothing until it is read."""
        steps = generation_steps(self.tokenizer, self.n_ctx, self._cache_tokens, ids, max_tokens,
                                 sampler, matcher, ignore_eos,
                                 can_resume=getattr(self.model, "can_resume", None))
        try:
            while True:
                with self._lock:  # from one piece of text to the next
                    if call_id != self._active_call:
                        raise RuntimeError("another call on this LLM started while this stream "
                                           "was being read; finish or drop a stream before the "
                                           "next call")
                    self._check_open()
                    item = next(steps)
                    while isinstance(item, EvalRequest):
                        item = steps.send(self._eval(item.tokens, item.n_past))
                yield item
        except StopIteration as done:
            self.last_completion = done.value

    # --- chat --------------------------------------------------------------------------
    def chat(self, messages, stream: bool = False, **kwargs):
        """Reply to a conversation (a list of {"role", "content"} dicts) with the chat
        template from the GGUF; the rest of the arguments are generate()'s."""
        return chat_completion(self, messages, stream=stream, **kwargs)


class EvalRequest:
    """What generation_steps asks its driver for: run `tokens` at positions n_past.. of
    the sequence (overwriting the cache from n_past on) and send back the last token's
    logits."""
    __slots__ = ("tokens", "n_past")

    def __init__(self, tokens, n_past):
        self.tokens, self.n_past = tokens, n_past


def token_logprobs(logits: np.ndarray, token: int, n_top: int) -> tuple[float, list[tuple[int, float]]]:
    """log p(token) under the model's distribution (the softmax of the raw logits, before
    any sampling filter) and the n_top most likely tokens with theirs."""
    x = logits.astype(np.float64)
    m = x.max()
    lse = m + np.log(np.exp(x - m).sum())
    top = []
    if n_top > 0:
        idx = np.argpartition(-x, min(n_top, x.shape[0] - 1))[:n_top]
        idx = idx[np.lexsort((idx, -x[idx]))]  # by logit, then id: a fixed order
        top = [(int(i), float(x[i] - lse)) for i in idx]
    return float(x[token] - lse), top


def generation_steps(tokenizer, n_ctx, cache_tokens, ids, max_tokens, sampler, matcher, ignore_eos,
                     logprobs: int | None = None, can_resume=None):
    """One generate() call as a generator, whoever runs the model: it yields EvalRequests
    (the driver evaluates them, updates `cache_tokens` — the tokens of the sequence's KV
    cache, in order — and sends the logits back) and str pieces of text, and returns the
    Completion. LLM.generate drives it with its own model; the server drives many at once,
    one batched evaluation per step.

    The prompt reuses the longest prefix it shares with cache_tokens; its last token is
    always run again, because the cache keeps keys and values, not logits; when
    can_resume(n_past) says the cache no longer holds what continuing there needs (a
    sliding-window ring, Model.can_resume), the prompt is evaluated from the start. With logprobs
    = N (>= 0), the Completion's `logprobs` holds, per generated token, its log
    probability and the N most likely tokens' (token_logprobs)."""
    timings = Timings(prompt_tokens=len(ids))
    t0 = time.perf_counter()
    n = min(len(cache_tokens), len(ids) - 1)
    n_past = 0
    while n_past < n and cache_tokens[n_past] == ids[n_past]:
        n_past += 1
    if can_resume is not None and not can_resume(n_past):
        n_past = 0
    logits = yield EvalRequest(ids[n_past:], n_past)
    timings.prompt_tokens_evaluated = len(ids) - n_past
    t1 = time.perf_counter()
    timings.prompt_seconds = t1 - t0

    eog = set() if ignore_eos else set(tokenizer.eog_ids)
    stop_ids = {i for i in map(tokenizer.special_token_id, matcher.stop) if i is not None}
    decoder = tokenizer.streaming_decoder()
    limit = n_ctx - len(ids)          # the context holds the prompt and the reply
    if max_tokens is not None:
        limit = min(limit, max_tokens)
    tokens: list[int] = []
    text_parts: list[str] = []
    token_lps: list | None = [] if logprobs is not None else None
    finish = "length"
    stopped = False
    penalty_n = sampler.params.penalty_last_n
    while len(tokens) < limit:
        recent = cache_tokens[-penalty_n:] if penalty_n else ()
        token = sampler.sample(logits, recent)
        if token in eog or token in stop_ids:
            finish = "stop"
            break
        tokens.append(token)
        if token_lps is not None:
            token_lps.append(token_logprobs(logits, token, logprobs))
        piece, stopped = matcher.push(decoder.feed(token))
        if piece:
            text_parts.append(piece)
            yield piece
        if stopped:
            finish = "stop"
            break
        if len(tokens) < limit:
            # the last token is never run: nothing would read its logits
            logits = yield EvalRequest([token], len(cache_tokens))
    if not stopped:
        piece, stopped = matcher.push(decoder.flush())
        piece += "" if stopped else matcher.flush()
        if stopped:
            finish = "stop"
        if piece:
            text_parts.append(piece)
            yield piece
    timings.generated_tokens = len(tokens)
    timings.generation_seconds = time.perf_counter() - t1
    return Completion(text="".join(text_parts), tokens=tokens, finish_reason=finish,
                      timings=timings, prompt_tokens=list(ids), logprobs=token_lps)
