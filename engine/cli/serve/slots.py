"""The server's slots: N sequences of one model, each with its own KV cache, decoded
together (continuous batching), fed from one fair (first come, first served) queue.

A request becomes a Job. When a slot is free, the oldest waiting job goes to the free
slot whose cached tokens share the longest prefix with the job's prompt, so the next turn
of a conversation lands where its history already sits and only the new tokens are
evaluated.

One scheduler thread runs every active job's generation (engine.llm.generation_steps)
step by step: each step collects what every slot needs evaluated — one new token per
decoding slot, up to PROMPT_CHUNK prompt tokens per slot still reading its prompt — and
runs them in one Model.eval_batch call, so the weights are read once per step for all
slots, and a new prompt joins between steps. Each sequence's logits are what evaluating
it alone gives, bit for bit, so a request's reply does not depend on what else runs.
Text pieces go back to the event loop of the request.

A job can be cancelled at any time (its client went away): a waiting job leaves the
queue; a running one stops before the next step and frees its slot.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field

from engine.completion import StopMatcher
from engine.llm import LLM, EvalRequest, check_max_tokens, generation_steps
from engine.sampler import SAMPLING_KNOBS, Sampler, SamplingParams, check_seed

# Prompt tokens one slot feeds into a step: a long prompt is read over several steps, so
# the other slots keep generating meanwhile.
PROMPT_CHUNK = 256


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Job:
    """One generation request: prompt token ids and generate() keywords. Events reach
    `events` (an asyncio.Queue of the loop that made the job): ("piece", str),
    then ("done", Completion) or ("error", exception)."""
    prompt_ids: list
    params: dict
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    first_piece: float | None = None
    slot: int | None = None

    def emit(self, kind, value):
        if kind == "piece" and self.first_piece is None:
            self.first_piece = time.perf_counter()
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()

    def cancel(self):
        self.cancelled.set()


class _Slot:
    """One sequence of the model: its cached tokens and the job generating in it."""

    def __init__(self, index: int):
        self.index = index
        self.cache_tokens: list[int] = []
        self.job: Job | None = None
        self.steps = None            # the job's generation_steps generator
        self.request: EvalRequest | None = None
        self.fed = 0                 # tokens of self.request already evaluated

    def start(self, job: Job, llm: LLM):
        p = dict(job.params)
        sampler = Sampler(SamplingParams(**{k: p.pop(k) for k in SAMPLING_KNOBS if k in p}),
                          check_seed(p.pop("seed", None)))
        self.job = job
        self.steps = generation_steps(llm.tokenizer, llm.n_ctx, self.cache_tokens, job.prompt_ids,
                                      check_max_tokens(p.pop("max_tokens", None)), sampler,
                                      StopMatcher(p.pop("stop", None)), p.pop("ignore_eos", False),
                                      logprobs=p.pop("logprobs", None),
                                      can_resume=lambda n: llm.model.can_resume(n, self.index))
        self.advance(None, first=True)

    def advance(self, logits, first=False):
        """Run the generation up to its next evaluation request (or its end)."""
        job = self.job
        try:
            item = next(self.steps) if first else self.steps.send(logits)
            while not isinstance(item, EvalRequest):
                job.emit("piece", item)
                item = next(self.steps)
            # the sequence's cache is overwritten from n_past on
            del self.cache_tokens[item.n_past:]
            self.request, self.fed = item, 0
        except StopIteration as done:
            job.emit("done", done.value)
            self.release()
        except Exception as e:  # reported to the request; the slot stays usable
            job.emit("error", e)
            self.release()

    def release(self):
        if self.steps is not None:
            self.steps.close()
        self.job, self.steps, self.request, self.fed = None, None, None, 0


class SlotPool:
    """`n_slots` sequences of one model file, each with its own KV cache of n_ctx tokens,
    decoded together by one scheduler thread."""

    def __init__(self, model_path, n_slots: int = 1, n_ctx: int = 2048, n_threads: int | None = None):
        if isinstance(n_slots, bool) or not isinstance(n_slots, int) or n_slots < 1:
            raise ValueError(f"the number of parallel slots must be an integer >= 1, got {n_slots!r}")
        self.llm = LLM(model_path, n_ctx=n_ctx, n_threads=n_threads, n_seq=n_slots)
        self.slots = [_Slot(i) for i in range(n_slots)]
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: collections.deque[Job] = collections.deque()
        self._closing = False
        self.n_steps = 0   # batched evaluations run
        self.n_rows = 0    # rows they carried (prompt tokens and decoded tokens)
        self.n_slot_steps = 0  # (step, slot) pairs: n_slot_steps / n_steps = slots per step
        self.thread = threading.Thread(target=self._run, name="kiln-scheduler", daemon=True)
        self.thread.start()

    # --- facts ----------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        return self.llm.n_ctx

    def busy(self) -> int:
        with self._lock:
            return sum(s.job is not None for s in self.slots)

    def waiting(self) -> int:
        with self._lock:
            return len(self._queue)

    # --- the queue ------------------------------------------------------------------
    def submit(self, job: Job):
        with self._lock:
            if self._closing:
                raise RuntimeError("the server is shutting down")
            self._queue.append(job)
            self._wake.notify()

    def withdraw(self, job: Job):
        """Cancel a job: out of the queue if it waits, stopped before the next step if it runs."""
        job.cancel()
        with self._lock:
            try:
                self._queue.remove(job)
            except ValueError:
                pass
            self._wake.notify()

    def _take_jobs(self) -> list[tuple[_Slot, Job]]:  # with the lock held
        started = []
        while self._queue:
            idle = [s for s in self.slots if s.job is None and all(s is not t for t, _ in started)]
            if not idle:
                break
            job = self._queue.popleft()
            if job.cancelled.is_set():
                continue
            slot = max(idle, key=lambda s: (common_prefix(s.cache_tokens, job.prompt_ids), -s.index))
            job.slot = slot.index
            started.append((slot, job))
        return started

    # --- the scheduler --------------------------------------------------------------
    def _run(self):
        while True:
            with self._lock:
                while not self._closing and not self._queue and all(s.job is None for s in self.slots):
                    self._wake.wait()
                if self._closing:
                    return
                started = self._take_jobs()
            for slot, job in started:
                try:
                    slot.start(job, self.llm)
                except Exception as e:  # a bad knob: the request fails, the scheduler goes on
                    job.emit("error", e)
                    slot.release()
            for slot in self.slots:
                if slot.job is not None and slot.job.cancelled.is_set():
                    slot.release()
            self._step([s for s in self.slots if s.request is not None])

    def _step(self, active):
        """One batched evaluation: every active slot's next rows."""
        if not active:
            return
        tokens, seqs, positions, want, parts = [], [], [], [], []
        for slot in active:
            req = slot.request
            chunk = req.tokens[slot.fed:slot.fed + PROMPT_CHUNK]
            start = req.n_past + slot.fed
            tokens += chunk
            seqs += [slot.index] * len(chunk)
            positions += range(start, start + len(chunk))
            last = slot.fed + len(chunk) == len(req.tokens)
            want += [False] * (len(chunk) - 1) + [last]
            parts.append((slot, chunk, last))
        try:
            logits = self.llm.model.eval_batch(tokens, seqs, positions, want)
        except Exception as e:  # not expected (the rows are checked): fail these jobs alone
            for slot, _, _ in parts:
                slot.job.emit("error", e)
                slot.cache_tokens.clear()
                slot.release()
            return
        self.n_steps += 1
        self.n_rows += len(tokens)
        self.n_slot_steps += len(parts)
        row = 0
        for slot, chunk, last in parts:
            slot.cache_tokens.extend(chunk)
            slot.fed += len(chunk)
            if last:
                slot.advance(logits[row])
                row += 1

    def close(self):
        with self._lock:
            self._closing = True
            for job in self._queue:
                job.cancel()
            self._queue.clear()
            for s in self.slots:
                if s.job is not None:
                    s.job.cancel()
            self._wake.notify_all()
        self.thread.join()  # the scheduler stops after the step it is in
        self.llm.close()
