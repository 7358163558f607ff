"""Stage two of three: padded token ids -> the graph's outputs. A ``Runner`` is anything with ``run``; the plain
``SessionRunner`` is here, the IO-binding one (device buffers reused per shape) in ``iobinding``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import onnxruntime as ort

from .contract import ATTENTION_MASK, INPUT_IDS, SENTENCE_EMBEDDING, TOKEN_TYPE_IDS
from .heap import release_free_heap
from .session import shrink_run_options

__all__ = ["Runner", "SessionRunner", "SplitRunner"]

_NUMPY_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
}


class Runner(Protocol):
    """Runs one padded batch through a model's session and returns the outputs it was made for, in order."""

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None
            ) -> list[np.ndarray]: ...


class SessionRunner:
    """Runs the plain ``session.run`` path: numpy in, numpy out, ONNX Runtime allocating per call.

    Args:
        session: the model's session.
        outputs: the output names to fetch, in the order ``run`` returns them.
        shrink_tokens: a call of at least this many padded tokens ends by handing the CPU arena's unused
            memory back to the system, then the C heap's free pages; ``None``: never.
        arena: whether the session has a CPU arena to shrink (without one, only the C heap is trimmed).

    A shrinking call writes its outputs into arrays of its own (IO binding) rather than the arena: the arrays
    ``session.run`` returns are views of arena chunks, and one small output left in a large region at the end of
    the run would keep that whole region from being handed back.
    """

    def __init__(self, session: ort.InferenceSession, outputs: Sequence[str] = (SENTENCE_EMBEDDING,), *,
                 shrink_tokens: int | None = None, arena: bool = True) -> None:
        self.session = session
        self.outputs = list(outputs)
        self.shrink_tokens = shrink_tokens
        self._shrink = shrink_run_options() if shrink_tokens is not None and arena else None
        specs = {spec.name: spec for spec in session.get_outputs()}
        self._output_specs = [(specs[name].shape, _NUMPY_TYPES.get(specs[name].type)) for name in self.outputs]
        self._input_dims = next(spec.shape for spec in session.get_inputs() if spec.name == INPUT_IDS)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None
            ) -> list[np.ndarray]:
        feed = {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask}
        if token_type_ids is not None:
            feed[TOKEN_TYPE_IDS] = token_type_ids
        if self.shrink_tokens is None or input_ids.size < self.shrink_tokens:
            return self.session.run(self.outputs, feed)
        if self._shrink is None:
            outputs = self.session.run(self.outputs, feed)
        else:
            outputs = self._run_into_own_arrays(feed, self._shrink)
        release_free_heap()
        return outputs

    def _run_into_own_arrays(self, feed: dict[str, np.ndarray], options: ort.RunOptions) -> list[np.ndarray]:
        """``session.run`` with the outputs written into new numpy arrays (their shapes follow from the inputs'),
        so that no arena chunk is alive when the run ends; an output whose shape cannot be told in advance (an
        axis the inputs do not name) is left to ``session.run``."""
        sizes = {name: size for name, size in zip(self._input_dims, feed[INPUT_IDS].shape) if isinstance(name, str)}
        arrays = []
        for dims, dtype in self._output_specs:
            if dtype is None or not all(isinstance(dim, int) or dim in sizes for dim in dims):
                return self.session.run(self.outputs, feed, options)
            arrays.append(np.empty([dim if isinstance(dim, int) else sizes[dim] for dim in dims], dtype=dtype))
        binding = self.session.io_binding()
        for name, array in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name, array in zip(self.outputs, arrays):
            binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        self.session.run_with_iobinding(binding, options)
        return arrays


class SplitRunner:
    """Two runners of the same graph and outputs, each for the calls it was measured faster on: calls of at most
    ``split_tokens`` padded tokens (batch x sequence) go to ``small``, the others to ``large`` (``engine="auto"``
    with ONNX Runtime ahead on short calls and OpenVINO on batches, or the other way)."""

    def __init__(self, small: Runner, large: Runner, split_tokens: int) -> None:
        self.small, self.large, self.split_tokens = small, large, split_tokens

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None
            ) -> list[np.ndarray]:
        runner = self.small if input_ids.size <= self.split_tokens else self.large
        return runner.run(input_ids, attention_mask, token_type_ids)
