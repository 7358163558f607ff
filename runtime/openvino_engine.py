"""OpenVINO as the engine behind stage two: an exported graph compiled for the CPU once, with dynamic batch and
sequence axes, and a ``Runner`` over it. Tokenization, batching and post-processing stay as they are.

``openvino`` is an optional extra: this module imports it only inside the functions that need it, and the rest of
the runtime imports this module only when ``EncoderConfig.engine`` asks for OpenVINO (or ``auto`` measures it).
"""

from __future__ import annotations

import functools
import hashlib
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
from .files import read_json_cache, write_json_cache
from .heap import release_free_heap
from .installed import DISTRIBUTION

__all__ = [
    "BF16_OUTLIER_RATIO",
    "Bf16Plan",
    "OpenVINOModel",
    "OpenVINORunner",
    "bf16_plan",
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
# weights stay well under it (no node of the base shape's random checkpoint reaches it; the tiny outlier checkpoint's
# ordinary nodes stay under 11); a trained encoder's outlier dimensions are 100x to 1,000x and more.
BF16_OUTLIER_RATIO = 64.0
# A matrix product with constant weights whose input has a few outlier channels is not kept in f32 whole: those
# channels are split off into a small f32 product beside it (``x @ W = x @ W_main + x[..., C] @ W[C, :]``, with
# ``W_main``'s rows ``C`` zeroed, as the int8 variants do at export), and the large product stays in bf16. "A few":
# at most this fraction of its input channels, or 8.
_SPLIT_FRACTION = 1 / 16
_SPLIT_MIN = 8
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
        kept_f32: with bf16, the nodes kept in f32 whole because their outputs carry activation outliers or
            they read such outputs (OpenVINO's names for them); empty otherwise.
        split_f32: with bf16, the matrix products whose outlier input channels run in f32 beside them: name ->
            the channels.
    """

    compiled: Any
    path: Path
    properties: dict[str, Any]
    kept_f32: tuple[str, ...] = ()
    split_f32: dict[str, tuple[int, ...]] = field(default_factory=dict)
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
            except for what ``bf16_plan`` finds on ``calibration``, which stays in f32; anything else in f32,
            which OpenVINO does not do by default on CPUs with bf16 units.
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
    plan = Bf16Plan()
    try:
        model = core.read_model(str(path))
        # Batch and sequence dynamic whatever the file declares, so that one compiled model serves every call.
        model.reshape({port.get_any_name(): [-1, -1] for port in model.inputs})
        if precision == BF16 and calibration:
            plan = _bf16_plan(model, path, calibration, threads=threads,
                              cache=Path(properties["CACHE_DIR"]) / _KEPT_FILE if cache_dir is not None else None)
        if plan.kept or plan.splits:
            marked = set(plan.kept) | _split_channels(model, plan.splits)
            compiled = _compile_keeping_f32(model, marked, properties)
        else:
            compiled = core.compile_model(model, "CPU", properties)
    except RuntimeError as exc:
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ModelLoadError(
            f"OpenVINO {version} could not load {path}: {line}. Either the file is truncated, corrupted or not an "
            "ONNX graph (load with verify_checksums=True to check it against the manifest, or re-export), or "
            "OpenVINO lacks an operator: load with engine='onnxruntime'."
        ) from exc
    return OpenVINOModel(compiled=compiled, path=path, properties=properties, kept_f32=tuple(plan.kept),
                         split_f32=dict(plan.splits))


@dataclass(frozen=True)
class Bf16Plan:
    """What bf16 keeps in f32: ``kept``, nodes whole (OpenVINO's names); ``splits``, matrix products whose input
    channels listed run in an f32 product beside them."""

    kept: tuple[str, ...] = ()
    splits: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass
class _Scan:
    """What the f32 probe saw, per node: largest |value|, the feeds' median |values|, and the largest |value| of
    each channel of the last axis."""

    peak: dict[str, float] = field(default_factory=dict)
    medians: dict[str, list[float]] = field(default_factory=dict)
    channels: dict[str, np.ndarray] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return float(np.median(self.medians[name]))

    def outlier(self, name: str, ratio: float) -> bool:
        return bool(self.medians.get(name)) and self.peak[name] > ratio * self.median(name)


def _scan(model: Any, feeds: Sequence[Mapping[str, np.ndarray]], threads: int | None) -> _Scan:
    """Runs a clone of ``model`` in f32 on ``feeds`` with every float node's output exposed."""
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
    scan = _Scan()
    for feed in feeds:
        request.infer(dict(feed))
        for node, port in zip(nodes, ports):
            values = np.abs(request.get_tensor(port).data)
            if not values.size:
                continue
            name = node.get_friendly_name()
            scan.peak[name] = max(scan.peak.get(name, 0.0), float(values.max()))
            scan.medians.setdefault(name, []).append(float(np.median(values)))
            if values.ndim >= 2:
                per_channel = values.reshape(-1, values.shape[-1]).max(axis=0)
                seen = scan.channels.get(name)
                scan.channels[name] = per_channel if seen is None or seen.shape != per_channel.shape else \
                    np.maximum(seen, per_channel)
    return scan


def outlier_nodes(model: Any, feeds: Sequence[Mapping[str, np.ndarray]], *, threads: int | None,
                  ratio: float = BF16_OUTLIER_RATIO) -> list[str]:
    """The nodes whose outputs carry activation outliers: computed in f32 on ``feeds``, the largest |value| is
    more than ``ratio`` times the median |value| (the median of the feeds' medians).

    Args:
        model: an ``openvino.Model`` (left as it is: the outputs are added to a clone).
        feeds: model inputs, best one text each (padding would pull the medians down).
        threads: ``INFERENCE_NUM_THREADS`` for the measuring run.
        ratio: the threshold, ``BF16_OUTLIER_RATIO`` by default.

    Returns:
        The nodes' names (OpenVINO's friendly names), in graph order.
    """
    scan = _scan(model, feeds, threads)
    names = [node.get_friendly_name() for node in model.get_ordered_ops()]
    return [name for name in names if scan.outlier(name, ratio)]


def bf16_plan(model: Any, feeds: Sequence[Mapping[str, np.ndarray]], *, threads: int | None,
              ratio: float = BF16_OUTLIER_RATIO) -> Bf16Plan:
    """What bf16 keeps in f32 on ``model``: every node whose output carries activation outliers (``outlier_nodes``)
    or that reads such an output (where large values cancel, the result is ordinary and the node would not be
    found by its output; in bf16 its input would be rounded first). A matrix product with constant weights among
    them whose input has a few outlier channels (each channel's largest |value| over ``ratio`` times the input's
    median |value|; at most ``_SPLIT_FRACTION`` of them, or ``_SPLIT_MIN``) is not kept whole: it stays in bf16 with
    those channels split off into f32 beside it (``_split_channels``)."""
    scan = _scan(model, feeds, threads)
    kept: list[str] = []
    splits: dict[str, tuple[int, ...]] = {}
    for node in model.get_ordered_ops():
        name = node.get_friendly_name()
        if node.get_type_name() in _NOT_COMPUTED:
            continue
        sources = [value.get_node().get_friendly_name() for value in node.input_values()]
        if not (scan.outlier(name, ratio) or any(scan.outlier(source, ratio) for source in sources)):
            continue
        channels = _outlier_channels(node, scan, ratio)
        if channels:
            splits[name] = channels
        else:
            kept.append(name)
    return Bf16Plan(kept=tuple(kept), splits=splits)


def _outlier_channels(node: Any, scan: _Scan, ratio: float) -> tuple[int, ...]:
    """For a ``MatMul`` of an activation by constant weights: its input's outlier channels, when they are a few;
    otherwise (or for any other node) none."""
    if node.get_type_name() != "MatMul" or _weights(node) is None:
        return ()
    source = node.input_value(0).get_node().get_friendly_name()
    per_channel = scan.channels.get(source)
    if per_channel is None or not scan.medians.get(source):
        return ()
    channels = tuple(int(c) for c in np.nonzero(per_channel > ratio * scan.median(source))[0])
    allowed = max(_SPLIT_MIN, int(len(per_channel) * _SPLIT_FRACTION))
    return channels if 0 < len(channels) <= allowed else ()


def _weights(node: Any) -> np.ndarray | None:
    """A ``MatMul``'s constant weights as ``[in, out]`` float32, or ``None`` (an activation, a transposed
    activation, or weights that are not a 2-D constant)."""
    attributes = node.get_attributes()
    if attributes.get("transpose_a"):
        return None
    source = node.input_value(1).get_node()
    while source.get_type_name() == "Convert":
        source = source.input_value(0).get_node()
    if source.get_type_name() != "Constant":
        return None
    weights = np.asarray(source.get_data(), dtype=np.float32)
    if weights.ndim != 2:
        return None
    return weights.T if attributes.get("transpose_b") else weights


def _split_channels(model: Any, splits: Mapping[str, tuple[int, ...]]) -> set[str]:
    """Rewrites each ``MatMul`` named in ``splits`` in ``model`` (in place) as ``x @ W_main + x[..., C] @ W[C, :]``
    and returns the names of the nodes to keep in f32: the gather of the channels, their product and the sum (the
    large product, ``name/bf16``, is left to bf16)."""
    ops = import_openvino().opset13
    kept: set[str] = set()
    for node in model.get_ordered_ops():
        name = node.get_friendly_name()
        if name not in splits:
            continue
        weights = _weights(node)
        if weights is None:
            continue
        channels = np.asarray(splits[name], dtype=np.int64)
        main_weights = weights.copy()
        main_weights[channels, :] = 0.0
        source = node.input_value(0)
        main = ops.matmul(source, ops.constant(main_weights), False, False)
        main.set_friendly_name(f"{name}/bf16")
        gathered = ops.gather(source, ops.constant(channels), ops.constant(np.int64(-1)))
        gathered.set_friendly_name(f"{name}/f32-channels")
        side = ops.matmul(gathered, ops.constant(np.ascontiguousarray(weights[channels, :])), False, False)
        side.set_friendly_name(f"{name}/f32")
        total = ops.add(main, side)
        total.set_friendly_name(f"{name}/f32-sum")
        for target in list(node.output(0).get_target_inputs()):
            target.replace_source_output(total.output(0))
        kept |= {f"{name}/f32-channels", f"{name}/f32", f"{name}/f32-sum"}
    return kept


def _bf16_plan(model: Any, path: Path, feeds: Sequence[Mapping[str, np.ndarray]], *, threads: int | None,
               cache: Path | None) -> Bf16Plan:
    """``bf16_plan(model, feeds)``, cached in ``cache`` (a JSON file; ``None``: not cached) under the graph file
    (path, size, modification time), OpenVINO's version, the ratio and the feeds, so that a second start skips the
    measuring run. OpenVINO names some nodes afresh at every read, so the entry holds positions in the graph's
    order, and the node types there as a check."""
    if cache is None:
        return bf16_plan(model, feeds, threads=threads)
    nodes = list(model.get_ordered_ops())
    stat = path.stat()
    digest = hashlib.sha256()
    for part in (str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns), str(openvino_version()),
                 str(BF16_OUTLIER_RATIO), str(_SPLIT_FRACTION), str(_SPLIT_MIN)):
        digest.update(part.encode() + b"\0")
    for feed in feeds:
        for name in sorted(feed):
            digest.update(name.encode() + np.ascontiguousarray(feed[name]).tobytes())
    key = digest.hexdigest()
    types = hashlib.sha256(" ".join(node.get_type_name() for node in nodes).encode()).hexdigest()
    entry = read_json_cache(cache).get(key)
    if isinstance(entry, dict) and entry.get("types") == types:
        try:
            return Bf16Plan(kept=tuple(nodes[int(p)].get_friendly_name() for p in entry["kept"]),
                            splits={nodes[int(p)].get_friendly_name(): tuple(int(c) for c in channels)
                                    for p, channels in entry["splits"].items()})
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            pass  # a foreign or damaged entry: measured again below
    plan = bf16_plan(model, feeds, threads=threads)
    position = {node.get_friendly_name(): i for i, node in enumerate(nodes)}
    entries = read_json_cache(cache)  # read again: another process may have added its own entry meanwhile
    entries[key] = {"graph": str(path), "types": types, "ratio": BF16_OUTLIER_RATIO,
                    "kept": [position[name] for name in plan.kept],
                    "splits": {str(position[name]): list(channels) for name, channels in plan.splits.items()}}
    try:
        write_json_cache(cache, entries)
    except OSError as exc:  # a read-only cache: measured again at the next start
        logger.warning("could not cache bf16's kept nodes in %s: %s", cache, exc)
    return plan


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
