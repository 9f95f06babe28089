"""A micro-batcher: concurrent callers' items are run through one model call together.

Each caller hands one item to :meth:`MicroBatcher.submit` and blocks until its own result comes back.
A worker thread takes the first waiting item, keeps collecting for up to ``max_wait_ms`` (or until
``max_size`` items are in), runs ``fn`` once on the list and hands each caller the result at its
index. A batch whose call fails is retried one item at a time, so one bad item fails only its own
caller. No model, no database, no UI here: the predictor wraps its image tower with one
(``model.batch_images``).
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class BatchStats:
    """What the batcher did so far (for logs and benchmarks)."""

    batches: int = 0
    items: int = 0
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many batches had it

    @property
    def mean_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0


class MicroBatcher(Generic[T, R]):
    """Runs ``fn(items) -> results`` (same length, same order) on batches of concurrent submissions."""

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], *, max_size: int, max_wait_ms: float,
                 name: str = "batcher"):
        if max_size < 1 or max_wait_ms < 0:
            raise ValueError(f"a micro-batcher needs max_size >= 1 and max_wait_ms >= 0, got {max_size}, {max_wait_ms}")
        self.fn = fn
        self.max_size = max_size
        self.max_wait_s = max_wait_ms / 1e3
        self.stats = BatchStats()
        self._queue: queue.SimpleQueue[tuple[T, Future] | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name=f"mmapp-{name}", daemon=True)
        self._worker.start()

    def submit(self, item: T, *, timeout_s: float | None = None) -> R:
        """``fn([item])[0]``, computed together with whatever else is submitted meanwhile."""
        future: Future = Future()
        self._queue.put((item, future))
        return future.result(timeout=timeout_s)

    def close(self) -> None:
        self._queue.put(None)

    def _collect(self, first: tuple[T, Future]) -> tuple[list[tuple[T, Future]], bool]:
        batch, closed = [first], False
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_size:
            try:  # whatever is already waiting joins at once; then wait for more until the deadline
                entry = self._queue.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    entry = self._queue.get(timeout=left)
                except queue.Empty:
                    break
            if entry is None:
                closed = True
                break
            batch.append(entry)
        return batch, closed

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, closed = self._collect(first)
            self._run_batch(batch)
            if closed:
                return

    def _run_batch(self, batch: list[tuple[T, Future]]) -> None:
        items = [item for item, _ in batch]
        try:
            results = list(self.fn(items))
            if len(results) != len(items):
                raise RuntimeError(f"batched call returned {len(results)} results for {len(items)} items")
        except BaseException as exc:  # noqa: BLE001 - handed to the callers, never kills the worker
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            for entry in batch:  # one bad item must not fail the others: each alone
                self._run_batch([entry])
            return
        self.stats.batches += 1
        self.stats.items += len(items)
        self.stats.largest = max(self.stats.largest, len(items))
        self.stats.sizes[len(items)] = self.stats.sizes.get(len(items), 0) + 1
        for (_, future), result in zip(batch, results):
            future.set_result(result)
