"""What the runner tests share: real token batches, a real session that records (or fails) its runs, and a burst of
long requests to a real server."""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import onnxruntime as ort

from deberta_onnx.runtime import Encoder
from deberta_onnx.runtime.iobinding import EAGER_GRAPH_ID, GRAPH_ID_OPTION

from .conftest import HARD_TEXTS


def sample_texts(corpus: list[str], count: int, seed: int) -> list[str]:
    """``count`` distinct texts drawn from the hard strings and the corpus."""
    pool = HARD_TEXTS + corpus
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.choice(len(pool), size=count, replace=False)]


def ragged_batch(encoder: Encoder, texts: list[str], width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Real token ids for ``texts``, right-padded (to ``width`` when given): rows of different lengths."""
    ids = encoder.loaded.tokenizer.encode(texts)
    input_ids, mask = encoder.loaded.tokenizer.pad(ids)
    if width is not None and width > input_ids.shape[1]:
        extra = width - input_ids.shape[1]
        input_ids = np.pad(input_ids, ((0, 0), (0, extra)), constant_values=encoder.loaded.tokenizer.pad_id)
        mask = np.pad(mask, ((0, 0), (0, extra)))
    return input_ids, mask


class RecordingSession:
    """A real session that records, per ``run_with_iobinding``, the graph id asked for and the output it wrote,
    and the thread it ran on. Runs with a graph id in ``failing`` raise ONNX Runtime's own ``Fail`` instead (as a
    capture that does not work for a shape would); with ``eager_fails``, eager runs do too."""

    def __init__(self, session: ort.InferenceSession, failing: set[int] | None = None,
                 eager_fails: bool = False) -> None:
        self._session = session
        self.calls: list[tuple[int | None, tuple[int, ...], int]] = []
        self.threads: list[int] = []
        self.failing = failing or set()
        self.eager_fails = eager_fails

    def __getattr__(self, name: str) -> object:
        return getattr(self._session, name)

    def run_with_iobinding(self, binding: ort.IOBinding, run_options: ort.RunOptions | None = None) -> None:
        graph_id = None if run_options is None else int(run_options.get_run_config_entry(GRAPH_ID_OPTION))
        self.threads.append(threading.get_ident())
        if graph_id in self.failing or (self.eager_fails and graph_id == EAGER_GRAPH_ID):
            from onnxruntime.capi.onnxruntime_pybind11_state import Fail

            raise Fail(f"[ONNXRuntimeError] : 1 : FAIL : CUDA failure 900: operation not permitted when stream is "
                       f"capturing (graph {graph_id})")
        self._session.run_with_iobinding(binding, run_options)
        (output,) = binding.get_outputs()
        self.calls.append((graph_id, tuple(output.shape()), output.data_ptr()))


class WarningRecords(logging.Handler):
    """Collects the records of the runtime's logger (works with pytest's logging plugin off, too)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def long_text(words: int, seed: int) -> str:
    """``words`` distinct-looking words (``w0`` to ``w996``), different for each ``seed``."""
    return " ".join(f"w{(seed * 7919 + i) % 997}" for i in range(words))


def burst_of_long_texts(url: str, process: Any, clients: int = 6) -> int:
    """``clients`` concurrent ``/v1/embeddings`` requests of eight texts each cut at 512 tokens, to the server
    at ``url``; returns the highest RSS of ``process`` (a ``psutil.Process``) seen while they ran, in bytes.
    Fails the test if a request fails."""
    import httpx

    failures: list[str] = []

    def request(seed: int) -> None:
        body = {"input": [long_text(700, seed * 8 + i) for i in range(8)]}
        response = httpx.post(f"{url}/v1/embeddings", json=body, timeout=600)
        if response.status_code != 200:
            failures.append(response.text[:500])

    threads = [threading.Thread(target=request, args=(seed,)) for seed in range(clients)]
    for thread in threads:
        thread.start()
    peak = int(process.memory_info().rss)
    while any(thread.is_alive() for thread in threads):
        peak = max(peak, int(process.memory_info().rss))
        for thread in threads:
            thread.join(0.01)
    assert not failures, failures
    return peak
