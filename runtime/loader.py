"""A model folder -> everything needed to run it: manifest, precision, checksums, tokenizer, session (checked
against the contract), the runner and the batching policy. ``Encoder`` and the classifiers each load one."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar, overload

import numpy as np
import onnxruntime as ort

from .batching import BatchPolicy, batch_policy, call_memory
from .config import AUTO, BF16, ENGINE_ONNXRUNTIME, ENGINE_OPENVINO, EncoderConfig
from .contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    REQUIRED_OUTPUT,
    TASK_EMBEDDING,
    TASK_FILL_MASK,
    TASK_MULTIPLE_CHOICE,
    TASK_QUESTION_ANSWERING,
    TASK_SEQUENCE_CLASSIFICATION,
    TASK_TOKEN_CLASSIFICATION,
    TOKEN_TYPE_IDS,
    TOKENIZER_FILE,
    check_session,
    check_sizes,
)
from .errors import ContractMismatchError, MemoryLimitError, ModelFolderError, TaskMismatchError
from .iobinding import IOBindingRunner
from .manifest import Manifest, load_manifest
from .runners import Runner, SessionRunner, SplitRunner
from .sentences import shipped_sentences, split_sentences
from .session import (
    CPU_PROVIDER,
    CudaSettings,
    ProviderList,
    SessionSettings,
    create_session,
    provider_names,
    resolve_providers,
    session_device,
)
from .tokenization import TextTokenizer

if TYPE_CHECKING:  # the openvino extra is optional: its module is imported only when OpenVINO runs
    from .openvino_engine import OpenVINOModel

__all__ = [
    "OPENVINO_PROVIDER",
    "PREFERRED_PRECISIONS",
    "UNDECLARED_MAX_LENGTH",
    "LoadedAttributes",
    "LoadedModel",
    "best_precision",
    "load_model",
    "loaded_property",
]

logger = logging.getLogger("deberta_onnx")
T = TypeVar("T")

# How the runtime names OpenVINO where it names ONNX Runtime's first execution provider (``/health``, logs).
OPENVINO_PROVIDER = "OpenVINO CPU"
# Texts (one per feed) on which bf16 looks for activation outliers: enough for every special token and the common
# punctuation, which is where trained encoders put their largest values; a few seconds on the base shape.
BF16_CALIBRATION_TEXTS = 16

# The variant a model loads when none is asked for, by first execution provider, best first. On CPU, int8 runs on
# integer kernels and static int8 gives the same vector whatever the batch; fp16 has no fast CPU kernels. On
# CUDA, fp16 runs on tensor cores, while int8 graphs would dequantize back to float. Other providers get the
# manifest's ``default_variant``.
PREFERRED_PRECISIONS: dict[str, tuple[str, ...]] = {
    "CPUExecutionProvider": ("int8-static", "int8-dynamic", "fp32"),
    "CUDAExecutionProvider": ("fp16", "fp32"),
    # OpenVINO (engine="openvino"): its int8-dynamic path (DynamicQuantizeLinear) measured 1.7x to 3.2x slower
    # than ONNX Runtime's, fp32 not.
    OPENVINO_PROVIDER: ("int8-static", "fp32", "int8-dynamic"),
}

# The longest input a folder may declare when its tokenizer.json declares no maximum (folders exported before the
# export wrote one there): the size of DeBERTa's position table in every published checkpoint, and the export's
# bound for them.
UNDECLARED_MAX_LENGTH = 512

# Which class loads which task, for the error that names the right one.
_LOADERS = {
    TASK_EMBEDDING: "Encoder",
    TASK_SEQUENCE_CLASSIFICATION: "SequenceClassifier, CrossEncoder or ZeroShotClassifier",
    TASK_TOKEN_CLASSIFICATION: "TokenClassifier",
    TASK_MULTIPLE_CHOICE: "MultipleChoice",
    TASK_FILL_MASK: "FillMask",
    TASK_QUESTION_ANSWERING: "QuestionAnswerer",
}


def best_precision(variants: Iterable[str], provider: str, default: str = "fp32") -> tuple[str, str]:
    """The variant a model loads on ``provider`` when none is asked for, and why.

    Args:
        variants: the precisions a model folder holds.
        provider: the first execution provider of the session.
        default: the manifest's ``default_variant``, used for providers without a preference.

    Returns:
        ``(precision, reason)``.
    """
    held = list(variants)
    for name in PREFERRED_PRECISIONS.get(provider, ()):
        if name in held:
            return name, f"the best variant in the folder for {provider}"
    return (default if default in held else held[0]), "the manifest's default"


@dataclass(frozen=True, kw_only=True)
class LoadedModel:
    """A model folder, loaded and checked: what ``Encoder`` and the classifiers run on."""

    manifest: Manifest
    config: EncoderConfig
    providers: list[str | tuple[str, dict[str, object]]]
    precision: str
    precision_reason: str
    session: ort.InferenceSession | None  # None when OpenVINO runs the graph
    tokenizer: TextTokenizer
    runner: Runner  # for the task's required output
    device: str  # "cpu" or "cuda:N"
    io_binding: bool
    policy: BatchPolicy
    # Runners made for other outputs shrink memory as ``runner`` does: from calls of this many tokens, the arena too.
    shrink_tokens: int | None = None
    arena: bool = True
    # "onnxruntime" or "openvino", never "auto"; or "onnxruntime+openvino" when ``auto`` keeps both (``split``).
    engine: str = ENGINE_ONNXRUNTIME
    engine_reason: str = "the default"
    openvino: OpenVINOModel | None = None
    # With both engines kept: (the engine for calls of at most this many padded tokens, the tokens).
    split: tuple[str, int] | None = None

    @property
    def provider(self) -> str:
        """What runs the graph: ONNX Runtime's first active provider, ``"OpenVINO CPU"``, or both."""
        if self.session is None:
            return OPENVINO_PROVIDER
        provider = str(self.session.get_providers()[0])
        return f"{provider} + {OPENVINO_PROVIDER}" if self.openvino is not None else provider

    def runner_for(self, outputs: tuple[str, ...]) -> Runner:
        """A runner of this model's engine (or engines) for other outputs than ``runner``'s (token vectors,
        logits), shrinking memory as ``runner`` does."""
        runners: dict[str, Runner] = {}
        if self.openvino is not None:
            runners[ENGINE_OPENVINO] = self.openvino.runner(outputs, shrink_tokens=self.shrink_tokens)
        if self.session is not None:
            runners[ENGINE_ONNXRUNTIME] = SessionRunner(self.session, outputs, shrink_tokens=self.shrink_tokens,
                                                        arena=self.arena)
        if self.split is not None:
            small, tokens = self.split
            large = next(name for name in runners if name != small)
            return SplitRunner(runners[small], runners[large], tokens)
        if len(runners) != 1:
            raise ValueError("a loaded model has either an ONNX Runtime session or an OpenVINO model, or both split")
        return next(iter(runners.values()))

    @property
    def model_dir(self) -> Path:
        return self.manifest.folder

    @property
    def hidden_size(self) -> int:
        return self.manifest.hidden_size

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels


class loaded_property(Generic[T]):
    """A read-only attribute computed from the instance's ``loaded`` model: how ``Encoder`` and the classifiers
    expose what they loaded, typed, without a shared base class.

        hidden_size = loaded_property(lambda loaded: loaded.hidden_size, "Length of each sentence vector.")
    """

    def __init__(self, getter: Callable[[LoadedModel], T], doc: str) -> None:
        self._getter = getter
        self.__doc__ = doc

    @overload
    def __get__(self, instance: None, owner: type) -> loaded_property[T]: ...
    @overload
    def __get__(self, instance: object, owner: type) -> T: ...

    def __get__(self, instance: object, owner: type) -> T | loaded_property[T]:
        if instance is None:
            return self
        return self._getter(instance.loaded)  # type: ignore[attr-defined]


class LoadedAttributes:
    """Read-only attributes of what a model class loaded (``self.loaded``). It holds no state and does no work:
    loading is ``load_model``'s job, running the stages' modules'."""

    loaded: LoadedModel

    manifest = loaded_property(lambda m: m.manifest, "The folder's parsed ``manifest.json``.")
    model_dir = loaded_property(lambda m: m.model_dir, "The model folder.")
    precision = loaded_property(lambda m: m.precision, "The variant loaded (``fp32``, ``int8-static``, ...).")
    precision_reason = loaded_property(lambda m: m.precision_reason, "Why that variant was chosen.")
    providers = loaded_property(lambda m: m.providers, "The execution providers the session was made with.")
    session = loaded_property(lambda m: m.session, "The ONNX Runtime session (``None`` when OpenVINO runs the graph).")
    engine = loaded_property(lambda m: m.engine, "What runs the graph: ``onnxruntime`` or ``openvino``.")
    engine_reason = loaded_property(lambda m: m.engine_reason, "Why that engine (``requested``, or what "
                                                                  "``auto`` measured).")
    device = loaded_property(lambda m: m.device, "Where the session keeps its tensors: ``cpu`` or ``cuda:N``.")
    max_length = loaded_property(lambda m: m.max_length,
                                 "Longest input in tokens (special tokens included); longer inputs are truncated.")
    max_seq_length = loaded_property(lambda m: m.max_length, "``max_length``, by sentence-transformers' name.")


def _check_task(manifest: Manifest, tasks: tuple[str, ...], user: str) -> None:
    task = manifest.task
    if task not in tasks:
        loader = _LOADERS.get(task, "a newer deberta-onnx")
        raise TaskMismatchError(
            f"{manifest.folder} holds a model of task {task!r}, which {user} cannot run; load it with {loader} "
            f"(from deberta_onnx.runtime), or export the checkpoint with --task {' or '.join(tasks)}."
        )


def _pick_precision(manifest: Manifest, requested: str | None, provider: str) -> tuple[str, str]:
    variants = manifest.variants
    if requested == BF16:
        if "fp32" not in variants:
            raise ValueError(f"precision 'bf16' runs the fp32 graph, which {manifest.folder} does not hold (it holds "
                             f"{sorted(variants)}); export the folder with fp32.")
        return requested, "requested"
    if requested is not None:
        if requested not in variants:
            raise ValueError(
                f"precision {requested!r} is not in {manifest.folder}; it holds {sorted(variants)}. Export "
                f"the folder again with every precision you need: `deberta-onnx export SRC {manifest.folder} "
                f"--overwrite --precision {','.join(sorted({*variants, requested}))}`."
            )
        return requested, "requested"
    return best_precision(variants, provider, manifest.default_variant)


def _check_max_length(manifest: Manifest, tokenizer: TextTokenizer, config: EncoderConfig) -> int:
    """Checks the manifest's ``max_sequence_length`` (an unchecksummed file) against what the tokenizer declares,
    and one input of that length against the memory limit; returns the attention heads for the estimate."""
    length = manifest.max_sequence_length
    declared = tokenizer.declared_max_length
    bound = declared if declared is not None else UNDECLARED_MAX_LENGTH
    if length > bound:
        origin = (f"its {TOKENIZER_FILE} declares {bound}" if declared is not None else
                  f"its {TOKENIZER_FILE} declares no maximum, and such folders take at most {bound} tokens")
        raise ContractMismatchError(
            f"{manifest.path}: model.max_sequence_length is {length} tokens, but {origin}; the manifest was edited "
            f"or does not belong to these files. Re-export the model (`deberta-onnx export SRC {manifest.folder} "
            "--overwrite --max-length N`)."
        )
    heads = manifest.model.num_attention_heads or max(1, manifest.hidden_size // 64)  # DeBERTa's heads are 64 wide
    limit = config.max_call_memory_mb
    need = call_memory(1, length, heads)
    if limit is not None and need > limit << 20:
        raise MemoryLimitError(
            f"{manifest.folder} takes inputs of up to {length} tokens; one of them would need about "
            f"{need >> 20:,} MB in one model call (its attention scores), over the limit of {limit:,} MB "
            "(EncoderConfig.max_call_memory_mb). Raise the limit (or set it to None) if the machine has the memory, "
            "or re-export with a smaller --max-length."
        )
    return heads


def _check_pad_id(manifest: Manifest, tokenizer: TextTokenizer) -> None:
    """Checks the manifest's ``pad_token_id`` (an unchecksummed file) against the tokenizer's vocabulary (a
    checksummed one): padding with an id past it would fail every padded batch inside the graph's embedding
    lookup."""
    pad_id = manifest.model.pad_token_id
    vocab = tokenizer.tokenizer.get_vocab_size(with_added_tokens=True)
    if not 0 <= pad_id < vocab:
        raise ContractMismatchError(
            f"{manifest.path}: model.pad_token_id is {pad_id}, but {TOKENIZER_FILE} has {vocab} tokens (ids 0 to "
            f"{vocab - 1}); every padded batch would fail. The manifest was edited or does not belong to these "
            f"files; re-export the model (`deberta-onnx export SRC {manifest.folder} --overwrite`)."
        )


def load_model(model_dir: str | Path, providers: ProviderList | None, config: EncoderConfig, *,
               tasks: tuple[str, ...], user: str, remeasure: bool = False) -> LoadedModel:
    """Loads a model folder for one of ``tasks``.

    Args:
        model_dir: a folder written by ``deberta-onnx export``.
        providers: ONNX Runtime execution providers, or ``None`` for ``config.device`` (else the CPU).
        config: loading, device, batching and threading options.
        tasks: the tasks the caller runs.
        user: the caller's class name, for messages.
        remeasure: with ``engine="auto"``, measure the engines even when a choice is cached (``deberta-onnx tune``).

    Raises:
        ModelFolderError: (or a subclass) the folder is missing, corrupted, or disagrees with its manifest.
        TaskMismatchError: the folder holds a model of another task.
        ProviderUnavailableError: a requested provider is not installed or ONNX Runtime fell back from it.
        CudaGraphError: ``config.cuda_graph`` is set and ONNX Runtime refused CUDA graphs for this model.
        MemoryLimitError: one input of the folder's maximum length would pass ``config.max_call_memory_mb``.
        ValueError: ``providers`` and ``config.device`` both given, an option that does not apply to the task,
            or a precision the folder does not hold.
    """
    manifest = load_manifest(model_dir)
    folder = manifest.folder
    _check_task(manifest, tasks, user)
    task = manifest.task
    if config.cuda_graph and task != TASK_EMBEDDING:
        raise ValueError(f"cuda_graph runs embedding graphs through IO binding; {folder} holds a {task} model. "
                         "Leave cuda_graph off.")
    if config.io_binding and task != TASK_EMBEDDING:
        raise ValueError(f"io_binding runs embedding graphs; {folder} holds a {task} model. Leave io_binding "
                         "unset (None) or False.")
    if config.engine != ENGINE_ONNXRUNTIME and providers is not None and provider_names(providers) != [CPU_PROVIDER]:
        raise ValueError(f"engine {config.engine!r} runs on the CPU without ONNX Runtime's providers; drop providers "
                         f"({provider_names(providers)}) or load with engine='onnxruntime'")
    chosen = resolve_providers(providers, config.device, cuda=CudaSettings.from_config(config))
    preference = OPENVINO_PROVIDER if config.engine == ENGINE_OPENVINO else provider_names(chosen)[0]
    precision, reason = _pick_precision(manifest, config.precision, preference)
    variant = manifest.variants["fp32" if precision == BF16 else precision]
    model_path = folder / variant.file
    if config.verify_checksums:
        manifest.verify_files([*variant.files, TOKENIZER_FILE])
    elif not model_path.is_file():
        raise ModelFolderError(f"{model_path} is missing; re-export the model folder.")
    tokenizer = TextTokenizer(folder / TOKENIZER_FILE, max_length=manifest.max_sequence_length,
                              pad_id=manifest.model.pad_token_id, vocab_limit=manifest.model.vocab_size)
    heads = _check_max_length(manifest, tokenizer, config)
    _check_pad_id(manifest, tokenizer)
    shrink, arena = config.arena_shrink_tokens, config.cpu_arena != "off"
    outputs = (REQUIRED_OUTPUT[task],)
    engines = _engines(config, precision)
    calibration = _bf16_calibration(tokenizer, manifest) if precision == BF16 else []
    sessions: dict[str, ort.InferenceSession | OpenVINOModel] = {}
    runners: dict[str, Runner] = {}
    for engine in engines:
        if engine == ENGINE_OPENVINO:
            from .openvino_engine import compile_model

            compiled = compile_model(model_path, threads=config.intra_op_threads, precision=precision,
                                     cache_dir=config.engine_cache_dir, calibration=calibration)
            sessions[engine], runners[engine] = compiled, compiled.runner(outputs, shrink_tokens=shrink)
            if compiled.kept_f32 or compiled.split_f32:
                reason += (f"; activation outliers kept in f32: {len(compiled.kept_f32)} nodes whole, and the "
                           f"outlier input channels of {len(compiled.split_f32)} matrix products (docs/engines.md)")
        else:
            settings = SessionSettings(intra_op_threads=config.intra_op_threads,
                                       inter_op_threads=config.inter_op_threads,
                                       allow_spinning=config.allow_spinning, cpu_arena=config.cpu_arena)
            session = create_session(model_path, chosen, settings)
            sessions[engine] = session
            runners[engine] = SessionRunner(session, outputs, shrink_tokens=shrink, arena=arena)
        check_session(sessions[engine], inputs=manifest.inputs, outputs=manifest.outputs, task=task,
                      model_path=model_path, manifest_path=manifest.path)
        check_sizes(sessions[engine], task=task, hidden_size=manifest.hidden_size, labels=len(manifest.labels),
                    outputs=manifest.outputs, model_path=model_path, manifest_path=manifest.path)
    engine, engine_reason, split = _choose_engine(config, engines, manifest, variant.file, precision, runners,
                                                  remeasure)
    kept = [engine] if split is None else list(sessions)
    session = next((s for name, s in sessions.items() if name in kept and isinstance(s, ort.InferenceSession)), None)
    openvino = next((s for name, s in sessions.items() if name in kept and not isinstance(s, ort.InferenceSession)),
                    None)
    runner: Runner = runners[engine]
    if split is not None:
        small, tokens = split
        runner = SplitRunner(runners[small], runners[engine], tokens)
        engine = f"{ENGINE_ONNXRUNTIME}+{ENGINE_OPENVINO}"  # as tune.engine_label says it
    kind, device_id = session_device(session) if session is not None else ("cpu", 0)
    io_binding = task == TASK_EMBEDDING and (config.io_binding if config.io_binding is not None else kind == "cuda")
    if io_binding and session is not None:
        runner = IOBindingRunner(session, hidden_size=manifest.hidden_size, device=kind, device_id=device_id,
                                 max_buckets=config.max_buckets, cuda_graph=config.cuda_graph, shrink_tokens=shrink,
                                 arena=arena)
    policy = batch_policy(config, device=kind, io_binding=io_binding,
                          token_types=any(spec.name == TOKEN_TYPE_IDS for spec in manifest.inputs), heads=heads)
    loaded = LoadedModel(manifest=manifest, config=config, providers=chosen, precision=precision,
                         precision_reason=reason, session=session, tokenizer=tokenizer, runner=runner,
                         device=kind if kind == "cpu" else f"{kind}:{device_id}", io_binding=io_binding,
                         policy=policy, shrink_tokens=shrink, arena=arena, engine=engine,
                         engine_reason=engine_reason, openvino=openvino, split=split)
    logger.info("loaded %s: precision %s (%s) on %s (%s), %s", model_path, precision, reason, loaded.provider,
                engine_reason, "IO binding" if io_binding else "session.run")
    return loaded


def _bf16_calibration(tokenizer: TextTokenizer, manifest: Manifest) -> list[dict[str, np.ndarray]]:
    """The feeds on which bf16 looks for activation outliers: the first ``BF16_CALIBRATION_TEXTS`` of the shipped
    sentences' calibration split (never the quality gate's held-out texts), one text per feed, so that no padding
    pulls a tensor's median down."""
    texts = split_sentences(shipped_sentences())[0][:BF16_CALIBRATION_TEXTS]
    token_types = any(spec.name == TOKEN_TYPE_IDS for spec in manifest.inputs)
    feeds = []
    for sequence in tokenizer.encode(texts):
        ids, mask = tokenizer.pad([sequence])
        feed = {INPUT_IDS: ids, ATTENTION_MASK: mask}
        if token_types:
            feed[TOKEN_TYPE_IDS] = np.zeros_like(ids)
        feeds.append(feed)
    return feeds


def _engines(config: EncoderConfig, precision: str) -> tuple[str, ...]:
    """The engines to load: the one asked for, or for ``auto`` both when OpenVINO is installed and ONNX Runtime
    can run the precision."""
    if config.engine != AUTO:
        return (config.engine,)
    if precision == BF16:
        return (ENGINE_OPENVINO,)
    from .openvino_engine import openvino_version

    return (ENGINE_ONNXRUNTIME, ENGINE_OPENVINO) if openvino_version() is not None else (ENGINE_ONNXRUNTIME,)


def _choose_engine(config: EncoderConfig, engines: tuple[str, ...], manifest: Manifest, graph: str, precision: str,
                   runners: dict[str, Runner], remeasure: bool) -> tuple[str, str, tuple[str, int] | None]:
    """The engine that runs, why, and whether the calls split between two: the one asked for, or for ``auto`` the
    faster one as cached or measured (or both, each for the calls it is faster on: ``(small engine, tokens)``)."""
    if config.engine != AUTO:
        return config.engine, "requested", None
    if len(engines) == 1:
        why = ("bf16 runs on OpenVINO only" if precision == BF16 else
               "OpenVINO is not installed (pip install 'deberta-onnx[openvino]' to measure it)")
        return engines[0], f"auto: {why}", None
    from . import tune
    from .openvino_engine import openvino_version

    entry = manifest.files.get(graph)
    digest = entry.sha256 if entry is not None else str(manifest.folder / graph)
    versions = {"onnxruntime": ort.__version__, "openvino": openvino_version()}
    key = tune.choice_key(digest, precision, config.intra_op_threads, versions)
    path = tune.tune_file()
    cached = None if remeasure else tune.lookup(path, key)
    if cached is not None:
        return cached.engine, f"auto: {cached.reason} on {cached.measured_at} (cached in {path})", cached.split
    choice = tune.measure(runners, vocab=manifest.model.vocab_size or 128)
    try:
        tune.remember(path, key, choice, {"folder": str(manifest.folder), "graph": graph, "graph_sha256": digest,
                                          "precision": precision, "threads": config.intra_op_threads,
                                          "machine": tune.machine(), "versions": versions})
    except OSError as exc:  # a read-only home: the choice holds for this process, and is measured again next time
        logger.warning("could not cache the engine choice in %s: %s", path, exc)
    return choice.engine, f"auto: {choice.reason}", choice.split

