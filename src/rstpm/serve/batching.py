"""Micro-batching: concurrent requests grouped into one inference call on a worker thread.

A :class:`MicroBatcher` owns one worker thread and one bounded queue. ``await submit(item)``
puts the item on the queue (or raises :class:`QueueFullError` at once when the queue is full:
never an unbounded backlog) and waits for its result. The worker takes the first waiting item,
then whatever else arrives within ``max_wait_s`` up to ``max_batch_size`` items, runs ``process``
on the batch off the event loop, and hands each result (or exception) back to its caller's
event loop. ``queue_size`` counts the items waiting for the worker; a batch being computed is
not in the queue, so at most ``queue_size + max_batch_size`` items are admitted at once.

Shutdown is graceful: :meth:`close` refuses new items (:class:`ShuttingDownError`), lets the
worker finish every item already queued, then stops the thread.

A watchdog reads :meth:`MicroBatcher.stalled`: items in flight and no batch finished for a given
time (a worker stuck in ``process``). ``on_done(item)`` is called on the worker thread for each
item once its batch is done, before its caller gets the result, also when its caller stopped
waiting (a timeout).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

BatchObserver = Callable[[int, float], None]
"""Called by the worker after each batch with its size and its seconds of processing."""

DoneHook = Callable[[Any], None]
"""Called by the worker with each item whose batch is done (results delivered)."""


class QueueFullError(RuntimeError):
    """The queue is full: the caller should retry later (HTTP 503 with Retry-After)."""


class ShuttingDownError(RuntimeError):
    """The batcher is closing and takes no new items."""


@dataclass
class _Job:
    item: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


_STOP = object()


def _resolve(future: asyncio.Future, result: Any) -> None:
    """On the caller's loop: deliver a result unless the caller went away (cancelled)."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class MicroBatcher(Generic[T, R]):
    """Groups submitted items into batches for ``process`` on one worker thread.

    ``process(items)`` returns one result per item, in order; a result that is an exception is
    raised to that item's caller only. An exception raised by ``process`` itself goes to every
    caller of the batch.
    """

    def __init__(
        self,
        process: Callable[[list[T]], Sequence[R | BaseException]],
        max_batch_size: int = 16,
        max_wait_s: float = 0.005,
        queue_size: int = 64,
        observe: BatchObserver | None = None,
        name: str = "rstpm-batcher",
        on_done: DoneHook | None = None,
    ) -> None:
        if max_batch_size < 1 or queue_size < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and queue_size must be >= 1, max_wait_s >= 0")
        self._process = process
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._observe = observe
        self._on_done = on_done
        self._progress = time.monotonic()  # last batch finished, or work arrived at an idle worker
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._closed = False

    @property
    def queued(self) -> int:
        """Items waiting for the worker (not yet in a batch)."""
        return self._queue.qsize()

    @property
    def in_flight(self) -> int:
        """Items accepted and not yet answered: queued or being computed."""
        return self._in_flight

    def stalled(self, seconds: float) -> bool:
        """Items are in flight and the worker has finished no batch for more than ``seconds``
        (counted from the later of its last batch and the arrival of work at an idle worker)."""
        return self._in_flight > 0 and time.monotonic() - self._progress > seconds

    def start(self) -> None:
        self._thread.start()

    async def submit(self, item: T) -> R:
        """The item's result, computed in a batch on the worker thread.

        Raises:
            QueueFullError: the queue is full (nothing was queued).
            ShuttingDownError: the batcher is closing.
        """
        loop = asyncio.get_running_loop()
        job = _Job(item, loop.create_future(), loop)
        with self._lock:
            if self._closed:
                raise ShuttingDownError("the server is shutting down")
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise QueueFullError("the inference queue is full") from None
            if self._in_flight == 0:
                self._progress = time.monotonic()
            self._in_flight += 1
        return await job.future

    def close(self, timeout: float | None = None) -> None:
        """Refuse new items, finish the queued ones, stop the worker (blocking: call it off the
        event loop)."""
        with self._lock:  # no item can be queued after the stop marker
            self._closed = True
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = self._collect(first)
            self._compute(batch)
            if stop:
                return

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """The first job and those arriving within max_wait, up to max_batch_size; and whether
        the stop marker came."""
        batch = [first]
        deadline = time.monotonic() + self._max_wait_s
        while len(batch) < self._max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(remaining > 0, max(remaining, 0.0))
            except queue.Empty:
                break
            if job is _STOP:
                return batch, True
            batch.append(job)
        return batch, False

    def _compute(self, batch: list[_Job]) -> None:
        start = time.perf_counter()
        try:
            results: Sequence[Any] = self._process([job.item for job in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} gave {len(results)} results")
        except Exception as error:  # noqa: BLE001 - delivered to every caller of the batch
            results = [error] * len(batch)
        if self._observe is not None:
            self._observe(len(batch), time.perf_counter() - start)
        self._progress = time.monotonic()
        for job, result in zip(batch, results, strict=True):
            with self._lock:
                self._in_flight -= 1
            if self._on_done is not None:  # before the caller hears: its answer sees it done
                self._on_done(job.item)
            try:
                job.loop.call_soon_threadsafe(_resolve, job.future, result)
            except RuntimeError:  # the caller's loop is closed: nobody waits for it
                pass
