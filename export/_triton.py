"""A Triton Inference Server model repository beside the exported folder: ``triton/<name>/config.pbtxt``
(ONNX Runtime backend, dynamic batching, inputs and outputs from the graph contract) and the ONNX model under
``triton/<name>/1/``. Tokenization stays on the client, with the folder's ``tokenizer.json``."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deberta_onnx.runtime.contract import BATCH_AXIS, LOGITS, TensorSpec

from ._errors import ExportError

__all__ = ["TRITON_DIR", "link_or_copy", "triton_config", "triton_name", "write_triton_repository"]

TRITON_DIR = "triton"
LABELS_FILE = "labels.txt"
_VERSION = "1"
_TYPES = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def triton_name(name: str) -> str:
    """``name`` if it is a usable Triton model name (letters, digits, ``_ . -``), else ``ValueError``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"Triton model name must be letters, digits, '_', '.' or '-' (not starting with a "
                         f"symbol), got {name!r}")
    return name


def _tensor(spec: TensorSpec, extra: str = "") -> str:
    if spec.dims[0] != BATCH_AXIS:
        raise ExportError(f"{spec.name} has no leading batch axis ({list(spec.dims)}); Triton's batching needs one")
    dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in spec.dims[1:])
    return (f'  {{\n    name: "{spec.name}"\n    data_type: {_TYPES[spec.dtype]}\n    dims: [ {dims} ]\n'
            f"{extra}  }}")


def triton_config(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], *, max_batch_size: int,
                  max_queue_delay_us: int, label_file: str | None = None) -> str:
    """The text of ``config.pbtxt`` (protobuf text format of Triton's ``ModelConfig``).

    Dimensions are given without the batch axis (Triton adds it, up to ``max_batch_size``); dynamic axes are -1.
    ``label_file`` names the classification labels of the ``logits`` output, one per line.
    """
    label = f'    label_filename: "{label_file}"\n' if label_file else ""
    lines = [
        f'name: "{triton_name(name)}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        ",\n".join(_tensor(spec) for spec in inputs),
        "]",
        "output [",
        ",\n".join(_tensor(spec, label if spec.name == LOGITS else "") for spec in outputs),
        "]",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def link_or_copy(source: Path, target: Path) -> bool:
    """Puts ``source``'s content at ``target``: a hard link, which costs no space, or across file systems (or where
    links are refused) a copy. Returns whether it is a link."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
        return False
    return True


def write_triton_repository(folder: Path, *, name: str, model_files: Sequence[str], inputs: Sequence[TensorSpec],
                            outputs: Sequence[TensorSpec], labels: Sequence[str], max_batch_size: int,
                            max_queue_delay_us: int) -> dict[str, Any]:
    """Writes ``folder/triton/<name>/`` and returns its manifest entry.

    Args:
        folder: the model folder being exported (holds ``model_files``).
        name: the Triton model name.
        model_files: the ONNX file first, then its external-data files, all placed under version ``1``.
        inputs, outputs: the graph's tensor specs, fixed sizes resolved.
        labels: a classifier's labels (written to ``labels.txt`` for the logits output), or empty.
        max_batch_size, max_queue_delay_us: Triton's batching limits.
    """
    model_dir = folder / TRITON_DIR / triton_name(name)
    version = model_dir / _VERSION
    version.mkdir(parents=True)
    for file in model_files:
        link_or_copy(folder / file, version / ("model.onnx" if file == model_files[0] else file))
    label_file = None
    if labels:
        label_file = LABELS_FILE
        (model_dir / LABELS_FILE).write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
    (model_dir / "config.pbtxt").write_text(
        triton_config(name, inputs, outputs, max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
                      label_file=label_file), encoding="utf-8")
    return {"repository": TRITON_DIR, "model_name": name, "max_batch_size": max_batch_size,
            "max_queue_delay_us": max_queue_delay_us}
