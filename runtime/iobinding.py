"""Stage two, IO-binding variant: token ids go to the device once per batch, pooled vectors come back.

For each (batch, sequence) shape a bucket holds buffers allocated once and bound once: one device buffer
with ``input_ids`` and ``attention_mask`` side by side (so a batch is one host-to-device copy), and the
``[batch, hidden]`` output buffer on the device. Nothing else crosses the bus: the hidden states of every
layer stay where ONNX Runtime computed them. Buckets are kept in least-recently-used order and capped, so
memory cannot grow with the number of distinct shapes. The same code runs with device ``"cpu"``, where
the "device" buffers are host memory, so it is tested without a GPU.

With CUDA graphs, each shape gets its own graph id (``gpu_graph_id``) the first time it is seen; that
bucket's buffers are then kept for the session's life, because the captured graph reads and writes those
addresses. ``CudaGraphRegistry`` records what each graph was captured with and refuses a replay for any
other shape or buffer. A graph run that fails (a capture that does not work for this shape, say) gives the shape
up to eager runs, once and with a warning in the log, instead of failing every later call. ONNX Runtime keeps
captured graphs per thread (in the CUDA provider's per-thread context), so every run of a CUDA-graph runner goes
through one thread that the runner owns: graphs are captured once whichever thread calls.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from .checks import check_positive_int
from .contract import ATTENTION_MASK, INPUT_IDS, ORT_TYPES, SENTENCE_EMBEDDING
from .errors import ContractMismatchError, CudaGraphError
from .heap import release_free_heap
from .session import shrink_run_options

__all__ = ["EAGER_GRAPH_ID", "GRAPH_ID_OPTION", "CudaGraphRegistry", "IOBindingRunner"]

Shape = tuple[int, int]

# ONNX Runtime's run option that picks which captured CUDA graph a run captures or replays; -1 runs eagerly.
GRAPH_ID_OPTION = "gpu_graph_id"
EAGER_GRAPH_ID = -1

_NUMPY_TYPES = {ort_type: np.dtype(name) for name, ort_type in ORT_TYPES.items()}
logger = logging.getLogger("deberta_onnx")


class CudaGraphRegistry:
    """Graph ids for CUDA graphs: one per (batch, sequence) shape, bound to the buffers it was captured with.

    Ids are never reused (a graph ONNX Runtime captured stays in the session), and ``check`` raises before a
    replay whose shape or buffers differ from the capture's: a replay reads the recorded addresses and
    shapes, so any other input would be silently ignored and stale vectors returned.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self._captured: dict[int, tuple[Shape, tuple[int, ...]]] = {}
        self._ids: dict[Shape, int] = {}
        self._next_id = 1  # 0 is ONNX Runtime's default id, used by any run that names none; keep clear of it

    def __len__(self) -> int:
        return len(self._captured)

    def has_room(self) -> bool:
        return len(self._captured) < self.limit

    def register(self, shape: Shape, buffers: tuple[int, ...]) -> int:
        """Assigns a new graph id to ``shape`` and the buffer addresses it will be captured with.

        Raises:
            CudaGraphError: the shape already has a graph, or ``limit`` graphs exist.
        """
        if shape in self._ids:
            raise CudaGraphError(f"shape {shape} already has CUDA graph {self._ids[shape]}; one graph per shape")
        if not self.has_room():
            raise CudaGraphError(f"all {self.limit} CUDA graph ids are taken; run shape {shape} eagerly")
        graph_id = self._next_id
        self._next_id += 1
        self._captured[graph_id] = (shape, buffers)
        self._ids[shape] = graph_id
        return graph_id

    def abandon(self, graph_id: int) -> None:
        """Forgets graph ``graph_id`` (its shape runs eagerly from now on); the id is not given out again."""
        captured = self._captured.pop(graph_id, None)
        if captured is not None:
            self._ids.pop(captured[0], None)

    def check(self, graph_id: int, shape: Shape, buffers: tuple[int, ...]) -> None:
        """Raises ``CudaGraphError`` unless graph ``graph_id`` was registered for this shape and these buffers."""
        captured = self._captured.get(graph_id)
        if captured is None:
            raise CudaGraphError(f"CUDA graph {graph_id} was never registered; refusing to run it for {shape}")
        if captured != (shape, buffers):
            raise CudaGraphError(
                f"CUDA graph {graph_id} was captured for shape {captured[0]} with buffers "
                f"{[hex(b) for b in captured[1]]}; refusing to replay it for shape {shape} with buffers "
                f"{[hex(b) for b in buffers]}"
            )


@dataclass(eq=False)
class _Bucket:
    shape: Shape
    inputs: ort.OrtValue  # [2, batch, sequence] int64: input_ids then attention_mask
    output: ort.OrtValue  # [batch, hidden]
    binding: ort.IOBinding
    host: np.ndarray  # where a batch is assembled; on the CPU device, a view of ``inputs`` itself
    direct: bool  # ``host`` is ``inputs``' memory, so no copy is needed
    graph_id: int = EAGER_GRAPH_ID
    run_options: ort.RunOptions | None = field(default=None)
    shrinks: bool = False  # its runs end by shrinking the CPU arena

    def buffers(self) -> tuple[int, ...]:
        return self.inputs.data_ptr(), self.output.data_ptr()


class IOBindingRunner:
    """Runs the model through ONNX Runtime's IO binding with buffers reused per (batch, sequence) shape.

    A ``Runner`` for embedding graphs: ``run(input_ids, attention_mask) -> [vectors]``.

    Args:
        session: the model's session; its graph must follow the contract (checked by ``check_contract``).
        hidden_size: length of each output vector.
        device: ``"cpu"`` or ``"cuda"``: where the bound buffers live (the session's provider decides).
        device_id: the GPU index for ``"cuda"``.
        max_buckets: most shapes whose buffers are kept; the least recently used are freed beyond it.
        cuda_graph: give each new shape, up to ``max_buckets`` of them, its own CUDA graph id (the session
            must have been made with ``enable_cuda_graph``); later shapes run eagerly. Runs then go through one
            thread the runner owns.
        shrink_tokens: runs of shapes with at least this many tokens end by handing the CPU arena's unused
            memory back to the system, then the C heap's free pages; ``None``: never.
        arena: whether the session has a CPU arena to shrink (without one, only the C heap is trimmed).

    Calls are serialised by a lock (the buffers are shared), so one runner may be used from several threads.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        *,
        hidden_size: int,
        device: str = "cpu",
        device_id: int = 0,
        max_buckets: int = 64,
        cuda_graph: bool = False,
        shrink_tokens: int | None = None,
        arena: bool = True,
    ) -> None:
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        check_positive_int("max_buckets", max_buckets)
        outputs = {node.name: node.type for node in session.get_outputs()}
        if outputs.get(SENTENCE_EMBEDDING) not in _NUMPY_TYPES:
            raise ContractMismatchError(
                f"the session's {SENTENCE_EMBEDDING} output is {outputs.get(SENTENCE_EMBEDDING, 'missing')}; "
                "re-export the model"
            )
        self.session = session
        self.hidden_size = hidden_size
        self.device = device
        self.device_id = device_id
        self.max_buckets = max_buckets
        check_positive_int("shrink_tokens", shrink_tokens, optional=True)
        self.shrink_tokens = shrink_tokens
        self.arena = arena
        # Bind the graph's own output type (an fp16 graph writes fp16); vectors are returned as float32.
        self._output_type = _NUMPY_TYPES[outputs[SENTENCE_EMBEDDING]]
        self.graphs = CudaGraphRegistry(max_buckets) if cuda_graph else None
        self._buckets: OrderedDict[Shape, _Bucket] = OrderedDict()
        self._pinned: dict[Shape, _Bucket] = {}
        self._lock = threading.Lock()
        self._owner: ThreadPoolExecutor | None = None
        self.allocations = 0
        self.eager_shapes: set[Shape] = set()  # shapes whose CUDA graph run failed: they run eagerly

    @property
    def bucket_count(self) -> int:
        """Buffer sets held now: the LRU-capped ones plus those pinned by a CUDA graph."""
        return len(self._buckets) + len(self._pinned)

    def shapes(self) -> list[Shape]:
        """The shapes whose buffers are held, pinned ones first, then least to most recently used."""
        return [*self._pinned, *self._buckets]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None
            ) -> list[np.ndarray]:
        """Runs one padded batch.

        Args:
            input_ids: ``[batch, sequence]`` integer token ids.
            attention_mask: same shape, 1 for tokens and 0 for padding.
            token_type_ids: must be ``None``: embedding graphs take no segment ids.

        Returns:
            ``[vectors]``, float32 ``[batch, hidden]``, a fresh array the caller owns.

        Raises:
            ValueError: the arrays are not 2-D of one shape, or are empty, or token type ids were given.
            TypeError: the arrays do not hold integers.
            CudaGraphError: the CUDA graph guard found a graph about to be replayed for another shape, or a
                graph run failed and the eager run after it failed too.
        """
        if token_type_ids is not None:
            raise ValueError("IO binding runs embedding graphs, which take no token_type_ids")
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape or 0 in input_ids.shape:
            raise ValueError(
                f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must be non-empty "
                "[batch, sequence] arrays of one shape"
            )
        for name, array in ((INPUT_IDS, input_ids), (ATTENTION_MASK, attention_mask)):
            if not np.issubdtype(array.dtype, np.integer):
                raise TypeError(f"{name} must hold integers, got {array.dtype}")
        shape: Shape = (int(input_ids.shape[0]), int(input_ids.shape[1]))
        if self.graphs is None:
            return self._run(shape, input_ids, attention_mask)
        return self._owner_thread().submit(self._run, shape, input_ids, attention_mask).result()

    def _owner_thread(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._owner is None:
                self._owner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deberta-onnx-cuda-graphs")
            return self._owner

    def _run(self, shape: Shape, input_ids: np.ndarray, attention_mask: np.ndarray) -> list[np.ndarray]:
        with self._lock:
            bucket = self._bucket(shape)
            # One host-side assembly (which also casts to int64), then at most one copy to the device.
            bucket.host[0] = input_ids
            bucket.host[1] = attention_mask
            if not bucket.direct:
                bucket.inputs.update_inplace(bucket.host)
            if self.graphs is not None and bucket.graph_id != EAGER_GRAPH_ID:
                self.graphs.check(bucket.graph_id, shape, bucket.buffers())
            try:
                self.session.run_with_iobinding(bucket.binding, bucket.run_options)
            except Exception as exc:  # onnxruntime raises its own pybind classes
                if bucket.graph_id == EAGER_GRAPH_ID:
                    raise
                graph_id = self._give_up_graph(bucket, exc)
                try:
                    self.session.run_with_iobinding(bucket.binding, bucket.run_options)
                except Exception as again:
                    raise CudaGraphError(
                        f"CUDA graph {graph_id} for shape {shape} failed ({exc}), and the eager run after it failed "
                        f"too ({again}); load the model without cuda_graph"
                    ) from again
            if bucket.shrinks:
                release_free_heap()
            # On the CPU device numpy() is a view of the reused buffer, so copy; on CUDA it is the one copy back.
            vectors = bucket.output.numpy()
            if self.device == "cpu" or vectors.dtype != np.float32:
                vectors = vectors.astype(np.float32, copy=True)
        return [vectors]

    def _give_up_graph(self, bucket: _Bucket, exc: BaseException) -> int:
        """Moves a shape whose graph run failed to eager runs for good; returns the graph id it had."""
        graph_id, shape = bucket.graph_id, bucket.shape
        if self.graphs is not None:
            self.graphs.abandon(graph_id)
        self._pinned.pop(shape, None)
        self.eager_shapes.add(shape)
        bucket.graph_id = EAGER_GRAPH_ID
        bucket.run_options = _graph_options(EAGER_GRAPH_ID)
        self._keep(shape, bucket)
        logger.warning("CUDA graph %d for batch shape %s failed (%s); that shape runs without a CUDA graph from "
                       "now on", graph_id, shape, exc)
        return graph_id

    def _bucket(self, shape: Shape) -> _Bucket:
        bucket = self._pinned.get(shape)
        if bucket is not None:
            return bucket
        bucket = self._buckets.get(shape)
        if bucket is not None:
            self._buckets.move_to_end(shape)
            return bucket
        bucket = self._allocate(shape)
        if self.graphs is not None:
            if self.graphs.has_room() and shape not in self.eager_shapes:
                bucket.graph_id = self.graphs.register(shape, bucket.buffers())
                self._pinned[shape] = bucket
            bucket.run_options = _graph_options(bucket.graph_id)
            if bucket.graph_id != EAGER_GRAPH_ID:
                return bucket
        if self.shrink_tokens is not None and shape[0] * shape[1] >= self.shrink_tokens:
            if self.arena:
                bucket.run_options = shrink_run_options(bucket.run_options)
            bucket.shrinks = True
        self._keep(shape, bucket)
        return bucket

    def _keep(self, shape: Shape, bucket: _Bucket) -> None:
        while len(self._buckets) >= self.max_buckets:
            self._buckets.popitem(last=False)  # its OrtValues and binding are freed with it
        self._buckets[shape] = bucket

    def _allocate(self, shape: Shape) -> _Bucket:
        rows, width = shape
        inputs = ort.OrtValue.ortvalue_from_shape_and_type([2, rows, width], np.int64, self.device, self.device_id)
        output = ort.OrtValue.ortvalue_from_shape_and_type(
            [rows, self.hidden_size], self._output_type, self.device, self.device_id
        )
        binding = self.session.io_binding()
        half = rows * width * np.dtype(np.int64).itemsize
        for offset, name in ((0, INPUT_IDS), (half, ATTENTION_MASK)):
            binding.bind_input(name, self.device, self.device_id, np.int64, [rows, width], inputs.data_ptr() + offset)
        binding.bind_ortvalue_output(SENTENCE_EMBEDDING, output)
        host = inputs.numpy() if self.device == "cpu" else np.empty((2, rows, width), dtype=np.int64)
        # numpy() of a CPU OrtValue is a view today; should a release return a copy, fall back to copying.
        direct = self.device == "cpu" and host.ctypes.data == inputs.data_ptr()
        if self.device == "cpu" and not direct:
            host = np.empty((2, rows, width), dtype=np.int64)
        self.allocations += 1
        return _Bucket(shape=shape, inputs=inputs, output=output, binding=binding, host=host, direct=direct)


def _graph_options(graph_id: int) -> ort.RunOptions:
    options = ort.RunOptions()
    options.add_run_config_entry(GRAPH_ID_OPTION, str(graph_id))
    return options
