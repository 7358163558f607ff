"""Typed reads of a manifest document's fields, each failure a ``ManifestError`` that names the field; used by
``manifest`` alone."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from .contract import (
    POOLINGS,
    PRECISIONS,
    TASK_EMBEDDING,
    TASK_FILL_MASK,
    TASK_MULTIPLE_CHOICE,
    TASK_QUESTION_ANSWERING,
    TASKS,
    TensorSpec,
)
from .errors import ManifestError

__all__ = ["Reader", "file_fields", "kind", "model_fields", "source_fields", "tensor_specs", "variant_fields"]


class Reader:
    """Typed access to one manifest document; every failure names the field and how to fix the folder."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, field: str, problem: str) -> ManifestError:
        return ManifestError(f"{self.path}: {field} {problem}; re-export the model folder with `deberta-onnx export`.")

    def section(self, data: Mapping[str, Any], key: str, field: str, *, optional: bool = False) -> dict[str, Any]:
        value = data.get(key)
        if value is None and optional:
            return {}
        if not isinstance(value, dict):
            raise self.fail(field, f"must be an object, got {kind(value)}")
        return value

    def integer(self, data: Mapping[str, Any], key: str, field: str, *, minimum: int = 1) -> int:
        value = data.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.fail(field, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def maybe_integer(self, data: Mapping[str, Any], key: str, field: str, *, minimum: int = 1) -> int | None:
        return None if data.get(key) is None else self.integer(data, key, field, minimum=minimum)

    def text(self, data: Mapping[str, Any], key: str, field: str, *, optional: bool = False,
             choices: Iterable[str] | None = None) -> str | None:
        value = data.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.fail(field, f"must be a string, got {kind(value)}")
        allowed = tuple(choices) if choices is not None else None
        if allowed is not None and value not in allowed:
            raise self.fail(field, f"must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def flag(self, data: Mapping[str, Any], key: str, field: str) -> bool:
        value = data.get(key, False)
        if not isinstance(value, bool):
            raise self.fail(field, f"must be true or false, got {value!r}")
        return value

    def strings(self, data: Mapping[str, Any], key: str, field: str) -> tuple[str, ...]:
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.fail(field, f"must be a list of strings, got {value!r}")
        return tuple(value)

    def report(self, data: Mapping[str, Any], key: str, field: str) -> dict[str, Any] | None:
        value = data.get(key)
        if value is not None and not isinstance(value, dict):
            raise self.fail(field, f"must be an object or null, got {kind(value)}")
        return value

    def file_name(self, value: object, field: str) -> str:
        """A file of the folder: a relative POSIX path that stays inside it (no absolute path, no ``..``)."""
        if not isinstance(value, str) or not value:
            raise self.fail(field, f"must be a file name, got {value!r}")
        parts = PurePosixPath(value).parts
        if value.startswith(("/", "\\")) or "\\" in value or ".." in parts or ":" in parts[0]:
            raise self.fail(field, f"names {value!r}, which is outside the model folder; only files inside it are "
                                   "loaded")
        return value


def kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def tensor_specs(reader: Reader, graph: Mapping[str, Any], key: str) -> tuple[TensorSpec, ...]:
    items = graph.get(key)
    if not isinstance(items, list) or not items:
        raise reader.fail(f"graph.{key}", f"must be a non-empty list, got {kind(items)}")
    specs = []
    for index, item in enumerate(items):
        field = f"graph.{key}[{index}]"
        if not isinstance(item, dict):
            raise reader.fail(field, f"must be an object, got {kind(item)}")
        name, dtype = reader.text(item, "name", f"{field}.name"), reader.text(item, "dtype", f"{field}.dtype")
        dims = item.get("dims")
        if not isinstance(dims, list) or not all(
                isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d > 0) for d in dims):
            raise reader.fail(f"{field}.dims", f"must be a list of axis names and positive sizes, got {dims!r}")
        specs.append(TensorSpec(name=str(name), dtype=str(dtype), dims=tuple(dims)))
    return tuple(specs)


def model_fields(reader: Reader, data: Mapping[str, Any]) -> dict[str, Any]:
    model = reader.section(data, "model", "model")
    task = reader.text(model, "task", "model.task", optional=True, choices=TASKS) or TASK_EMBEDDING
    pooling = reader.text(model, "pooling", "model.pooling", optional=True, choices=POOLINGS)
    if task == TASK_EMBEDDING and pooling is None and "pooling" in model:
        raise reader.fail("model.pooling", f"must be one of {', '.join(POOLINGS)} for an embedding model, got null")
    labels = reader.strings(model, "labels", "model.labels")
    # Labels belong to the classifiers: a question-answering graph scores token positions, a multiple-choice graph
    # the choices it is given and a fill-mask graph the vocabulary (older question-answering folders have some).
    if task not in (TASK_EMBEDDING, TASK_QUESTION_ANSWERING, TASK_MULTIPLE_CHOICE, TASK_FILL_MASK) and not labels:
        raise reader.fail("model.labels", f"must name at least one label for a {task} model")
    return dict(
        hidden_size=reader.integer(model, "hidden_size", "model.hidden_size"),
        max_sequence_length=reader.integer(model, "max_sequence_length", "model.max_sequence_length", minimum=2),
        vocab_size=reader.integer(model, "vocab_size", "model.vocab_size"),
        pad_token_id=reader.integer(model, "pad_token_id", "model.pad_token_id", minimum=0),
        num_hidden_layers=reader.maybe_integer(model, "num_hidden_layers", "model.num_hidden_layers"),
        num_attention_heads=reader.maybe_integer(model, "num_attention_heads", "model.num_attention_heads"),
        task=task,
        pooling=pooling,
        normalize=reader.flag(model, "normalize", "model.normalize"),
        labels=labels,
        problem_type=reader.text(model, "problem_type", "model.problem_type", optional=True),
        score_activation=reader.text(model, "score_activation", "model.score_activation", optional=True),
        tokenizer_source=reader.text(model, "tokenizer_source", "model.tokenizer_source", optional=True),
        mask_token=reader.text(model, "mask_token", "model.mask_token", optional=True),
    )


def source_fields(reader: Reader, data: Mapping[str, Any]) -> dict[str, Any]:
    source = reader.section(data, "source", "source", optional=True)
    return dict(
        model=reader.text(source, "model", "source.model", optional=True) or "unknown",
        model_type=reader.text(source, "model_type", "source.model_type", optional=True),
        architecture=reader.text(source, "architecture", "source.architecture", optional=True),
        random_weights=reader.flag(source, "random_weights", "source.random_weights"),
        shape=reader.text(source, "shape", "source.shape", optional=True),
        parameters=reader.maybe_integer(source, "parameters", "source.parameters", minimum=0),
        sentence_transformers=reader.report(source, "sentence_transformers", "source.sentence_transformers"),
        outliers=reader.report(source, "outliers", "source.outliers"),
    )


def variant_fields(reader: Reader, data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    variants = reader.section(data, "variants", "variants")
    if not variants:
        raise reader.fail("variants", "holds no variant (at least fp32 is always exported)")
    out = {}
    for name, entry in variants.items():
        field = f"variants.{name}"
        if name not in PRECISIONS:
            raise reader.fail("variants", f"holds {name!r}, which this runtime does not know ({', '.join(PRECISIONS)})")
        if not isinstance(entry, dict):
            raise reader.fail(field, f"must be an object, got {kind(entry)}")
        extra = reader.strings(entry, "extra_files", f"{field}.extra_files")
        out[name] = dict(
            name=name,
            file=reader.file_name(entry.get("file"), f"{field}.file"),
            extra_files=tuple(reader.file_name(item, f"{field}.extra_files") for item in extra),
            recipe=reader.text(entry, "recipe", f"{field}.recipe", optional=True),
            recipe_description=reader.text(entry, "recipe_description", f"{field}.recipe_description", optional=True),
            validation=reader.report(entry, "validation", f"{field}.validation"),
            quality=reader.report(entry, "quality", f"{field}.quality"),
            nodes=reader.report(entry, "nodes", f"{field}.nodes"),
            calibration=reader.report(entry, "calibration", f"{field}.calibration"),
            range_audit=reader.report(entry, "range_audit", f"{field}.range_audit"),
        )
    return out


def file_fields(reader: Reader, data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    files = reader.section(data, "files", "files")
    out = {}
    for name, entry in files.items():
        field = f"files.{name}"
        reader.file_name(name, "files")
        if not isinstance(entry, dict):
            raise reader.fail(field, f"must be an object, got {kind(entry)}")
        digest = reader.text(entry, "sha256", f"{field}.sha256")
        if digest is None or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise reader.fail(f"{field}.sha256", f"must be 64 lowercase hex digits, got {digest!r}")
        out[name] = {"sha256": digest, "bytes": reader.integer(entry, "bytes", f"{field}.bytes", minimum=0)}
    return out
