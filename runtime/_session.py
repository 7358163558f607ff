"""Stage two of three: token ids -> pooled vectors, on an ONNX Runtime session checked against the contract."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    INPUTS,
    OPTIONAL_INPUTS,
    ORT_TYPES,
    REQUIRED_OUTPUT,
    SENTENCE_EMBEDDING,
    TOKEN_TYPE_IDS,
)
from .errors import ContractMismatchError, ProviderUnavailableError
from .manifest import Manifest

ProviderList = Sequence[str | tuple[str, dict[str, object]]]

_GPU_INSTALL_HINT = (
    "Install ONNX Runtime's GPU build in place of the CPU one: "
    "`pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'deberta-onnx[gpu]' && "
    "pip install --force-reinstall --no-deps onnxruntime-gpu` (the two onnxruntime packages cannot share an environment)."
)


@dataclass(frozen=True, kw_only=True)
class SessionSettings:
    """What the runtime passes to ``onnxruntime.SessionOptions``; ``None`` leaves ONNX Runtime's default."""

    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    allow_spinning: bool | None = None


def cuda_available() -> bool:
    """Whether this onnxruntime build offers the CUDA execution provider (not whether a device works)."""
    return "CUDAExecutionProvider" in ort.get_available_providers()


def provider_names(providers: ProviderList) -> list[str]:
    return [p if isinstance(p, str) else p[0] for p in providers]


def check_providers_available(providers: ProviderList) -> None:
    """Raises ``ProviderUnavailableError`` before a session is made if a requested provider is not installed."""
    available = ort.get_available_providers()
    for name in provider_names(providers):
        if name not in available:
            hint = _GPU_INSTALL_HINT if name in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else ""
            raise ProviderUnavailableError(
                f"execution provider {name} is not available in this onnxruntime "
                f"({ort.__version__}, available: {', '.join(available)}). {hint}".strip()
            )


def create_session(path: Path, providers: ProviderList, settings: SessionSettings) -> ort.InferenceSession:
    """Makes an ``InferenceSession`` and checks afterwards that the first requested provider is active.

    ONNX Runtime falls back to the CPU provider when, say, the CUDA libraries fail to load; that must not
    pass silently.
    """
    check_providers_available(providers)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if settings.intra_op_threads is not None:
        options.intra_op_num_threads = settings.intra_op_threads
    if settings.inter_op_threads is not None:
        options.inter_op_num_threads = settings.inter_op_threads
    if settings.allow_spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.allow_spinning else "0")
    session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    wanted = provider_names(providers)[0]
    active = session.get_providers()
    if wanted not in active:
        raise ProviderUnavailableError(
            f"ONNX Runtime created the session without {wanted} (active: {', '.join(active)}); it fell back, "
            f"usually because the CUDA or cuDNN libraries it needs could not be loaded. {_GPU_INSTALL_HINT}"
        )
    return session


def check_contract(session: ort.InferenceSession, manifest: Manifest, model_path: Path) -> None:
    """Checks the manifest against this runtime's contract and the session against the manifest.

    Raises:
        ContractMismatchError: names, dtypes or fixed dimensions disagree; says which and where.
    """
    declared_inputs = {spec.name: spec for spec in manifest.inputs}
    for spec in INPUTS:
        if spec.name not in declared_inputs or declared_inputs[spec.name].dtype != spec.dtype:
            raise ContractMismatchError(
                f"{manifest.folder}/manifest.json declares inputs {sorted(declared_inputs)} but this runtime "
                f"needs {spec.name} ({spec.dtype}); re-export the model with this deberta-onnx version."
            )
    known = {spec.name: spec for spec in (*INPUTS, *OPTIONAL_INPUTS)}
    for name, spec in declared_inputs.items():
        if name not in known or known[name].dtype != spec.dtype:
            raise ContractMismatchError(
                f"{manifest.folder}/manifest.json declares input {name} ({spec.dtype}), which this runtime does "
                f"not know (it feeds {', '.join(sorted(known))}); install the deberta-onnx release that wrote it."
            )
    session_inputs = {node.name: node.type for node in session.get_inputs()}
    for spec in declared_inputs.values():
        if session_inputs.get(spec.name) != ORT_TYPES[spec.dtype]:
            raise ContractMismatchError(
                f"{model_path} does not match its manifest: input {spec.name} should be {ORT_TYPES[spec.dtype]}, "
                f"the graph has {session_inputs.get(spec.name, 'no such input')} (graph inputs: "
                f"{sorted(session_inputs)}). The model file was replaced or the manifest edited; re-export."
            )
    extra = sorted(set(session_inputs) - set(declared_inputs))
    if extra:
        raise ContractMismatchError(
            f"{model_path} has input(s) {extra} that its manifest does not declare; the model file was replaced "
            "or the manifest edited. Re-export the model."
        )
    session_outputs = {node.name: node for node in session.get_outputs()}
    for spec in manifest.outputs:
        node = session_outputs.get(spec.name)
        if node is None:
            raise ContractMismatchError(
                f"{model_path} has no output {spec.name!r} though its manifest declares it (graph outputs: "
                f"{sorted(session_outputs)}); re-export the model."
            )
        if node.type != ORT_TYPES.get(spec.dtype):
            raise ContractMismatchError(
                f"{model_path}: output {spec.name} is {node.type}, the manifest declares {spec.dtype}; re-export."
            )
        shape = list(node.shape or [])
        if shape and len(shape) != len(spec.dims):
            raise ContractMismatchError(
                f"{model_path}: output {spec.name} has {len(shape)} dimensions, the manifest declares "
                f"{len(spec.dims)} ({list(spec.dims)}); re-export."
            )
        for axis, (got, want) in enumerate(zip(shape, spec.dims)):
            if isinstance(got, int) and isinstance(want, int) and got != want:
                raise ContractMismatchError(
                    f"{model_path}: output {spec.name} has size {got} on axis {axis}, the manifest declares "
                    f"{want}; the model file belongs to another checkpoint. Re-export."
                )
    if manifest.task not in REQUIRED_OUTPUT:
        raise ContractMismatchError(
            f"{manifest.folder}/manifest.json declares task {manifest.task!r}, which this runtime does not know "
            f"({', '.join(REQUIRED_OUTPUT)}); install the deberta-onnx release that wrote it."
        )
    required = REQUIRED_OUTPUT[manifest.task]
    if required not in session_outputs or not manifest.has_output(required):
        raise ContractMismatchError(
            f"{model_path} has no {required} output, which a {manifest.task} model needs; re-export the model."
        )


class SessionRunner:
    """Runs the plain ``session.run`` path: numpy in, numpy out."""

    def __init__(self, session: ort.InferenceSession, outputs: Sequence[str] = (SENTENCE_EMBEDDING,)) -> None:
        self.session = session
        self.outputs = list(outputs)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None
            ) -> list[np.ndarray]:
        feed = {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask}
        if token_type_ids is not None:
            feed[TOKEN_TYPE_IDS] = token_type_ids
        return self.session.run(self.outputs, feed)
