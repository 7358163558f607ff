"""Micro-batching: requests that arrive together are merged into one model call. asyncio + one worker thread.

The event loop only queues and hands out results; the model runs in a single worker thread, so the loop stays
free to accept, parse and answer while a batch computes (ONNX Runtime releases the GIL and parallelises inside
the call with its own threads). While one batch runs, the next one gathers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..errors import DebertaOnnxError

__all__ = ["BatchStats", "BatcherClosedError", "EncodeFn", "MicroBatcher", "QueueFullError"]

logger = logging.getLogger("deberta_onnx")

# texts -> (vectors [len(texts), hidden] float32, token count per text)
EncodeFn = Callable[[list[str]], tuple[np.ndarray, list[int]]]


class QueueFullError(DebertaOnnxError):
    """The request queue holds as many texts as it may; the request was not queued."""


class BatcherClosedError(DebertaOnnxError):
    """The batcher is shutting down and takes no more requests."""


@dataclass
class BatchStats:
    """Counters, read by ``GET /health``. Touched only on the event loop, so no lock is needed."""

    requests_served: int = 0
    texts_encoded: int = 0
    batches_run: int = 0
    largest_batch: int = 0
    rejected_queue_full: int = 0
    timed_out: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(eq=False)
class _Pending:
    texts: list[str]
    future: asyncio.Future[tuple[np.ndarray, list[int]]]
    arrived: float
    queued: bool = field(default=True)


class MicroBatcher:
    """Queues texts from many requests and runs them through ``encode_fn`` together.

    A batch is started when the queued texts reach ``max_batch_size``, or ``max_wait_s`` after its oldest
    request arrived, whichever comes first. Whole requests are merged (a request is never split); a request
    larger than ``max_batch_size`` runs alone. At most ``max_queue`` texts wait; a request that would pass that
    is refused at once with ``QueueFullError`` rather than queued.

    Args:
        encode_fn: runs in the worker thread; returns the vectors and per-text token counts.
        max_batch_size: texts per merged call.
        max_wait_s: how long the oldest request may wait for others to join its batch.
        max_queue: the most texts waiting (not counting the batch that is running).
    """

    def __init__(self, encode_fn: EncodeFn, *, max_batch_size: int, max_wait_s: float, max_queue: int) -> None:
        self._encode = encode_fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._queue: deque[_Pending] = deque()
        self._queued_texts = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deberta-onnx-encode")

    @property
    def queued_texts(self) -> int:
        return self._queued_texts

    @property
    def queued_requests(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        """Starts the batching task on the running event loop."""
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(self._wakeup), name="deberta-onnx-batcher")

    async def close(self) -> None:
        """Refuses new requests, fails queued ones with ``BatcherClosedError`` and stops the worker."""
        self._closed = True
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(BatcherClosedError("the server is shutting down"))
        self._queued_texts = 0
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """Queues ``texts`` and waits for their vectors and token counts, in order.

        Cancelling the caller (e.g. on a timeout) takes the request out of the queue if it has not started.

        Raises:
            QueueFullError: the queue cannot take ``len(texts)`` more texts.
            BatcherClosedError: the batcher is closed or was never started.
            Exception: whatever ``encode_fn`` raised for this request.
        """
        if self._closed or self._wakeup is None:
            raise BatcherClosedError("the server is shutting down" if self._closed else "the batcher is not running")
        if self._queued_texts + len(texts) > self.max_queue:
            self.stats.rejected_queue_full += 1
            raise QueueFullError(
                f"the server is overloaded: {self._queued_texts} texts are queued and the queue holds at most "
                f"{self.max_queue}; retry after a short wait"
            )
        loop = asyncio.get_running_loop()
        pending = _Pending(texts=texts, future=loop.create_future(), arrived=loop.time())
        self._queue.append(pending)
        self._queued_texts += len(texts)
        self._wakeup.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            if pending.queued:
                self._queue.remove(pending)
                self._queued_texts -= len(texts)
                self._wakeup.set()
            raise

    async def _run(self, wakeup: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wakeup.clear()
            if not self._queue:
                await wakeup.wait()
                continue
            remaining = self._queue[0].arrived + self.max_wait_s - loop.time()
            if self._queued_texts < self.max_batch_size and remaining > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), remaining)
                continue
            await self._run_batch(self._take(), loop)

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        size = 0
        while self._queue and (not batch or size + len(self._queue[0].texts) <= self.max_batch_size):
            pending = self._queue.popleft()
            pending.queued = False
            size += len(pending.texts)
            batch.append(pending)
        self._queued_texts -= size
        return batch

    async def _run_batch(self, batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> None:
        texts = [text for pending in batch for text in pending.texts]
        try:
            vectors, counts = await loop.run_in_executor(self._executor, self._encode, texts)
        except Exception as exc:  # noqa: BLE001 - handed to the requests, not swallowed
            if len(batch) == 1:
                self._fail(batch[0], exc)
                return
            # One bad request must not fail the others merged with it: run each alone to find it.
            logger.warning("a merged batch of %d requests failed (%s); running them one by one", len(batch), exc)
            for pending in batch:
                if not pending.future.done():
                    await self._run_batch([pending], loop)
            return
        self.stats.batches_run += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(texts))
        start = 0
        for pending in batch:
            stop = start + len(pending.texts)
            if not pending.future.done():
                pending.future.set_result((vectors[start:stop], counts[start:stop]))
                self.stats.requests_served += 1
                self.stats.texts_encoded += stop - start
            start = stop

    def _fail(self, pending: _Pending, exc: Exception) -> None:
        self.stats.failed += 1
        logger.error("encoding a request of %d texts failed: %r", len(pending.texts), exc)
        if not pending.future.done():
            pending.future.set_exception(exc)
