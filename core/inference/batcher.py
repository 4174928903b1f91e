"""Micro-batching: concurrent requests for one model are gathered into one batch, up to
``max_batch_size`` images or ``max_wait_ms`` after the first one arrived, and run together. One worker
thread per model keeps the engine busy while request threads wait on futures; ``max_batch_size=1``
turns batching off (each request runs alone, in arrival order). Requests *announce* themselves before
they decode their image, so the batcher waits only while more are on the way: a lone request does
not pay ``max_wait_ms``.

``workers`` engine threads (default 1) gather and run batches side by side from the one queue: with a
single-threaded engine session each, two workers on two cores keep both cores on inference under load
and leave one idle at low load, where one session with two intra-op threads pays their hand-offs on
every operator (measured in benchmarks/api_load.py: 1.83 -> 0.98 server cores at concurrency 1)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import numpy as np


class BatcherClosed(RuntimeError):
    """The model was unloaded or replaced while the request waited; retry on the new one."""


@dataclass
class _Job:
    inputs: np.ndarray  # (n, 3, H, W)
    flag: bool = False  # passed to run(): e.g. "this request wants heatmaps"
    future: Future[Any] = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    """What one batch took: images in it, the queue wait, engine seconds."""

    size: int
    queue_wait_s: float
    run_s: float


class MicroBatcher:
    """``submit(inputs) -> Future`` of ``(rows, stats)``: ``run(batch)``'s rows for those inputs (a tuple
    of arrays when ``run`` returns several outputs) and this job's :class:`BatchStats` (its own queue
    wait). ``on_batch`` is called with the batch's stats (the first job's wait) after each batch."""

    @overload
    def __init__(
        self,
        run: Callable[[np.ndarray], Any],
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        name: str = "model",
        on_batch: Callable[[BatchStats], None] | None = None,
        max_queue: int = 4096,
        workers: int = 1,
        takes_flag: Literal[False] = False,
    ) -> None: ...

    @overload
    def __init__(
        self,
        run: Callable[[np.ndarray, bool], Any],
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        name: str = "model",
        on_batch: Callable[[BatchStats], None] | None = None,
        max_queue: int = 4096,
        workers: int = 1,
        takes_flag: Literal[True],
    ) -> None: ...

    def __init__(
        self,
        run: Callable[..., Any],
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        name: str = "model",
        on_batch: Callable[[BatchStats], None] | None = None,
        max_queue: int = 4096,
        workers: int = 1,
        takes_flag: bool = False,
    ) -> None:
        # run(batch), or run(batch, flag) with takes_flag: the overloads tie the one to the other
        self.run, self.max_batch_size, self.max_wait = run, max(1, max_batch_size), max_wait_ms / 1000
        self.on_batch = on_batch
        self.takes_flag = takes_flag
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._closing = threading.Lock()  # no job can be queued behind close()'s end-of-queue marker
        self._incoming = 0  # requests announced (decoding) but not yet submitted
        self._incoming_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._loop, name=f"batcher-{name}-{i}", daemon=True)
            for i in range(max(1, workers))
        ]
        for thread in self._threads:
            thread.start()

    def announce(self) -> None:
        """A request will submit soon (it is decoding its image): worth waiting for, up to max_wait_ms."""
        with self._incoming_lock:
            self._incoming += 1

    def withdraw(self) -> None:
        """An announced request will not submit after all (its image was refused)."""
        with self._incoming_lock:
            self._incoming = max(0, self._incoming - 1)

    def submit(self, inputs: np.ndarray, announced: bool = False, flag: bool = False) -> Future[Any]:
        """Queue ``inputs``; ``flag`` reaches ``run(batch, flag)`` (true if any job of the batch set it)."""
        if announced:
            self.withdraw()
        job = _Job(np.ascontiguousarray(inputs, dtype=np.float32), flag)
        with (
            self._closing
        ):  # checked and queued in one step: a job queued after the marker would wait for ever
            if self._closed:
                raise BatcherClosed("the model is being unloaded")
            self._queue.put(job)
        return job.future

    def close(self, drain: bool = True) -> None:
        """Stop taking jobs; with ``drain`` the queued ones still run, else they fail with BatcherClosed."""
        with self._closing:
            self._closed = True
        if not drain:
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job.future.set_exception(BatcherClosed("the model was unloaded"))
        for _ in self._threads:  # one end-of-queue marker for each worker; each stops at the first it reads
            self._queue.put(None)
        deadline = time.monotonic() + 60
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _gather(self, first: _Job) -> tuple[list[_Job], bool, _Job | None]:
        """The batch that starts with ``first``, whether the end-of-queue marker was read, and a job that
        did not fit (the worker's next batch starts with it)."""
        jobs, count, stop, carry = [first], len(first.inputs), False, None
        deadline = time.perf_counter() + self.max_wait
        while count < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            # wait only while someone is on the way: a lone request runs at once, a crowd is gathered
            patient = remaining > 0 and (self._incoming > 0 or not self._queue.empty())
            try:
                job = self._queue.get(timeout=min(remaining, 0.001)) if patient else self._queue.get_nowait()
            except queue.Empty:
                if patient:
                    continue
                break
            if job is None:
                stop = True
                break
            if count + len(job.inputs) > self.max_batch_size:
                carry = job
                break
            jobs.append(job)
            count += len(job.inputs)
        return jobs, stop, carry

    def _loop(self) -> None:
        carry: _Job | None = None  # a job that did not fit in this worker's last batch: its next one's first
        while True:
            job = carry or self._queue.get()
            if job is None:
                return
            jobs, stop, carry = self._gather(job)
            self._run(jobs)
            if stop:
                if carry is not None:
                    self._run([carry])
                return

    def _run(self, jobs: list[_Job]) -> None:
        started = time.perf_counter()
        wait = started - jobs[0].queued_at
        batch = jobs[0].inputs if len(jobs) == 1 else np.concatenate([j.inputs for j in jobs])
        flag = any(j.flag for j in jobs)
        try:
            # a job larger than a batch (one request of many images) runs in batch-sized pieces: the
            # engine never sees more than max_batch_size images at once
            pieces = [
                self.run(part, flag) if self.takes_flag else self.run(part)
                for part in (
                    batch[i : i + self.max_batch_size] for i in range(0, len(batch), self.max_batch_size)
                )
            ]
            outputs = pieces[0] if len(pieces) == 1 else _concatenate(pieces)
        except BaseException as exc:  # the engine failed: every waiting request hears why
            for j in jobs:
                j.future.set_exception(exc)
            return
        took = time.perf_counter() - started
        start = 0
        for j in jobs:
            n = len(j.inputs)
            try:
                rows = _rows(outputs, start, n)
            except Exception as exc:  # outputs of a shape nobody can split: the request hears why
                j.future.set_exception(exc)
            else:
                j.future.set_result((rows, BatchStats(len(batch), started - j.queued_at, took)))
            start += n
        if self.on_batch:
            self.on_batch(BatchStats(len(batch), wait, took))


def _concatenate(pieces: list[Any]) -> Any:
    """The outputs of several runs as if from one: arrays joined along the batch axis, in a tuple or a
    dict like ``run`` returned them (``None`` outputs stay ``None``)."""
    first = pieces[0]
    if isinstance(first, tuple):
        return tuple(_concatenate([p[i] for p in pieces]) for i in range(len(first)))
    if isinstance(first, dict):
        return {name: _concatenate([p[name] for p in pieces]) for name in first}
    if first is None:
        return None
    if isinstance(first, list):  # e.g. one array per stage
        return [_concatenate([p[i] for p in pieces]) for i in range(len(first))]
    return np.concatenate(pieces)


def _rows(outputs: Any, start: int, n: int) -> Any:
    """Rows ``start:start + n`` of every array in ``outputs`` (an array, or a tuple, list or dict of
    them; ``None`` stays ``None``)."""
    if isinstance(outputs, tuple | list):
        return type(outputs)(_rows(o, start, n) for o in outputs)
    if isinstance(outputs, dict):
        return {name: _rows(o, start, n) for name, o in outputs.items()}
    if outputs is None:
        return None
    return outputs[start : start + n]
