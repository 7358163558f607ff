"""Micro-batching: requests that arrive together are merged, then run one model call at a time. asyncio + one
worker thread.

The event loop only queues and hands out results; the model runs in a single worker thread, so the loop stays
free to accept, parse and answer while a call computes (ONNX Runtime releases the GIL and parallelises inside
the call with its own threads). While one merged batch runs, the next one gathers.

A merged batch is worked through call by call (``Encoder.plan``: its texts sorted by length and cut into calls of
``batch_size`` rows). Between two calls the batcher looks at who still waits: a request that timed out or whose
client left has its future cancelled by its handler, and calls that would only compute texts of such requests
are skipped, so the worker is free for the next batch at once instead of finishing work nobody reads.

With a token budget (``TokenBudget``, ``server.budget``) a batch is chosen by ``plan_batch`` instead of by text
count alone: whole requests whose merged call stays within a number of padded tokens, so that a long request
does not make short ones pad to its length. Requests then carry their token counts (``submit(lengths=...)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..batching import ModelCall
from ..errors import DebertaOnnxError
from ..heap import release_free_heap
from .budget import TokenBudget, plan_batch

__all__ = ["BatchObserver", "BatchStats", "BatcherClosedError", "MicroBatcher", "Outputs", "PlanFn",
           "QueueFullError"]

logger = logging.getLogger("deberta_onnx")

# inputs (texts, or pairs) -> the model calls that compute them (``Encoder.plan``, ``SequenceClassifier.plan``,
# ``TokenClassifier.plan``); the iterator is advanced in the worker thread.
PlanFn = Callable[[list[Any]], Iterator[ModelCall]]
# One request's outputs in input order: rows of an array (vectors, logits), or a list (one object per input).
Outputs = np.ndarray | list[Any]


class BatchObserver(Protocol):
    """What the batcher reports, for metrics: called on the event loop."""

    def queue_wait(self, seconds: float) -> None:
        """A request's batch started ``seconds`` after the request arrived."""

    def model_call(self, call: ModelCall, *, requests: int, seconds: float) -> None:
        """``call`` ran in ``seconds``, computing rows of ``requests`` requests."""

    def failure(self) -> None:
        """A model call raised."""


class QueueFullError(DebertaOnnxError):
    """The request queue holds as many texts as it may; the request was not queued."""


class BatcherClosedError(DebertaOnnxError):
    """The batcher is shutting down and takes no more requests."""


@dataclass
class BatchStats:
    """Counters, read by ``GET /health``. Touched only on the event loop, so no lock is needed.

    ``requests_served`` and ``texts_encoded`` count only answers handed to a waiting request; work for requests
    that timed out or whose client left is in ``timed_out``, ``disconnected`` and ``texts_dropped`` instead.
    """

    requests_served: int = 0
    texts_encoded: int = 0
    batches_run: int = 0
    model_calls: int = 0
    model_calls_skipped: int = 0
    largest_batch: int = 0
    rejected_queue_full: int = 0
    timed_out: int = 0
    disconnected: int = 0
    texts_dropped: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(eq=False)
class _Pending:
    texts: list[Any]
    future: asyncio.Future[tuple[Outputs, list[int]]]
    arrived: float
    lengths: Sequence[int] = ()  # token counts per input, with a token budget
    started: bool = False  # its first batch began (its queue wait was observed)
    queued: bool = field(default=True)
    computed: int = 0  # rows of this request a model call has computed
    dropped: bool = False  # its uncomputed rows are counted in texts_dropped


class MicroBatcher:
    """Queues texts from many requests and runs them through the model together, one model call at a time.

    A batch is started when the queued texts reach ``max_batch_size``, or ``max_wait_s`` after its oldest
    request arrived, whichever comes first (at once while draining, see ``drain``). Whole requests are merged (a
    request is never split across batches); a request larger than ``max_batch_size`` runs alone. At most
    ``max_queue`` texts wait; a request that would pass that is refused at once with ``QueueFullError``.

    Cancelling the future of a request (its caller's ``submit`` being cancelled, on a timeout or when the client
    left) takes it out of the queue, or, once its batch runs, out of the model calls still to come.

    Args:
        plan_fn: texts -> their model calls (``Encoder.plan``); the calls are advanced and run in the worker.
        max_batch_size: texts per merged batch.
        max_wait_s: how long the oldest request may wait for others to join its batch.
        max_queue: the most texts waiting (not counting the batch that is running).
        budget: a token budget per batch (``TokenBudget``; its ``max_texts`` replaces ``max_batch_size``), or
            ``None``: texts alone limit a batch. With a budget, ``submit`` needs each input's token count.
        observer: told of queue waits, model calls and failures (metrics), or ``None``.
        release_tokens: when the queue empties after a model call of at least this many padded tokens, the
            worker hands the C heap's free pages back to the system (``release_free_heap``): what the burst's
            tokenization and answers freed after the call's own arena shrinkage (``arena_shrink_tokens``). ``None``:
            never.
    """

    def __init__(self, plan_fn: PlanFn, *, max_batch_size: int, max_wait_s: float, max_queue: int,
                 budget: TokenBudget | None = None, observer: BatchObserver | None = None,
                 release_tokens: int | None = None) -> None:
        self._plan = plan_fn
        self.release_tokens = release_tokens
        self._release_when_idle = False
        self.budget = budget
        self.observer = observer
        self._queued_tokens = 0
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._queue: deque[_Pending] = deque()
        self._queued_texts = 0
        self._running = 0
        self._draining = False
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

    @property
    def running_requests(self) -> int:
        """Requests of the batch the worker is on."""
        return self._running

    def start(self) -> None:
        """Starts the batching task on the running event loop."""
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(self._wakeup), name="deberta-onnx-batcher")

    def drain(self) -> None:
        """Runs what is queued without waiting for batches to fill (the server is shutting down)."""
        self._draining = True
        if self._wakeup is not None:
            self._wakeup.set()

    async def close(self) -> None:
        """Refuses new requests, fails queued ones with ``BatcherClosedError`` and stops the worker."""
        self._closed = True
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(BatcherClosedError("the server is shutting down"))
        self._queued_texts = 0
        self._queued_tokens = 0
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, texts: list[Any], lengths: Sequence[int] | None = None) -> tuple[Outputs, list[int]]:
        """Queues ``texts`` (or pairs) and waits for their outputs and token counts, in order.

        ``lengths`` (each input's token count, e.g. ``Encoder.token_count``) is needed with a token budget and
        ignored without one.

        Cancelling the caller (on a timeout, or when its client left) takes the request out of the queue if it
        has not started, and out of the rest of its batch's model calls if it has.

        Raises:
            ValueError: ``texts`` is empty, or ``lengths`` is missing or of another length with a token budget.
            QueueFullError: the queue cannot take ``len(texts)`` more texts.
            BatcherClosedError: the batcher is closed or was never started.
            Exception: whatever the model call raised for this request.
        """
        if not texts:
            raise ValueError("submit needs at least one text")
        if self.budget is not None and (lengths is None or len(lengths) != len(texts)):
            raise ValueError("a batcher with a token budget needs one token count per input (lengths=...)")
        if self._closed or self._wakeup is None:
            raise BatcherClosedError("the server is shutting down" if self._closed else "the batcher is not running")
        if self._queued_texts + len(texts) > self.max_queue:
            self.stats.rejected_queue_full += 1
            raise QueueFullError(
                f"the server is overloaded: {self._queued_texts} texts are queued and the queue holds at most "
                f"{self.max_queue}; retry after a short wait"
            )
        loop = asyncio.get_running_loop()
        pending = _Pending(texts=texts, future=loop.create_future(), arrived=loop.time(),
                           lengths=lengths if self.budget is not None and lengths is not None else ())
        self._queue.append(pending)
        self._queued_texts += len(texts)
        self._queued_tokens += sum(pending.lengths)
        self._wakeup.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            pending.future.cancel()  # seen by the batch, if it is running
            if pending.queued:
                self._queue.remove(pending)
                self._queued_texts -= len(texts)
                self._queued_tokens -= sum(pending.lengths)
                pending.dropped = True
                self.stats.texts_dropped += len(texts)
                self._wakeup.set()
            raise

    async def _run(self, wakeup: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wakeup.clear()
            if not self._queue:
                if self._release_when_idle:
                    self._release_when_idle = False
                    await loop.run_in_executor(self._executor, release_free_heap)
                    continue  # requests may have come meanwhile
                await wakeup.wait()
                continue
            remaining = self._queue[0].arrived + self.max_wait_s - loop.time()
            if not self._full() and remaining > 0 and not self._draining:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), remaining)
                continue
            batch = self._take()
            self._running = len(batch)
            try:
                await self._run_batch(batch, loop)
            finally:
                self._running = 0

    def _full(self) -> bool:
        """Enough is queued to start a batch without waiting."""
        if self.budget is None:
            return self._queued_texts >= self.max_batch_size
        limit = self.budget.max_padded_tokens
        return self._queued_texts >= self.budget.max_texts or (limit is not None and self._queued_tokens >= limit)

    def _take(self) -> list[_Pending]:
        if self.budget is not None:
            return self._take_within_budget(self.budget)
        batch: list[_Pending] = []
        size = 0
        while self._queue and (not batch or size + len(self._queue[0].texts) <= self.max_batch_size):
            pending = self._queue.popleft()
            pending.queued = False
            size += len(pending.texts)
            batch.append(pending)
        self._queued_texts -= size
        return batch

    def _take_within_budget(self, budget: TokenBudget) -> list[_Pending]:
        queued = list(self._queue)[: budget.lookahead + 1]
        chosen = plan_batch([pending.lengths for pending in queued], budget)
        batch = [queued[position] for position in chosen]
        for pending in batch:
            self._queue.remove(pending)
            pending.queued = False
            self._queued_texts -= len(pending.texts)
            self._queued_tokens -= sum(pending.lengths)
        return batch

    async def _run_batch(self, batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> None:
        texts = [text for pending in batch for text in pending.texts]
        sizes = [len(pending.texts) for pending in batch]
        owner = np.repeat(np.arange(len(batch)), sizes)  # row of the merged texts -> index of its request
        first = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        vectors: list[Outputs | None] = [None] * len(batch)
        observer = self.observer
        if observer is not None:
            now = loop.time()
            for pending in batch:
                if not pending.started:
                    observer.queue_wait(now - pending.arrived)
        for pending in batch:
            pending.started = True
        counts = [[0] * size for size in sizes]
        calls: Iterator[ModelCall] = iter(())
        try:
            calls = self._plan(texts)
            while True:
                waiting = np.fromiter((not pending.future.done() for pending in batch), dtype=bool, count=len(batch))
                if not waiting.any():
                    break  # nobody waits for the rest: the worker is free for the next batch
                step = await loop.run_in_executor(self._executor, _next_call, calls, waiting, owner)
                if step is None:
                    break
                call, out, seconds = step
                if out is None:
                    self.stats.model_calls_skipped += 1
                    continue
                self.stats.model_calls += 1
                if self.release_tokens is not None and call.padded_tokens >= self.release_tokens:
                    self._release_when_idle = True
                if observer is not None:
                    observer.model_call(call, requests=len(set(owner[call.rows].tolist())), seconds=seconds)
                for row, vector, count in zip(call.rows, out, call.token_counts):
                    index = int(owner[row])
                    pending = batch[index]
                    pending.computed += 1
                    if pending.future.done():
                        continue
                    local = row - int(first[index])
                    if vectors[index] is None:
                        vectors[index] = (np.empty((sizes[index], *out.shape[1:]), dtype=out.dtype)
                                          if isinstance(out, np.ndarray) else [None] * sizes[index])
                    vectors[index][local] = vector  # type: ignore[index]
                    counts[index][local] = count
                    if pending.computed == sizes[index]:
                        pending.future.set_result((vectors[index], counts[index]))  # type: ignore[arg-type]
                        self.stats.requests_served += 1
                        self.stats.texts_encoded += sizes[index]
        except Exception as exc:  # noqa: BLE001 - handed to the requests, not swallowed
            await self._failed(batch, exc, loop)
        else:
            self.stats.batches_run += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(texts))
        finally:
            close = getattr(calls, "close", None)
            if close is not None:
                with contextlib.suppress(ValueError):  # still running in the worker, when the batcher is closed
                    close()
            for pending in batch:
                if pending.future.cancelled() and not pending.dropped:
                    pending.dropped = True
                    self.stats.texts_dropped += len(pending.texts) - pending.computed

    async def _failed(self, batch: list[_Pending], exc: Exception, loop: asyncio.AbstractEventLoop) -> None:
        waiting = [pending for pending in batch if not pending.future.done()]
        if len(batch) == 1:
            for pending in waiting:
                self._fail(pending, exc)
            return
        # One bad request must not fail the others merged with it: run each alone to find it.
        logger.warning("a merged batch of %d requests failed (%s); running them one by one", len(batch), exc)
        for pending in waiting:
            if not pending.future.done():
                pending.computed = 0
                await self._run_batch([pending], loop)

    def _fail(self, pending: _Pending, exc: Exception) -> None:
        self.stats.failed += 1
        if self.observer is not None:
            self.observer.failure()
        logger.error("encoding a request of %d texts failed: %r", len(pending.texts), exc)
        if not pending.future.done():
            pending.future.set_exception(exc)


def _next_call(calls: Iterator[ModelCall], waiting: np.ndarray, owner: np.ndarray
               ) -> tuple[ModelCall, Any, float] | None:
    """In the worker thread: the plan's next call, run unless all its rows belong to requests nobody waits for
    (then its output is None), with the seconds it ran; None when the plan is done."""
    call = next(calls, None)
    if call is None:
        return None
    if not waiting[owner[call.rows]].any():
        return call, None, 0.0
    start = time.perf_counter()
    out = call.run()
    return call, out, time.perf_counter() - start
