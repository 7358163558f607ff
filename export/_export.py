"""``export_model``: checkpoint -> validated model folder (``model.onnx``, ``tokenizer.json``, ``manifest.json``)."""

from __future__ import annotations

import os
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from deberta_onnx.runtime.contract import (
    MODEL_FILE,
    TASK_EMBEDDING,
    TASK_FILL_MASK,
    TASK_MULTIPLE_CHOICE,
    TOKENIZER_FILE,
)

from ._attention import TRANSLATIONS, fused_attention
from ._checkpoint import LoadedCheckpoint, load_checkpoint, scratch_dir
from ._errors import CheckpointError, ExportError, ValidationError
from ._heads import FillMaskGraph, MultipleChoiceGraph
from ._hub import write_hub_files
from ._manifest import model_fields, write_export_manifest
from ._optimize import apply_ort_fusions, folded_relative_attention
from ._portable import check_portable
from ._quiet import quiet_libraries
from ._sentence_transformers import SentenceTransformerSpec, read_sentence_transformer
from ._staging import check_target, recover, staging_folder
from ._tokenizer import build_tokenizer
from ._torch_graph import ClassifierGraph, EmbeddingGraph, export_onnx
from ._triton import write_triton_repository
from ._validate import DEFAULT_VALIDATION_SHAPES, LONG_VALIDATION_SHAPES, format_report, validate
from .config import LONGEST_RELATIVE_LENGTH, ExportConfig, ExportResult
from .precision import derive_variants, read_calibration
from .testing import RANDOM_PREFIX, random_source

__all__ = ["export_model"]


def export_model(src: str | os.PathLike[str], out_dir: str | os.PathLike[str], config: ExportConfig | None = None
                 ) -> ExportResult:
    """Exports a DeBERTa checkpoint to ``out_dir``: one ONNX graph (encoder + pooling), tokenizer, manifest.

    The folder is built beside ``out_dir``, flushed to disk and swapped into place at the end, so a failed or
    interrupted export leaves no partial ``out_dir`` and never loses the one it replaces.

    Args:
        src: a local Hugging Face checkpoint folder, a hub id (offline when cached), or ``random:SHAPE``
            (e.g. ``random:deberta-v3-base``) for a checkpoint of that shape with random weights.
        out_dir: the model folder to write.
        config: export options, see ``ExportConfig``.

    Raises:
        CheckpointError / UnsupportedModelError: the source cannot be loaded or is not DeBERTa.
        OutputExistsError: ``out_dir`` is not empty and ``config.overwrite`` is false; or it is the source
            checkpoint, holds it, or holds files that no deberta-onnx export wrote (never deleted).
        ValidationError: ONNX Runtime and PyTorch disagree beyond ``config.atol``.
        ExportError: anything else that stopped the export, writing errors with the path.
    """
    config = config or ExportConfig()
    started = time.perf_counter()
    target = Path(out_dir).absolute()
    recover(target)  # first, so that an OUT_DIR a killed export had moved aside is back before it is checked
    check_target(target, config.overwrite, str(src))
    with scratch_dir() as scratch, quiet_libraries():
        source = str(src)
        if source.startswith(RANDOM_PREFIX):
            shape, _, option = source[len(RANDOM_PREFIX):].partition("+")
            _say(config, f"building a {shape} checkpoint with RANDOM weights"
                         f"{' and activation outliers (' + option + ')' if option else ''}")
            source = random_source(source, scratch)
        sentence_transformer = read_sentence_transformer(source)
        pooling, normalize = _pooling(config, sentence_transformer, str(src))
        if sentence_transformer is not None:
            if config.task not in (None, TASK_EMBEDDING):
                raise ExportError(f"{src} is a sentence-transformers embedding model; it has no {config.task} head.")
            _say(config, f"sentence-transformers checkpoint: {' -> '.join(sentence_transformer.modules)} "
                         f"({pooling} pooling{', normalized' if normalize else ''})")
            source = sentence_transformer.transformer_path
        # A sentence-transformers model is an embedding model by its own modules, whatever head its
        # Transformer folder's config names (sentence-transformers loads that folder with AutoModel too).
        task = TASK_EMBEDDING if sentence_transformer is not None else config.task
        checkpoint = load_checkpoint(source, task=task)
        if checkpoint.task != TASK_EMBEDDING:
            _check_classifier_options(config, checkpoint.task, str(src))
        if str(src).startswith(RANDOM_PREFIX) or sentence_transformer is not None:
            checkpoint.source["model"] = str(src)
        if sentence_transformer is not None:
            checkpoint.source["sentence_transformers"] = sentence_transformer.to_manifest()
        if config.calibration is not None and "int8-static" in config.precisions:
            read_calibration(config.calibration)  # a bad file fails now, not after the export
        with staging_folder(target, config.overwrite, str(src)) as staging:
            manifest = _build(checkpoint, staging, config, pooling=pooling, normalize=normalize,
                              sentence_transformer=sentence_transformer,
                              triton_model=config.triton_name or _model_name(target.name),
                              scratch=Path(scratch))
    seconds = time.perf_counter() - started
    _say(config, f"exported {src} to {target} in {seconds:.1f} s")
    return ExportResult(out_dir=target, manifest=manifest, seconds=seconds)


def _pooling(config: ExportConfig, spec: SentenceTransformerSpec | None, src: str) -> tuple[str, bool]:
    """The pooling and normalisation to fuse: the config's where given, else the checkpoint's."""
    if spec is None:
        return config.pooling or "mean", bool(config.normalize)
    for name, asked, own in (("pooling", config.pooling, spec.pooling),
                             ("normalize", config.normalize, spec.normalize)):
        if asked is not None and asked != own:
            raise ExportError(
                f"{src} is a sentence-transformers model whose modules give {name}={own}; {name}={asked} would "
                f"give other vectors than its encode(). Leave {name} unset to take the checkpoint's own, or export "
                "its Transformer folder alone to choose freely."
            )
    return spec.pooling, spec.normalize


def _check_classifier_options(config: ExportConfig, task: str, src: str) -> None:
    # Lower precisions apply to every head: the quality gate judges each on its own outputs (``gate_readout``).
    asked = [flag for flag, value in (("--pooling", config.pooling), ("--normalize", config.normalize),
                                      ("--token-embeddings", config.token_embeddings or None)) if value is not None]
    if asked:
        raise ExportError(
            f"{src} is a {task} checkpoint, whose graph outputs logits; {', '.join(asked)} appl"
            f"{'ies' if len(asked) == 1 else 'y'} to embedding graphs. Drop {'it' if len(asked) == 1 else 'them'}, "
            "or pass --task embedding to export the encoder alone."
        )



def _model_name(folder_name: str) -> str:
    """A Triton model name from the output folder's name: other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", folder_name).lstrip("_.-") or "model"


def _build(checkpoint: LoadedCheckpoint, folder: Path, config: ExportConfig, *, pooling: str, normalize: bool,
           sentence_transformer: SentenceTransformerSpec | None, triton_model: str, scratch: Path
           ) -> dict[str, Any]:
    """Writes the model folder's files into ``folder`` (graph, tokenizer, variants, Triton repository, manifest
    last) and returns the manifest."""
    fast_tokenizer, tokenizer_origin, vocab = _tokenizer(checkpoint, config)
    max_length = _max_length(checkpoint, config, sentence_transformer)
    graph = _graph_module(checkpoint, config, pooling=pooling, normalize=normalize)
    model_path = folder / MODEL_FILE
    optimization, report = _export_validated(graph, checkpoint, model_path, config, vocab=vocab,
                                             max_length=max_length)
    # The file declares the model's maximum (a checksummed bound the runtime checks the manifest against), and
    # clients that tokenize with it directly (Triton) truncate as the runtime does.
    fast_tokenizer.enable_truncation(max_length)
    fast_tokenizer.save(str(folder / TOKENIZER_FILE))

    pad_id = _pad_id(checkpoint)
    model = model_fields(checkpoint, max_length=max_length, pad_id=pad_id, pooling=pooling, normalize=normalize,
                         tokenizer_source=tokenizer_origin)
    sizes = {"hidden": model["hidden_size"], "vocab": model["vocab_size"]}
    if checkpoint.task != TASK_EMBEDDING:
        sizes["labels"] = len(model.get("labels", []))
    if isinstance(graph, FillMaskGraph):
        model["mask_token"] = str(checkpoint.tokenizer.mask_token)
    model_files = sorted(p.name for p in folder.iterdir() if p.name.startswith(MODEL_FILE))
    inputs = list(graph.inputs)
    outputs = [spec.resolved(**sizes) for spec in graph.outputs]
    triton = None
    if config.triton:
        triton = write_triton_repository(folder, name=triton_model, model_files=model_files, inputs=inputs,
                                         outputs=outputs, labels=model.get("labels", []),
                                         max_batch_size=config.triton_max_batch_size,
                                         max_queue_delay_us=config.triton_max_queue_delay_us)
        _say(config, f"Triton model repository: {triton['repository']}/{triton_model}/")
    fp32_quality, derived = derive_variants(graph, folder, config, scratch, max_length=max_length, pad_id=pad_id,
                                            say=lambda message: _say(config, message))
    if config.portable:
        check_portable(folder, [MODEL_FILE, *(entry["file"] for entry in derived.values())])
    every = {"fp32": {"file": MODEL_FILE, "extra_files": [name for name in model_files if name != MODEL_FILE]},
             **derived}
    hub = write_hub_files(folder, checkpoint, every, inputs=[spec.name for spec in inputs], max_length=max_length,
                          pad_id=pad_id, scratch=scratch)
    return write_export_manifest(folder, source=checkpoint.source, model=model, opset=config.opset, inputs=inputs,
                                 outputs=outputs, optimization=optimization, model_files=model_files,
                                 validation=report, fp32_quality=fp32_quality, variants=derived, triton=triton,
                                 hub=hub)


def _tokenizer(checkpoint: LoadedCheckpoint, config: ExportConfig) -> tuple[Tokenizer, str, int]:
    """The ``tokenizer.json`` to write, where it came from, and how many token ids the model can look up."""
    fast_tokenizer, origin = build_tokenizer(checkpoint.path, checkpoint.tokenizer, config.tokenizer)
    embedding_rows = int(checkpoint.config.vocab_size)
    vocab = fast_tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab > embedding_rows:
        raise CheckpointError(
            f"the tokenizer has {vocab} tokens but the model's embedding table has {embedding_rows} rows; the "
            "tokenizer does not belong to this checkpoint."
        )
    return fast_tokenizer, origin, min(vocab, embedding_rows)


def _graph_module(checkpoint: LoadedCheckpoint, config: ExportConfig, *, pooling: str, normalize: bool
                  ) -> EmbeddingGraph | ClassifierGraph:
    """The ``torch.nn.Module`` to export: encoder and pooling, or a model with its head."""
    if checkpoint.task == TASK_EMBEDDING:
        return EmbeddingGraph(checkpoint.model, pooling=pooling, normalize=normalize,
                              token_embeddings=config.token_embeddings).eval()
    segments = int(getattr(checkpoint.config, "type_vocab_size", 0) or 0) > 0
    if checkpoint.task == TASK_MULTIPLE_CHOICE:
        return MultipleChoiceGraph(checkpoint.model, token_type_ids=segments).eval()  # type: ignore[return-value]
    if checkpoint.task == TASK_FILL_MASK:
        return FillMaskGraph(checkpoint.model, mask_token_id=_mask_id(checkpoint)).eval()  # type: ignore[return-value]
    return ClassifierGraph(checkpoint.model, checkpoint.task, token_type_ids=segments).eval()


def _export_validated(graph: EmbeddingGraph | ClassifierGraph, checkpoint: LoadedCheckpoint, model_path: Path,
                      config: ExportConfig, *, vocab: int, max_length: int
                      ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Exports and validates the graph: with fused attention first where asked for, and, should that graph fail
    validation, the unfused one in its place (said, and recorded in the manifest). Returns the manifest's
    ``optimization`` entry and the validation report (``None`` when not validated)."""
    fused = config.optimize and config.attention == "fused"
    rejected: str | None = None
    while True:
        optimization = _export_graph(graph, checkpoint, model_path, config, fused=fused)
        if not config.validate:
            return optimization, None
        try:
            report = validate(graph, model_path, vocab=vocab, max_length=max_length, inputs=graph.inputs,
                              outputs=graph.outputs, shapes=_validation_shapes(config, max_length), atol=config.atol,
                              rtol=config.rtol, seed=config.seed, progress=not config.quiet)
        except ValidationError as exc:
            if optimization["attention"] != "fused":
                raise
            _say(config, f"the fused-attention graph failed validation ({exc}); exporting the unfused graph instead")
            fused, rejected = False, str(exc)
            continue
        _say(config, format_report(report))
        if rejected is not None:
            optimization["fused_attention_rejected"] = rejected
        return optimization, report


def _validation_shapes(config: ExportConfig, max_length: int) -> tuple[tuple[int, int], ...]:
    """The configured shapes; past 512 tokens, also full-length and mid-length batches at the model's maximum."""
    shapes = config.validation_shapes
    if max_length > 512 and config.validation_shapes == DEFAULT_VALIDATION_SHAPES:
        shapes = (*shapes, *LONG_VALIDATION_SHAPES)
    return shapes


def _export_graph(graph: EmbeddingGraph | ClassifierGraph, checkpoint: LoadedCheckpoint, model_path: Path,
                  config: ExportConfig, *, fused: bool) -> dict[str, Any]:
    """Exports ``graph`` to ``model_path``, with the graph speed-ups unless turned off (and the attention fused
    into one ONNX Runtime kernel per layer if ``fused``); returns the manifest's ``optimization`` entry."""
    source = checkpoint.source
    _say(config, f"exporting {source['architecture']} ({source['parameters'] / 1e6:.0f}M "
                 f"parameters{', RANDOM weights' if source['random_weights'] else ''}) to ONNX"
                 f"{' with fused attention' if fused else ''}")
    model = checkpoint.model
    with folded_relative_attention(model) if config.optimize else nullcontext(0) as folded, \
            fused_attention(model) if fused else nullcontext(0) as fused_layers:
        export_onnx(graph, model_path, opset=config.opset, translations=TRANSLATIONS if fused_layers else None)
    optimization: dict[str, Any] = {"enabled": config.optimize, "relative_attention_layers_folded": folded,
                                    "attention": "fused" if fused_layers else "unfused",
                                    "attention_layers_fused": fused_layers, "portable": config.portable}
    if config.optimize and not config.portable:
        _say(config, "applying ONNX Runtime's transformer fusions")
        model_config = checkpoint.config
        optimization["fused_operators"] = apply_ort_fusions(
            model_path, num_heads=int(model_config.num_attention_heads), hidden_size=int(model_config.hidden_size),
            external_data=model_path.with_name(f"{MODEL_FILE}.data").exists())
    return optimization


def _mask_id(checkpoint: LoadedCheckpoint) -> int:
    """The ``[MASK]`` id fill-mask scores at; a tokenizer without a mask token cannot mark what to fill."""
    mask_id = checkpoint.tokenizer.mask_token_id
    if mask_id is None:
        raise CheckpointError(f"{checkpoint.path}'s tokenizer has no mask token, so no text can mark a position to "
                              "fill; give the checkpoint the tokenizer it was pre-trained with (mask_token [MASK]).")
    return int(mask_id)


def _pad_id(checkpoint: LoadedCheckpoint) -> int:
    """The padding id: the tokenizer's, else the model config's, else 0."""
    pad_id = checkpoint.tokenizer.pad_token_id
    return int(pad_id if pad_id is not None else (checkpoint.config.pad_token_id or 0))


def _max_length(checkpoint: LoadedCheckpoint, config: ExportConfig,
                sentence_transformer: SentenceTransformerSpec | None = None) -> int:
    limit = int(getattr(checkpoint.config, "max_position_embeddings", 512))
    if config.max_length is not None:
        longest = _longest_input(checkpoint, limit)
        if config.max_length > longest:
            raise ExportError(f"max_length {config.max_length} exceeds the longest input this checkpoint allows "
                              f"({longest}: {_why_longest(checkpoint, limit)})")
        return config.max_length
    if sentence_transformer is not None and sentence_transformer.max_seq_length is not None:
        return min(sentence_transformer.max_seq_length, limit)
    declared = getattr(checkpoint.tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel (int(1e30)).
    return min(int(declared), limit) if declared and declared < 1_000_000 else limit


def _longest_input(checkpoint: LoadedCheckpoint, limit: int) -> int:
    """``max_position_embeddings``, or up to ``LONGEST_RELATIVE_LENGTH`` for a checkpoint whose positions are
    relative only (no absolute position table to index past its end)."""
    model_config = checkpoint.config
    relative_only = (getattr(model_config, "relative_attention", False)
                     and not getattr(model_config, "position_biased_input", True))
    return max(limit, LONGEST_RELATIVE_LENGTH) if relative_only else limit


def _why_longest(checkpoint: LoadedCheckpoint, limit: int) -> str:
    if _longest_input(checkpoint, limit) > limit:
        return f"relative positions only, validated up to {LONGEST_RELATIVE_LENGTH} tokens"
    return "its max_position_embeddings, the size of its absolute position table"


def _say(config: ExportConfig, message: str) -> None:
    if not config.quiet:
        print(message, file=sys.stderr, flush=True)
