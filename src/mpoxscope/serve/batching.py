"""Micro-batching and admission control for the web service, free of HTTP.

A :class:`MicroBatcher` groups single items submitted from many requests into one call of a batch function:
a worker thread takes the first waiting item, then up to ``max_batch - 1`` more that are already waiting or
arrive within ``max_wait_s``, and runs one forward pass for all of them. Under load the queue is never empty,
so batches fill without waiting; when idle, a lone request waits at most ``max_wait_s`` more.

It is built on threads and :mod:`concurrent.futures` rather than on one event loop, so the same batcher works
for requests served by any loop (uvicorn's, or one per request in Starlette's TestClient).

:class:`Admission` bounds what the server holds: a count of requests in flight (reading, decoding, waiting,
running) and the bytes their bodies may occupy. A request that does not fit is refused (503) before any of
its body is read, so a burst of large uploads cannot grow memory without limit.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_STOP = object()


@dataclass(frozen=True)
class BatchInfo:
    """What one item's batch looked like: its size, when it started and how long the call took."""

    size: int
    started: float  # time.perf_counter() when the batch call began
    seconds: float


class MicroBatcher(Generic[T, R]):
    """Run ``fn(items) -> results`` (one result per item, same order) on batches of submitted items.

    ``workers`` batches may run at once (each in its own thread). ``submit`` returns a Future resolving to
    ``(result, BatchInfo)``; an exception raised by ``fn`` fails every item of that batch.
    """

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], max_batch: int = 16, max_wait_s: float = 0.005,
                 workers: int = 1, name: str = "batcher", on_idle: Callable[[], Any] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if not max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.fn = fn
        self.on_idle = on_idle  # called after a batch when nothing is waiting (never between busy batches)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.workers = workers
        self.name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        self.batch_sizes: list[int] = []  # one entry per batch run (kept short: see _record)
        self._seconds_per_item = 0.0  # moving average, for Retry-After estimates

    # ----- public -----------------------------------------------------------------------------------------

    def submit(self, item: T) -> Future:
        """Queue ``item``; the Future resolves to ``(result, BatchInfo)``."""
        self._start()
        fut: Future = Future()
        self._queue.put((item, fut, time.perf_counter()))
        return fut

    @property
    def seconds_per_item(self) -> float:
        """Recent average compute time per item (0 before the first batch)."""
        return self._seconds_per_item

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker threads once the items already queued have run."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(_STOP)
        for t in threads:
            t.join(timeout)

    # ----- worker -----------------------------------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name} is closed")
            if self._threads:
                return
            for i in range(self.workers):
                # daemon: an app built without its lifespan (tests) must not keep the interpreter alive
                t = threading.Thread(target=self._loop, name=f"{self.name}-{i}", daemon=True)
                t.start()
                self._threads.append(t)

    def _collect(self, first: Any) -> tuple[list[Any], bool]:
        """``first`` plus whatever else arrives in time, up to max_batch; True when a stop was seen."""
        batch = [first]
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                # Items already waiting are taken at once, even after the deadline: under load, full batches.
                entry = self._queue.get_nowait() if remaining <= 0 else self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if entry is _STOP:
                return batch, True
            batch.append(entry)
        return batch, False

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = self._collect(first)
            self._run(batch)
            if stop:
                return
            if self.on_idle is not None and self._queue.empty():
                self.on_idle()

    def _run(self, batch: list[Any]) -> None:
        # A request that gave up (client gone, cancelled) drops out here instead of costing a forward pass.
        live = [(item, fut) for item, fut, _ in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return
        started = time.perf_counter()
        try:
            results = list(self.fn([item for item, _ in live]))
            if len(results) != len(live):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(live)} items")
        except BaseException as e:  # noqa: BLE001 - handed to every waiting request, which reports it
            for _, fut in live:
                fut.set_exception(e)
            return
        seconds = time.perf_counter() - started
        info = BatchInfo(size=len(live), started=started, seconds=seconds)
        self._record(len(live), seconds)
        for (_, fut), result in zip(live, results):
            fut.set_result((result, info))

    def _record(self, size: int, seconds: float) -> None:
        with self._lock:
            self.batch_sizes.append(size)
            if len(self.batch_sizes) > 10_000:
                del self.batch_sizes[:5_000]
            per_item = seconds / size
            a = 0.2
            self._seconds_per_item = per_item if not self._seconds_per_item else (
                (1 - a) * self._seconds_per_item + a * per_item)


class QueueFull(Exception):
    """The server holds as many requests (or upload bytes) as it is allowed to; ``retry_after`` in seconds."""

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class Admission:
    """At most ``max_requests`` requests and ``max_bytes`` declared body bytes in flight at once.

    A request without a usable Content-Length is charged ``default_bytes`` (the upload limit), the most it
    may send.
    """

    def __init__(self, max_requests: int, max_bytes: int, default_bytes: int) -> None:
        if max_requests < 1:
            raise ValueError(f"max_requests must be at least 1, got {max_requests}")
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.default_bytes = default_bytes
        self.requests = 0
        self.bytes = 0
        self.refused = 0
        self._lock = threading.Lock()

    def charge(self, content_length: str | None) -> int:
        """Bytes a request is charged for."""
        if content_length is not None and content_length.strip().isdigit():
            return min(int(content_length), self.default_bytes)
        return self.default_bytes

    def enter(self, cost: int, retry_after: Callable[[int], int]) -> None:
        """Take a slot for a request charged ``cost`` bytes, or raise :class:`QueueFull`."""
        with self._lock:
            if self.requests >= self.max_requests:
                self.refused += 1
                raise QueueFull(f"server busy: {self.requests} requests already queued (limit "
                                f"{self.max_requests}); retry shortly", retry_after(self.requests))
            # A single request larger than the whole budget still gets in when nothing else is held.
            if self.bytes and self.bytes + cost > self.max_bytes:
                self.refused += 1
                raise QueueFull(f"server busy: {self.bytes / 1e6:.0f} MB of uploads already held (limit "
                                f"{self.max_bytes / 1e6:.0f} MB); retry shortly", retry_after(self.requests))
            self.requests += 1
            self.bytes += cost

    def leave(self, cost: int) -> None:
        with self._lock:
            self.requests -= 1
            self.bytes -= cost


def retry_after_seconds(waiting: int, seconds_per_item: float) -> int:
    """Whole seconds until the queue ahead has likely drained (at least 1, at most 60)."""
    return int(min(60, max(1, math.ceil(waiting * seconds_per_item))))


class PixelBudget:
    """At most ``total`` decoded pixels in flight across threads: a photo near the pixel limit decodes alone,
    small ones decode side by side. ``hold(n)`` blocks the calling (worker) thread until ``n`` pixels fit."""

    def __init__(self, total: int) -> None:
        self.total = max(1, int(total))
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, pixels: int) -> int:
        n = min(max(1, int(pixels)), self.total)
        with self._cond:
            self._cond.wait_for(lambda: self.used + n <= self.total)
            self.used += n
        return n

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


def release_free_memory() -> bool:
    """Hand memory that is free inside the C allocator back to the system (glibc ``malloc_trim``): each
    thread's malloc arena otherwise keeps the pages of a large decode or forward pass, so resident memory
    ratchets up with the number of threads. False where there is no glibc."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM is False:
        return False
    _TRIM(0)
    return True


_TRIM: Any = None
