"""The decode API's batcher: requests from many users wait in one bounded queue, and a single worker thread decodes
them in batches through `decoding.generate.decode_steps`, one batched forward per model per step.

    engine = Engine(guidance, max_batch_size=32, max_queue=256, batch_wait_s=0.02)
    engine.start()
    engine.submit(job)            # QueueFull when max_queue jobs are already waiting (the server answers 429)
    await job.events.get()        # ("delta", row, text) while streaming, ("finish", row, reason), ("end", ..)
    job.cancel("disconnected")    # its rows stop at the next step
    engine.between_batches(fn)    # from another thread: fn() on the worker, after the running batch; its result

Batching (micro-batches, research/ecosystem.md §8.2): the worker takes the oldest waiting job, waits for as many
rows as the recent demand while requests keep arriving (`_collect`), and decodes every job that fits in
`max_batch_size` rows together, whatever each row's personalization (decoding/personalization.py builds one
rule per method present; strengths, weights, temperatures, top-p and seeds are per row). A job's rows are never
split across batches. Requests that arrive while a batch runs wait for the next one; rows do not join a running
batch (no continuous batching: the guides' KV caches cannot merge rows yet).

Rows leave a running batch at their EOS, their own max_tokens, a stop string, a cancelled job (client gone,
request timed out) or a failed job: `decode_steps` is told through `steps.send(done)` and gives them pad from then
on; they no longer stream, count or hold the batch open (it ends when its last live row ends), but their pad
positions stay in the batch's forwards until it ends (research/decoding.md §7.4 item 10: finished rows keep the
guides' caches in lockstep).

Sampling is per row (Gumbel-max from the row's own seeded generator, decode_steps), so a request's tokens do not
depend on what else is in its batch: greedy ones up to float noise between batch shapes.
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

from decoding.personalization import Guidance, Resolved, RowTokens, build_rule

log = logging.getLogger(__name__)


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

    @property
    def prompt_tokens(self) -> int:
        return len(self.tokens.base)


class Job:
    """One HTTP request: rows decoded in the same batch, and the events its handler reads on its event loop."""

    def __init__(self, rows: list[Row], stream: bool = False):
        self.rows, self.stream = rows, stream
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


class Engine:
    """A bounded queue of jobs and the worker thread that decodes them in batches (module docstring)."""

    def __init__(self, guidance: Guidance, *, max_batch_size: int = 32, max_queue: int = 256,
                 batch_wait_s: float = 0.02, eos_ids: list[int] | None = None):
        self.g, self.max_batch_size, self.max_queue = guidance, max_batch_size, max_queue
        self.batch_wait_s = batch_wait_s
        tok = guidance.tokenizer
        self.eos = sorted(set(eos_ids or []) | ({tok.eos_token_id} if tok.eos_token_id is not None else set()))
        self.pending: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.model_lock = threading.Lock()  # held while the models run: a batch, or a call between batches
        self.calls: collections.deque[tuple] = collections.deque()  # (fn, Future) for the worker to run
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "max_batch_rows": 0, "last_batch_rows": 0,
                      "running_rows": 0, "completion_tokens": 0, "cancelled_rows": 0, "failed_batches": 0,
                      "rejected_full": 0}
        self.demand: collections.deque[int] = collections.deque(maxlen=4)  # rows seen during recent batches
        self.recent: collections.deque[int] = collections.deque(maxlen=16)  # rows of the last batches
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

    def submit(self, job: Job) -> None:
        if len(job.rows) > self.max_batch_size:
            raise ValueError(f"{len(job.rows)} rows exceed the batch size {self.max_batch_size}")
        with self.cond:
            if len(self.pending) >= self.max_queue:
                self.stats["rejected_full"] += 1
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self.pending.append(job)
            self.stats["requests"] += 1
            self.cond.notify()

    def between_batches(self, fn):
        """Run fn() on the worker between two batches and return its result (or raise its exception): model work
        outside requests (a profile's pair fit, in chunks) alternates with decoding instead of stalling it."""
        future = concurrent.futures.Future()
        with self.cond:
            if self.stopping or not (self.thread and self.thread.is_alive()):
                raise RuntimeError("the decode worker is not running")
            self.calls.append((fn, future))
            self.cond.notify()
        return future.result()

    def health(self) -> dict:
        return {**self.stats, "recent_batch_rows": list(self.recent), "queued": len(self.pending),
                "max_queue": self.max_queue, "max_batch_size": self.max_batch_size,
                "worker_alive": bool(self.thread and self.thread.is_alive())}

    # --- the worker ---
    def _work(self) -> None:
        while True:
            jobs = self._collect()
            if jobs is None:
                return
            with self.model_lock:
                jobs = [j for j in jobs if not j.cancelled]  # a job may have timed out while the lock was held
                if jobs:
                    self._decode(jobs)
                with self.cond:
                    call = self.calls.popleft() if self.calls else None
                if call is not None:  # one call per batch: decoding and calls take turns
                    fn, future = call
                    try:
                        future.set_result(fn())
                    except Exception as exc:
                        future.set_exception(exc)

    def _collect(self) -> list[Job] | None:
        """Block for the oldest job, then gather rows until as many wait as the recent demand (`demand`: per recent
        batch, its rows plus those that queued while it ran; the largest of the last 4, at most max_batch_size),
        or until batch_wait_s passes without a new arrival, or 10 x batch_wait_s in all; pop every job that fits,
        oldest first.

        Why: clients in a closed loop (each sends its next request when its last one returns) come back together,
        but spread over ~100 ms on a loaded 2-core CPU (3-5 ms of HTTP parsing each). A fixed window of a few ms
        split 32 such clients into a full batch and a batch of stragglers that then made the others wait
        (measured: batches of 32, 1, 32, 1 ..., half the throughput). Waiting for the demand regroups them; the
        quiet gap keeps the wait short when fewer come back; the largest of 4 keeps one small tail batch from
        resetting the estimate. One client: the target is 1 row, no wait at all."""
        with self.cond:
            while not self.pending and not self.calls and not self.stopping:
                self.cond.wait(0.5)
            if self.stopping:
                return None
            if not self.pending:  # only a call waits: run it now
                return []
            target = min(self.max_batch_size, max(self.demand, default=1))
            waiting = lambda: sum(len(j.rows) for j in self.pending)  # noqa: E731
            now = time.monotonic()
            cap, arrived, seen = now + 10 * self.batch_wait_s, now, len(self.pending)
            while waiting() < target and not self.stopping:
                until = min(arrived + self.batch_wait_s, cap)
                if time.monotonic() >= until:
                    break
                self.cond.wait(until - time.monotonic())
                if len(self.pending) != seen:
                    seen, arrived = len(self.pending), time.monotonic()
            jobs, rows = [], 0
            while self.pending and rows + len(self.pending[0].rows) <= self.max_batch_size:
                job = self.pending.popleft()
                if job.cancelled:  # gone before it started: nothing to decode, nobody to answer
                    continue
                jobs.append(job)
                rows += len(job.rows)
            return jobs

    def _decode(self, jobs: list[Job]) -> None:
        from decoding.generate import decode_steps
        from decoding.guides import left_pad

        rows = [r for j in jobs for r in j.rows]
        owner = [j for j in jobs for _ in j.rows]
        index = [i for j in jobs for i in range(len(j.rows))]  # a row's choice index within its job
        self.recent.append(len(rows))
        self.stats.update(running_rows=len(rows), last_batch_rows=len(rows), batches=self.stats["batches"] + 1,
                          rows=self.stats["rows"] + len(rows),
                          max_batch_rows=max(self.stats["max_batch_rows"], len(rows)))
        try:
            g, tok = self.g, self.g.tokenizer
            ids, mask = left_pad([r.tokens.base for r in rows], tok.pad_token_id, g.base.device)
            rule = build_rule(g, [(r.personalization, r.tokens) for r in rows])
            top_p = torch.tensor([r.top_p for r in rows]) if any(r.top_p < 1 for r in rows) else None
            steps = decode_steps(g.base, ids, mask, rule, max_new_tokens=max(r.max_tokens for r in rows),
                                 eos_token_id=self.eos, pad_token_id=tok.pad_token_id,
                                 temperature=torch.tensor([r.temperature for r in rows]), top_p=top_p,
                                 seeds=[r.seed for r in rows])
            done = torch.zeros(len(rows), dtype=torch.bool)
            token = next(steps)
            while True:
                for b, t in enumerate(token.tolist()):
                    if not done[b]:
                        done[b] = self._take(rows[b], owner[b], index[b], t)
                try:
                    token = steps.send(done)
                except StopIteration:
                    break
            for b, r in enumerate(rows):  # decode_steps ended at max_new_tokens: every live row hit its limit
                if not done[b]:
                    self._finish(r, owner[b], index[b], "length")
            outcome = ("end", None, None)
        except Exception:  # a bug or an out-of-memory: fail this batch's requests, keep serving
            error_id = uuid.uuid4().hex[:12]  # the details stay in the log, under this id; clients get the id
            log.exception("decode batch of %d rows failed (error id %s)", len(rows), error_id)
            self.stats["failed_batches"] += 1
            outcome = ("error", None, f"error id {error_id}; the details are in the server log")
        # settle the state before any client hears back (a client may send its next request at once)
        self.stats["running_rows"] = 0
        with self.cond:  # the demand seen during this batch: its rows and those that queued meanwhile
            self.demand.append(len(rows) + sum(len(j.rows) for j in self.pending))
        for job in jobs:
            job.emit(*outcome)

    def _take(self, row: Row, job: Job, index: int, token: int) -> bool:
        """Account one emitted token of a live row; True when the row is finished now."""
        if job.cancelled:
            row.finish_reason = "cancelled"
            self.stats["cancelled_rows"] += 1
            return True
        if token in self.eos:
            return self._finish(row, job, index, "stop")
        row.ids.append(token)
        self.stats["completion_tokens"] += 1
        if row.stop or job.stream:
            row.text = self.g.tokenizer.decode(row.ids, skip_special_tokens=True)
            cut = min((i for i in (row.text.find(s, max(0, row.sent - len(s))) for s in row.stop) if i >= 0),
                      default=-1)
            if cut >= 0:
                row.text = row.text[:cut]
                return self._finish(row, job, index, "stop", decoded=True)
            if job.stream:
                hold = max((len(s) for s in row.stop), default=1) - 1  # a stop string may be starting
                end = len(row.text) - hold
                while end > row.sent and row.text[end - 1] == "\ufffd":  # an incomplete multi-byte character
                    end -= 1
                if end > row.sent:
                    job.emit("delta", index, row.text[row.sent:end])
                    row.sent = end
        if len(row.ids) >= row.max_tokens:
            return self._finish(row, job, index, "length", decoded=bool(row.stop or job.stream))
        return False

    def _finish(self, row: Row, job: Job, index: int, reason: str, decoded: bool = False) -> bool:
        if not decoded:
            row.text = self.g.tokenizer.decode(row.ids, skip_special_tokens=True)
        row.finish_reason = reason
        if job.stream and len(row.text) > row.sent:
            job.emit("delta", index, row.text[row.sent:])
            row.sent = len(row.text)
        job.emit("finish", index, reason)
        return True
