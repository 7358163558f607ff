"""Stage two of three: padded token ids -> the graph's outputs. A ``Runner`` is anything with ``run``; the plain
``SessionRunner`` is here, the IO-binding one (device buffers reused per shape) in ``iobinding``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import onnxruntime as ort

from .contract import ATTENTION_MASK, INPUT_IDS, SENTENCE_EMBEDDING, TOKEN_TYPE_IDS
from .session import shrink_run_options
from .utils import release_free_heap

__all__ = ["Runner", "SessionRunner"]


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
    """

    def __init__(self, session: ort.InferenceSession, outputs: Sequence[str] = (SENTENCE_EMBEDDING,), *,
                 shrink_tokens: int | None = None, arena: bool = True) -> None:
        self.session = session
        self.outputs = list(outputs)
        self.shrink_tokens = shrink_tokens
        self._shrink = shrink_run_options() if shrink_tokens is not None and arena else None

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None
            ) -> list[np.ndarray]:
        feed = {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask}
        if token_type_ids is not None:
            feed[TOKEN_TYPE_IDS] = token_type_ids
        if self.shrink_tokens is None or input_ids.size < self.shrink_tokens:
            return self.session.run(self.outputs, feed)
        outputs = self.session.run(self.outputs, feed, self._shrink)
        release_free_heap()
        return outputs
