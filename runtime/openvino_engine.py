"""OpenVINO as the engine behind stage two: an exported graph compiled for the CPU once, with dynamic batch and
sequence axes, and a ``Runner`` over it. Tokenization, batching and post-processing stay as they are.

``openvino`` is an optional extra: this module imports it only inside the functions that need it, and the rest of
the runtime imports this module only when ``EncoderConfig.engine`` asks for OpenVINO (or ``auto`` measures it).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import queue
import tempfile
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import AUTO, BF16
from .contract import ATTENTION_MASK, INPUT_IDS, TOKEN_TYPE_IDS
from .errors import MissingExtraError, ModelLoadError, PrecisionUnavailableError
from .files import atomic_write
from .heap import release_free_heap
from .installed import DISTRIBUTION

__all__ = [
    "BF16_OUTLIER_RATIO",
    "OpenVINOModel",
    "OpenVINORunner",
    "bf16_support",
    "compile_model",
    "default_cache_dir",
    "import_openvino",
    "openvino_version",
    "outlier_nodes",
]

# bf16 keeps a node in f32 when its output, computed in f32 on the calibration texts, holds a value more than this
# many times the tensor's median magnitude. bf16 has 8 significant bits: a value R times the median is rounded by up
# to R x 2^-9 of the median, an eighth of it at R = 64, and the ordinary values beside it lose that much wherever the
# large ones later cancel (a LayerNorm's offset taken out again by a bias, a residual stream) or set a norm. Random
# weights stay under 25 (the largest, a GELU's or an attention score's); a trained encoder's outlier dimensions are
# 100x to 1,000x and more.
BF16_OUTLIER_RATIO = 64.0
logger = logging.getLogger("deberta_onnx")
# Where the nodes bf16 keeps in f32 are cached, in the compiled models' cache folder.
_KEPT_FILE = "bf16-kept-f32.json"
# OpenVINO's node types whose outputs are not computed (or not in a float type of the graph's own).
_NOT_COMPUTED = {"Constant", "Parameter", "Result", "ShapeOf"}

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
        kept_f32: with bf16, the nodes kept in f32 because their outputs carry activation outliers (OpenVINO's
            names for them); empty otherwise.
    """

    compiled: Any
    path: Path
    properties: dict[str, Any]
    kept_f32: tuple[str, ...] = ()
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


def compile_model(path: Path, *, threads: int | None, precision: str, cache_dir: str | None,
                  calibration: Sequence[Mapping[str, np.ndarray]] = ()) -> OpenVINOModel:
    """Compiles an exported graph for OpenVINO's CPU plugin, once, with its batch and sequence axes dynamic.

    Args:
        path: the ``.onnx`` file.
        threads: ``INFERENCE_NUM_THREADS``; ``None`` keeps OpenVINO's default.
        precision: the runtime precision: ``"bf16"`` computes in bfloat16 (``INFERENCE_PRECISION_HINT=bf16``)
            except for the nodes ``outlier_nodes`` finds on ``calibration``, which stay in f32; anything else in
            f32, which OpenVINO does not do by default on CPUs with bf16 units.
        cache_dir: ``CACHE_DIR`` (``"auto"``: ``default_cache_dir()``; ``None``: no cache), so that a second
            load of the same graph with the same settings reads the compiled blob instead of compiling.
        calibration: with bf16, the feeds (one text each) on which activation outliers are looked for.

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
    kept: list[str] = []
    try:
        model = core.read_model(str(path))
        # Batch and sequence dynamic whatever the file declares, so that one compiled model serves every call.
        model.reshape({port.get_any_name(): [-1, -1] for port in model.inputs})
        if precision == BF16 and calibration:
            kept = _kept_nodes(model, path, calibration, threads=threads,
                               cache=Path(properties["CACHE_DIR"]) / _KEPT_FILE if cache_dir is not None else None)
        if kept:
            compiled = _compile_keeping_f32(model, set(kept), properties)
        else:
            compiled = core.compile_model(model, "CPU", properties)
    except RuntimeError as exc:
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ModelLoadError(
            f"OpenVINO {version} could not load {path}: {line}. Either the file is truncated, corrupted or not an "
            "ONNX graph (load with verify_checksums=True to check it against the manifest, or re-export), or "
            "OpenVINO lacks an operator: load with engine='onnxruntime'."
        ) from exc
    return OpenVINOModel(compiled=compiled, path=path, properties=properties, kept_f32=tuple(kept))


def outlier_nodes(model: Any, feeds: Sequence[Mapping[str, np.ndarray]], *, threads: int | None,
                  ratio: float = BF16_OUTLIER_RATIO) -> list[str]:
    """The nodes whose outputs carry activation outliers: computed in f32 on ``feeds``, the largest |value| is
    more than ``ratio`` times the median |value| (the median of the feeds' medians). bf16 keeps them in f32.

    Args:
        model: an ``openvino.Model`` (left as it is: the outputs are added to a clone).
        feeds: model inputs, best one text each (padding would pull the medians down).
        threads: ``INFERENCE_NUM_THREADS`` for the measuring run.
        ratio: the threshold, ``BF16_OUTLIER_RATIO`` by default.

    Returns:
        The nodes' names (OpenVINO's friendly names), in graph order.
    """
    ov = import_openvino()
    probe = model.clone()  # the clone shares the constants' data
    nodes = [node for node in probe.get_ordered_ops()
             if node.get_type_name() not in _NOT_COMPUTED and node.get_output_size() == 1
             and node.get_output_element_type(0) == ov.Type.f32]
    ports = probe.add_outputs([node.output(0) for node in nodes])
    properties: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads is not None:
        properties["INFERENCE_NUM_THREADS"] = threads
    request = _core().compile_model(probe, "CPU", properties).create_infer_request()
    peaks = np.zeros(len(nodes))
    medians: list[list[float]] = [[] for _ in nodes]
    for feed in feeds:
        request.infer(dict(feed))
        for i, port in enumerate(ports):
            values = np.abs(request.get_tensor(port).data)
            if values.size:
                peaks[i] = max(peaks[i], float(values.max()))
                medians[i].append(float(np.median(values)))
    return [node.get_friendly_name() for node, peak, values in zip(nodes, peaks, medians)
            if values and peak > ratio * float(np.median(values))]


def _kept_nodes(model: Any, path: Path, feeds: Sequence[Mapping[str, np.ndarray]], *, threads: int | None,
                cache: Path | None) -> list[str]:
    """``outlier_nodes(model, feeds)``, cached in ``cache`` (a JSON file; ``None``: not cached) under the graph
    file (path, size, modification time), OpenVINO's version, the ratio and the feeds, so that a second start
    skips the measuring run. OpenVINO names some nodes afresh at every read, so the entry holds positions in the
    graph's order, and the node types there as a check."""
    nodes = list(model.get_ordered_ops())
    if cache is None:
        return outlier_nodes(model, feeds, threads=threads)
    stat = path.stat()
    digest = hashlib.sha256()
    for part in (str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns), str(openvino_version()),
                 str(BF16_OUTLIER_RATIO)):
        digest.update(part.encode() + b"\0")
    for feed in feeds:
        for name in sorted(feed):
            digest.update(name.encode() + np.ascontiguousarray(feed[name]).tobytes())
    key = digest.hexdigest()
    types = [node.get_type_name() for node in nodes]
    entry = _read_json(cache).get(key)
    if isinstance(entry, dict) and entry.get("types") == hashlib.sha256(" ".join(types).encode()).hexdigest():
        positions = entry.get("positions")
        if isinstance(positions, list) and all(isinstance(p, int) and 0 <= p < len(nodes) for p in positions):
            return [nodes[p].get_friendly_name() for p in positions]
    kept = outlier_nodes(model, feeds, threads=threads)
    names = set(kept)
    entries = _read_json(cache)
    entries[key] = {"graph": str(path), "positions": [i for i, node in enumerate(nodes)
                                                      if node.get_friendly_name() in names],
                    "types": hashlib.sha256(" ".join(types).encode()).hexdigest(), "ratio": BF16_OUTLIER_RATIO}
    try:
        text = json.dumps(entries, indent=1) + "\n"
        atomic_write(cache, lambda handle: handle.write(text.encode("utf-8")))
    except OSError as exc:  # a read-only cache: measured again at the next start
        logger.warning("could not cache bf16's kept nodes in %s: %s", cache, exc)
    return kept


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _compile_keeping_f32(model: Any, names: set[str], properties: dict[str, Any]) -> Any:
    """Compiles ``model`` with the nodes named ``names`` kept in f32 whatever the inference precision.

    OpenVINO's CPU plugin leaves a node in its original precision when the node's runtime info disables precision
    conversion, which its Python API cannot set; its IR format can: the ``precise`` attribute of a layer's
    ``rt_info`` (what ``ov::disable_fp16_compression`` writes). So the model goes through an IR in a temporary
    folder, marked there. ``test_bf16_passes_the_gate_on_activation_outliers`` checks that the plugin still honours
    it (the marked nodes run in f32).
    """
    ov = import_openvino()
    try:
        with tempfile.TemporaryDirectory(prefix=f"{DISTRIBUTION}-bf16-") as folder:
            xml = Path(folder) / "model.xml"
            ov.save_model(model, str(xml), compress_to_fp16=False)
            tree = ElementTree.parse(xml)
            for layer in tree.getroot().iter("layer"):
                if layer.get("name") in names:
                    info = layer.find("rt_info")
                    if info is None:
                        info = ElementTree.SubElement(layer, "rt_info")
                    ElementTree.SubElement(info, "attribute", {"name": "precise", "version": "0"})
            tree.write(xml, encoding="utf-8", xml_declaration=True)
            return _core().compile_model(_core().read_model(str(xml)), "CPU", properties)
    except OSError as exc:
        raise ModelLoadError(
            f"bf16 writes a temporary copy of the graph (about the size of its .onnx file) to mark the nodes it keeps "
            f"in f32, and could not: {exc}. Point TMPDIR at a folder with room, or load precision 'fp32'."
        ) from exc
