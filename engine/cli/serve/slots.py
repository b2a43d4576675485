"""The server's slots: N generation contexts, each with its own KV cache and worker thread,
fed from one fair (first come, first served) queue.

A request becomes a Job. When a slot is free, the oldest waiting job goes to the free slot
whose cached tokens share the longest prefix with the job's prompt, so the next turn of a
conversation lands where its history already sits and only the new tokens are evaluated.
Each slot runs its job's generation on its own thread (the C forward pass releases the
GIL, so slots compute at the same time) and sends text pieces back to the event loop.

A job can be cancelled at any time (its client went away): a waiting job leaves the
queue; a running one stops at the next token and frees its slot.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field

from engine.llm import LLM


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
    def __init__(self, index: int, llm: LLM, pool: "SlotPool"):
        self.index = index
        self.llm = llm
        self.job: Job | None = None
        self._pool = pool
        self._wake = threading.Condition(pool._lock)
        self.thread = threading.Thread(target=self._work, name=f"kiln-slot-{index}", daemon=True)

    def _work(self):
        pool = self._pool
        while True:
            with pool._lock:
                while self.job is None and not pool._closing:
                    self._wake.wait()
                if pool._closing:
                    return
                job = self.job
            try:
                self._run(job)
            finally:
                with pool._lock:
                    self.job = None
                    pool._finished(job)

    def _run(self, job: Job):
        if job.cancelled.is_set():
            return
        try:
            stream = self.llm.generate(job.prompt_ids, stream=True, **job.params)
            for piece in stream:
                if job.cancelled.is_set():
                    stream.close()
                    return
                job.emit("piece", piece)
            job.emit("done", self.llm.last_completion)
        except Exception as e:  # reported to the request; the slot stays usable
            # A generation cut short leaves the cache consistent (LLM tracks what it
            # holds), but forget it anyway: the next job re-evaluates its prompt.
            self.llm.reset()
            job.emit("error", e)


class SlotPool:
    """`n_slots` LLMs on one model file, each with its own KV cache of n_ctx tokens."""

    def __init__(self, model_path, n_slots: int = 1, n_ctx: int = 2048, n_threads: int | None = None):
        if isinstance(n_slots, bool) or not isinstance(n_slots, int) or n_slots < 1:
            raise ValueError(f"the number of parallel slots must be an integer >= 1, got {n_slots!r}")
        self._lock = threading.Lock()
        self._queue: collections.deque[Job] = collections.deque()
        self._closing = False
        self.n_done = 0
        llms = []
        try:
            for _ in range(n_slots):
                llms.append(LLM(model_path, n_ctx=n_ctx, n_threads=n_threads))
        except BaseException:
            for llm in llms:
                llm.close()
            raise
        self.slots = [_Slot(i, llm, self) for i, llm in enumerate(llms)]
        for s in self.slots:
            s.thread.start()

    # --- facts ----------------------------------------------------------------------
    @property
    def llm(self) -> LLM:
        """Slot 0's LLM: the tokenizer, template and metadata every slot shares."""
        return self.slots[0].llm

    @property
    def n_ctx(self) -> int:
        return self.llm.n_ctx

    def busy(self) -> int:
        with self._lock:
            return sum(s.job is not None for s in self.slots)

    def waiting(self) -> int:
        with self._lock:
            return len(self._queue)

    # --- scheduling -----------------------------------------------------------------
    def submit(self, job: Job):
        with self._lock:
            if self._closing:
                raise RuntimeError("the server is shutting down")
            self._queue.append(job)
            self._dispatch()

    def withdraw(self, job: Job):
        """Cancel a job: out of the queue if it waits, stopped at its next token if it runs."""
        job.cancel()
        with self._lock:
            try:
                self._queue.remove(job)
            except ValueError:
                pass

    def _dispatch(self):  # with the lock held
        while self._queue:
            idle = [s for s in self.slots if s.job is None]
            if not idle:
                return
            job = self._queue.popleft()
            if job.cancelled.is_set():
                continue
            slot = max(idle, key=lambda s: (common_prefix(s.llm.cached_tokens, job.prompt_ids), -s.index))
            job.slot = slot.index
            slot.job = job
            slot._wake.notify()

    def _finished(self, job: Job):  # with the lock held
        self.n_done += 1
        self._dispatch()

    def close(self):
        with self._lock:
            self._closing = True
            for job in self._queue:
                job.cancel()
            self._queue.clear()
            for s in self.slots:
                if s.job is not None:
                    s.job.cancel()
                s._wake.notify()
        for s in self.slots:
            s.thread.join()  # a cancelled job stops at its next token
            s.llm.close()
