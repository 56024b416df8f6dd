"""Iteration-level scheduling (continuous batching) for the decode API: requests from many users wait in one
bounded queue, and a single worker thread runs ONE running batch of rows, one batched forward per model per step;
a row leaves the batch the step it finishes and waiting requests join it between steps, guides' caches included.

    engine = Engine(guidance, max_batch_size=32, max_batch_tokens=65536, max_queue=256, prefill_chunk=512)
    engine.start()
    engine.submit(job)            # QueueFull when max_queue jobs are already waiting (the server answers 429)
    await job.events.get()        # ("delta", row, text) while streaming, ("finish", row, reason), ("end", ..)
    job.cancel("disconnected")    # its rows leave the batch at the next step
    engine.between_steps(fn)      # from another thread: fn() on the worker, between two steps; its result

Orca's iteration-level scheduling (Yu et al., OSDI 2022), as vLLM, TGI and SGLang run it, extended to guided
decoding: a row's guide rows (PAD's, GenARM's, ARGS's reward model, Drift's 1 + nnz attribute contexts) live in
their own models' KV caches, and every cache gains and loses the row's rows in lockstep (decoding/guides.py
`select_rows` / `merge_rows`, decoding/personalization.py `RowGroupsRule.select` / `merge`). Each worker turn:

    1. admit: the oldest waiting jobs that fit (first come, first served: a later job never overtakes an earlier
       one, so a long request waits only for running rows to finish, each within its own max_tokens);
    2. prefill the admitted rows apart from the running ones (every model, about `prefill_chunk` rows x tokens
       per turn, so a long prompt never stalls decoding for more than one chunk), then merge them into the running
       batch: the narrower cache is left-padded with masked columns, nothing already cached is recomputed;
    3. one step of the running batch (`Batch.pick`, `Batch.advance`); a row whose EOS, max_tokens, stop string or
       cancelled job (client gone, timed out) ends it leaves that step, its cache memory freed, and its job hears
       "finish" (and "end" with its last row) at once, not when the longest row beside it ends.

A batch holds at most `max_batch_size` rows and rows x context <= `max_batch_tokens`, where context is the longest
prompt of any row (base or guide) plus its max_tokens: the longest the cache can grow to. Sampling is per row
(`decoding.loop.pick_tokens` on uniforms that are a pure function of the row's seed and step), so a request's
tokens do not depend on what else is in its batch or when it joined: greedy ones up to float noise.

`Batch` (decoding/loop.py) is also the loop of offline decoding (`decode_steps`): one decode loop for both. The
measurements are in docs/experiments/serving.md.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from decoding.guides import left_pad
from decoding.loop import Batch
from decoding.personalization import Guidance, Resolved, RowTokens, build_rule

log = logging.getLogger(__name__)


# --- requests ---------------------------------------------------------------------------------------------------
class QueueFull(RuntimeError):
    """The bounded queue already holds max_queue waiting jobs."""


@dataclass
class Row:
    """One generated sequence (an OpenAI choice): its prompts, sampling settings and, as it decodes, its output."""

    personalization: Resolved
    tokens: RowTokens
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # generated ids, EOS excluded
    text: str = ""  # decoded so far (final: cut before a stop string)
    sent: int = 0  # characters of `text` already streamed
    finish_reason: str | None = None  # stop | length | cancelled
    job: Any = field(default=None, repr=False)  # the Job it belongs to, and its choice index there
    index: int = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.tokens.base)

    @property
    def context(self) -> int:
        """The longest its cache rows can grow: its longest prompt (the base's or a guide's) plus max_tokens."""
        return max(len(t) for t in [self.tokens.base, *self.tokens.contexts]) + self.max_tokens


class Job:
    """One HTTP request: rows that decode side by side, and the events its handler reads on its event loop."""

    def __init__(self, rows: list[Row], stream: bool = False):
        self.rows, self.stream, self.left = rows, stream, len(rows)
        for i, row in enumerate(rows):
            row.job, row.index = self, i
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled: str | None = None  # why its rows must stop (set from the event loop, read by the worker)

    def cancel(self, why: str) -> None:
        self.cancelled = why

    def emit(self, *event: Any) -> None:
        """Thread-safe: deliver an event to the job's event loop (dropped when that loop has closed)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            pass


# --- the engine -------------------------------------------------------------------------------------------------
class Engine:
    """A bounded queue of jobs and the worker thread that runs the one continuous batch (module docstring)."""

    def __init__(self, guidance: Guidance, *, max_batch_size: int = 32, max_batch_tokens: int = 65536,
                 max_queue: int = 256, prefill_chunk: int = 512, eos_ids: list[int] | None = None):
        self.g, self.max_batch_size, self.max_batch_tokens = guidance, max_batch_size, max_batch_tokens
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        tok = guidance.tokenizer
        self.eos = sorted(set(eos_ids or []) | ({tok.eos_token_id} if tok.eos_token_id is not None else set()))
        self.pending: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.model_lock = threading.Lock()  # held while the models run: a worker turn, or a call between steps
        self.calls: collections.deque[tuple] = collections.deque()  # (fn, Future) for the worker to run
        self.running: Batch | None = None  # the batch that steps
        self.filling: Batch | None = None  # admitted rows being prefilled, merged into `running` when ready
        self.stats = {"requests": 0, "rows": 0, "admissions": 0, "steps": 0, "row_steps": 0, "max_batch_rows": 0,
                      "running_rows": 0, "completion_tokens": 0, "cancelled_rows": 0, "failures": 0,
                      "rejected_full": 0, "prefill_s": 0.0, "step_s": 0.0}  # the worker's model time, by kind
        self.thread: threading.Thread | None = None
        self.stopping = False

    # --- the queue (event-loop side) ---
    def start(self) -> None:
        self.stopping = False
        self.thread = threading.Thread(target=self._work, name="decode-worker", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
            while self.calls:  # their callers must not wait forever
                self.calls.popleft()[1].set_exception(RuntimeError("the server is stopping"))
        if self.thread is not None:
            self.thread.join(timeout)

    def fits(self, rows: int, context: int) -> bool:
        return rows <= self.max_batch_size and rows * context <= self.max_batch_tokens

    def submit(self, job: Job) -> None:
        if not self.fits(len(job.rows), max(r.context for r in job.rows)):
            raise ValueError(f"{len(job.rows)} rows of up to {max(r.context for r in job.rows)} tokens exceed the "
                             f"batch bounds ({self.max_batch_size} rows, {self.max_batch_tokens} rows x tokens)")
        with self.cond:
            if len(self.pending) >= self.max_queue:
                self.stats["rejected_full"] += 1
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self.pending.append(job)
            self.stats["requests"] += 1
            self.cond.notify()

    def between_steps(self, fn):
        """Run fn() on the worker between two steps and return its result (or raise its exception): model work
        outside requests (a profile's pair fit, in chunks) alternates with decoding instead of stalling it."""
        future = concurrent.futures.Future()
        with self.cond:
            if self.stopping or not (self.thread and self.thread.is_alive()):
                raise RuntimeError("the decode worker is not running")
            self.calls.append((fn, future))
            self.cond.notify()
        return future.result()

    def health(self) -> dict:
        steps = max(self.stats["steps"], 1)
        return {**self.stats, "mean_batch_rows": self.stats["row_steps"] / steps, "queued": len(self.pending),
                "max_queue": self.max_queue, "max_batch_size": self.max_batch_size,
                "max_batch_tokens": self.max_batch_tokens,
                "worker_alive": bool(self.thread and self.thread.is_alive())}

    # --- the worker ---
    def _work(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not (self.pending or self.calls or self.running or self.filling or self.stopping):
                        self.cond.wait(0.5)
                    if self.stopping:
                        break
                    call = self.calls.popleft() if self.calls else None
                    admitted = self._admit() if self.filling is None else []
                with self.model_lock:
                    if call is not None:  # one call per turn: decoding and calls take turns
                        fn, future = call
                        try:
                            future.set_result(fn())
                        except Exception as exc:
                            future.set_exception(exc)
                    admitted = [j for j in admitted if not j.cancelled]  # timed out while the lock was held
                    start = time.perf_counter()
                    if admitted:
                        self._start_prefill(admitted)
                    if self.filling is not None:
                        self._fill()
                    mid = time.perf_counter()
                    if self.running is not None:
                        self._step()
                    self.stats["prefill_s"] += mid - start
                    self.stats["step_s"] += time.perf_counter() - mid
        for batch in (self.running, self.filling):
            if batch is not None:
                self._fail(batch, "the server is stopping")

    def _admit(self) -> list[Job]:
        """Pop the oldest waiting jobs while they fit beside the running rows (called under `cond`)."""
        rows = self.running.tags if self.running is not None else []
        rows, context, jobs = len(rows), max((r.context for r in rows), default=0), []
        while self.pending:
            job = self.pending[0]
            if job.cancelled:  # gone before it started: nothing to decode, nobody to answer
                self.pending.popleft()
                continue
            need = max(context, *(r.context for r in job.rows))
            if not self.fits(rows + len(job.rows), need):
                break  # first come, first served: nobody overtakes the oldest
            jobs.append(self.pending.popleft())
            rows, context = rows + len(job.rows), need
        return jobs

    def _start_prefill(self, jobs: list[Job]) -> None:
        rows = [r for j in jobs for r in j.rows]
        self.stats.update(rows=self.stats["rows"] + len(rows), admissions=self.stats["admissions"] + 1,
                          running_rows=self.stats["running_rows"] + len(rows))
        g, tok = self.g, self.g.tokenizer
        try:
            ids, mask = left_pad([r.tokens.base for r in rows], tok.pad_token_id, g.base.device)
            rule = build_rule(g, [(r.personalization, r.tokens) for r in rows], chunk=self.prefill_chunk)
            top_p = [r.top_p for r in rows] if any(r.top_p < 1 for r in rows) else None
            self.filling = Batch(g.base, ids, mask, rule, tags=rows, eos=self.eos, pad_token_id=tok.pad_token_id,
                                 temperature=[r.temperature for r in rows], seeds=[r.seed for r in rows],
                                 top_p=top_p, chunk=self.prefill_chunk)
        except Exception:
            self._fail_rows(rows, "prefill")

    def _fill(self) -> None:
        try:
            if not self.filling.fill():
                return
            if self.running is None:
                self.running = self.filling
            else:
                self.running.merge(self.filling)
            self.filling = None
        except Exception:
            self._fail(self.filling, "prefill")
            self.filling = None

    def _step(self) -> None:
        batch = self.running
        try:
            tokens = batch.pick()
            keep = [not self._take(row, t) for row, t in zip(batch.tags, tokens.tolist(), strict=True)]
            self.stats.update(steps=self.stats["steps"] + 1, row_steps=self.stats["row_steps"] + batch.rows,
                              max_batch_rows=max(self.stats["max_batch_rows"], batch.rows))
            if any(keep):
                batch.advance(tokens, torch.tensor(keep))
            else:
                self.running = None
        except Exception:
            self._fail(batch, "step")
            self.running = None

    def _fail(self, batch: Batch, where: str) -> None:
        self._fail_rows([r for r in batch.tags if r.finish_reason is None], where)

    def _fail_rows(self, rows: list[Row], where: str) -> None:
        """A bug or an out-of-memory: fail these rows' requests, keep serving the others."""
        error_id = uuid.uuid4().hex[:12]  # the details stay in the log, under this id; clients get the id
        if where != "the server is stopping":
            log.exception("decode %s of %d rows failed (error id %s)", where, len(rows), error_id)
            self.stats["failures"] += 1
        live = [r for r in rows if r.finish_reason is None]
        self.stats["running_rows"] -= len(live)
        for row in live:
            row.finish_reason = "error"
        for job in {id(r.job): r.job for r in rows}.values():
            job.emit("error", None, f"error id {error_id}; the details are in the server log")

    def _take(self, row: Row, token: int) -> bool:
        """Account one emitted token of a row; True when the row is finished now (it leaves the batch)."""
        job = row.job
        if job.cancelled:
            self.stats["cancelled_rows"] += 1
            return self._finish(row, "cancelled", decoded=True)
        if token in self.eos:
            return self._finish(row, "stop")
        row.ids.append(token)
        self.stats["completion_tokens"] += 1
        if row.stop or job.stream:
            row.text = self.g.tokenizer.decode(row.ids, skip_special_tokens=True)
            cut = min((i for i in (row.text.find(s, max(0, row.sent - len(s))) for s in row.stop) if i >= 0),
                      default=-1)
            if cut >= 0:
                row.text = row.text[:cut]
                return self._finish(row, "stop", decoded=True)
            if job.stream:
                hold = max((len(s) for s in row.stop), default=1) - 1  # a stop string may be starting
                end = len(row.text) - hold
                while end > row.sent and row.text[end - 1] == "\ufffd":  # an incomplete multi-byte character
                    end -= 1
                if end > row.sent:
                    job.emit("delta", row.index, row.text[row.sent:end])
                    row.sent = end
        if len(row.ids) >= row.max_tokens:
            return self._finish(row, "length", decoded=bool(row.stop or job.stream))
        return False

    def _finish(self, row: Row, reason: str, decoded: bool = False) -> bool:
        """The row's reply is final: its last delta, its finish event, and its job's end with its last row. The
        stats settle first: a client may send its next request the moment it hears back."""
        job = row.job
        if not decoded:
            row.text = self.g.tokenizer.decode(row.ids, skip_special_tokens=True)
        row.finish_reason = reason
        job.left -= 1
        self.stats["running_rows"] -= 1
        if reason != "cancelled":
            if job.stream and len(row.text) > row.sent:
                job.emit("delta", row.index, row.text[row.sent:])
                row.sent = len(row.text)
            job.emit("finish", row.index, reason)
        if job.left == 0:
            job.emit("end", None, None)
        return True
