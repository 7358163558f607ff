"""OpenVINO as the engine behind stage two: an exported graph compiled for the CPU once, with dynamic batch and
sequence axes, and a ``Runner`` over it. Tokenization, batching and post-processing stay as they are.

``openvino`` is an optional extra: this module imports it only inside the functions that need it, and the rest of
the runtime imports this module only when ``EncoderConfig.engine`` asks for OpenVINO (or ``auto`` measures it).
"""

from __future__ import annotations

import functools
import os
import queue
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import AUTO, BF16
from .contract import ATTENTION_MASK, INPUT_IDS, TOKEN_TYPE_IDS
from .errors import MissingExtraError, ModelLoadError, PrecisionUnavailableError
from .heap import release_free_heap
from .installed import DISTRIBUTION

__all__ = [
    "OpenVINOModel",
    "OpenVINORunner",
    "bf16_support",
    "compile_model",
    "default_cache_dir",
    "import_openvino",
    "openvino_version",
]

# OpenVINO's element types as ONNX Runtime spells them, so that ``contract.check_session`` reads both alike.
_ORT_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "i64": "tensor(int64)", "i32": "tensor(int32)"}


def import_openvino() -> Any:
    """The ``openvino`` module.

    Raises:
        MissingExtraError: openvino is not installed; the message names the extra.
    """
    try:
        import openvino
    except ImportError as exc:
        raise MissingExtraError(
            f"engine 'openvino' needs the openvino package, which the base install leaves out. Install the openvino "
            f"extra: `pip install '{DISTRIBUTION}[openvino]'`, or load with engine='onnxruntime' "
            f"(CLI: --engine onnxruntime). ({exc})"
        ) from exc
    return openvino


def openvino_version() -> str | None:
    """The installed openvino's version, or ``None`` when it cannot be imported here (checked without importing
    it)."""
    from importlib import metadata, util

    try:
        if util.find_spec("openvino") is None:
            return None
        return metadata.version("openvino")
    except (ImportError, ValueError, metadata.PackageNotFoundError):  # blocked, or a module without metadata
        return None


@functools.cache
def _core() -> Any:
    return import_openvino().Core()


def bf16_support() -> tuple[bool, str]:
    """Whether OpenVINO computes bf16 natively on this CPU (AVX512-BF16 or AMX), and what it reports.

    Returns:
        ``(supported, detail)``: detail names the CPU and OpenVINO's ``OPTIMIZATION_CAPABILITIES``.
    """
    core = _core()
    capabilities = [str(item) for item in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    name = str(core.get_property("CPU", "FULL_DEVICE_NAME"))
    return "BF16" in capabilities, f"{name}; OpenVINO's CPU capabilities: {', '.join(capabilities)}"


def default_cache_dir() -> Path:
    """Where compiled models are cached when ``engine_cache_dir`` is ``"auto"``: ``deberta-onnx/openvino`` in the
    user's cache directory (``$XDG_CACHE_HOME``, else ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / DISTRIBUTION / "openvino"


@dataclass
class _Port:
    """One input or output, read as ``contract.check_session`` reads an ONNX Runtime ``NodeArg``."""

    name: str
    type: str
    shape: Sequence[Any] | None


def _port(port: Any) -> _Port:
    dims: list[int | str] = [dim.get_length() if dim.is_static else f"dim{axis}"
                             for axis, dim in enumerate(port.get_partial_shape())]
    kind = port.get_element_type().get_type_name()
    return _Port(name=port.get_any_name(), type=_ORT_TYPES.get(kind, kind), shape=dims)


@dataclass
class OpenVINOModel:
    """A graph compiled by OpenVINO for the CPU, with a pool of inference requests (one per concurrent call).

    Attributes:
        compiled: the ``openvino.CompiledModel``.
        path: the graph file.
        properties: the properties it was compiled with.
    """

    compiled: Any
    path: Path
    properties: dict[str, Any]
    _idle: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue, repr=False)

    def get_inputs(self) -> list[_Port]:
        """The graph's inputs (name, ONNX Runtime type string, shape with axis names for dynamic axes)."""
        return [_port(port) for port in self.compiled.inputs]

    def get_outputs(self) -> list[_Port]:
        """The graph's outputs, as ``get_inputs``."""
        return [_port(port) for port in self.compiled.outputs]

    def runner(self, outputs: Sequence[str], *, shrink_tokens: int | None = None) -> OpenVINORunner:
        """A ``Runner`` that returns ``outputs``, in order."""
        return OpenVINORunner(self, outputs, shrink_tokens=shrink_tokens)

    def infer(self, feed: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        """Runs one batch and returns copies of ``outputs`` (a request's output tensors are reused by its next
        call). Safe from several threads: each call takes an idle request, or makes one."""
        try:
            request = self._idle.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            request.infer(feed, share_inputs=True, share_outputs=True)
            return [np.array(request.get_tensor(name).data, copy=True) for name in outputs]
        finally:
            self._idle.put(request)


class OpenVINORunner:
    """Stage two on OpenVINO: padded token ids in, the named outputs out (float32 numpy arrays).

    Args:
        model: the compiled model.
        outputs: the output names to return, in order.
        shrink_tokens: a call of at least this many padded tokens ends by trimming the C heap's free pages (as the
            ONNX Runtime runner does after its arena); ``None``: never.
    """

    def __init__(self, model: OpenVINOModel, outputs: Sequence[str], *, shrink_tokens: int | None = None) -> None:
        self.model = model
        self.outputs = list(outputs)
        self.shrink_tokens = shrink_tokens

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None
            ) -> list[np.ndarray]:
        feed = {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask}
        if token_type_ids is not None:
            feed[TOKEN_TYPE_IDS] = token_type_ids
        outputs = self.model.infer(feed, self.outputs)
        if self.shrink_tokens is not None and input_ids.size >= self.shrink_tokens:
            release_free_heap()
        return outputs


def compile_model(path: Path, *, threads: int | None, precision: str, cache_dir: str | None) -> OpenVINOModel:
    """Compiles an exported graph for OpenVINO's CPU plugin, once, with its batch and sequence axes dynamic.

    Args:
        path: the ``.onnx`` file.
        threads: ``INFERENCE_NUM_THREADS``; ``None`` keeps OpenVINO's default.
        precision: the runtime precision: ``"bf16"`` computes in bfloat16 (``INFERENCE_PRECISION_HINT=bf16``);
            anything else in f32, which OpenVINO does not do by default on CPUs with bf16 units.
        cache_dir: ``CACHE_DIR`` (``"auto"``: ``default_cache_dir()``; ``None``: no cache), so that a second
            load of the same graph with the same settings reads the compiled blob instead of compiling.

    Raises:
        MissingExtraError: openvino is not installed.
        PrecisionUnavailableError: bf16 on a CPU without AVX512-BF16 or AMX.
        ModelLoadError: OpenVINO could not read or compile the graph.
    """
    core = _core()
    if precision == BF16:
        supported, detail = bf16_support()
        if not supported:
            raise PrecisionUnavailableError(
                f"precision 'bf16' needs a CPU with AVX512-BF16 or AMX, and OpenVINO finds neither here ({detail}); "
                "load precision 'fp32' (or an int8 variant) instead."
            )
    properties: dict[str, Any] = {
        # One stream for the caller's thread: a call's batch is already the unit of parallel work.
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "bf16" if precision == BF16 else "f32",
    }
    if threads is not None:
        properties["INFERENCE_NUM_THREADS"] = threads
    if cache_dir is not None:
        folder = default_cache_dir() if cache_dir == AUTO else Path(cache_dir)
        folder.mkdir(parents=True, exist_ok=True)
        properties["CACHE_DIR"] = str(folder)
    version = openvino_version()
    try:
        model = core.read_model(str(path))
        # Batch and sequence dynamic whatever the file declares, so that one compiled model serves every call.
        model.reshape({port.get_any_name(): [-1, -1] for port in model.inputs})
        compiled = core.compile_model(model, "CPU", properties)
    except RuntimeError as exc:
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ModelLoadError(
            f"OpenVINO {version} could not load {path}: {line}. Either the file is truncated, corrupted or not an "
            "ONNX graph (load with verify_checksums=True to check it against the manifest, or re-export), or "
            "OpenVINO lacks an operator: load with engine='onnxruntime'."
        ) from exc
    return OpenVINOModel(compiled=compiled, path=path, properties=properties)
