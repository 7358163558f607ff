"""The configurations a benchmark compares: the PyTorch reference and this project's runtime.

Every backend answers two calls on the same inputs: ``run(ids, mask)`` (one model call on ready token ids, for
the grid) and ``encode(texts, batch_size)`` (text to vectors end to end, tokenization included, for the corpus).
``runtime_backends`` enumerates what the installed runtime and a model folder offer: one backend per precision
variant in the manifest, per execution provider, per run path (``plain`` ``session.run``, IO binding when
the runtime has it, and IO binding with CUDA graphs on CUDA), so new variants and paths show up in the table
without changes here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deberta_onnx.runtime import Encoder, EncoderConfig
from deberta_onnx.runtime.contract import TOKENIZER_FILE
from deberta_onnx.runtime.session import cuda_available

from .timing import cuda_synchronizer

__all__ = ["RUN_PATHS", "Backend", "OrtBackend", "ThreadSetting", "TorchBackend", "runtime_backends",
           "runtime_paths", "torch_backends"]


@dataclass(frozen=True)
class ThreadSetting:
    """ONNX Runtime threading for one configuration: intra-op threads and spinning (``None``: the default)."""

    intra_op_threads: int | None = None
    allow_spinning: bool | None = None

    @classmethod
    def parse(cls, text: str) -> ThreadSetting:
        """``default``, ``N``, ``N:spin`` or ``N:nospin`` (also ``default:nospin``).

        Raises:
            ValueError: anything else.
        """
        count, _, spin = text.strip().partition(":")
        if spin not in ("", "spin", "nospin") or not (count == "default" or (count.isdigit() and int(count) > 0)):
            raise ValueError(f"thread setting {text!r} is not default, N, N:spin or N:nospin (N >= 1)")
        return cls(intra_op_threads=None if count == "default" else int(count),
                   allow_spinning=None if not spin else spin == "spin")

    def __str__(self) -> str:
        if self.intra_op_threads is None and self.allow_spinning is None:
            return "default"
        spin = "" if self.allow_spinning is None else (":spin" if self.allow_spinning else ":nospin")
        return f"{self.intra_op_threads if self.intra_op_threads is not None else 'default'}{spin}"


@dataclass
class Backend:
    """What every row of the results names: engine, precision, device and run path."""

    engine: str
    precision: str
    device: str
    path: str
    model: str
    threads: str = "default"

    @property
    def label(self) -> str:
        path = "" if self.path == "plain" else f" {self.path}"
        threads = "" if self.threads == "default" else f" threads {self.threads}"
        return f"{self.engine} {self.precision} {self.device}{path}{threads}"

    @property
    def sync(self) -> Any:
        return cuda_synchronizer(self.device)

    def describe(self) -> dict[str, Any]:
        return {"engine": self.engine, "precision": self.precision, "device": self.device, "path": self.path,
                "model": self.model, "threads": self.threads, "label": self.label}

    def run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Frees what the backend holds (sessions, device memory)."""


class TorchBackend(Backend):
    """transformers' eager model plus masked mean pooling: what the runtime replaces.

    ``encode`` works as sentence-transformers' ``encode`` does: texts sorted by length (longest first), batches
    tokenized with padding to the longest and truncation, outputs put back into input order. The tokenizer is
    transformers' fast tokenizer over the model folder's own ``tokenizer.json``, so both sides see the same ids
    and the corpus parity compares the models, not two tokenizers.
    """

    def __init__(self, checkpoint: str, model_dir: Path, *, model: str, precision: str = "fp32",
                 device: str = "cpu", max_length: int = 512) -> None:
        import torch
        from transformers import AutoModel, PreTrainedTokenizerFast

        from deberta_onnx.export.testing import quiet_libraries

        super().__init__(engine="pytorch", precision=precision, device=device, path="eager", model=model,
                         threads=str(torch.get_num_threads()))
        dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]
        self._torch = torch
        with quiet_libraries():
            self.module = AutoModel.from_pretrained(checkpoint, dtype=dtype).eval().to(device)
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / TOKENIZER_FILE), pad_token="[PAD]",
                                                 model_max_length=max_length)
        self.max_length = max_length

    def _pooled(self, ids: Any, mask: Any) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            hidden = self.module(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
            return pooled.float().cpu().numpy()

    def run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        torch = self._torch
        return self._pooled(torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device))

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out: np.ndarray | None = None
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            vectors = self._pooled(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
            if out is None:
                out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
            out[rows] = vectors
        return out if out is not None else np.empty((0, 0), dtype=np.float32)

    def close(self) -> None:
        del self.module
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()


class OrtBackend(Backend):
    """This project's ``Encoder`` on one precision variant, provider and run path."""

    def __init__(self, model_dir: Path, *, model: str, precision: str, device: str, path: str,
                 config_fields: dict[str, Any], threads: ThreadSetting, tf32: bool = False) -> None:
        super().__init__(engine="onnxruntime", precision=precision, device=device, path=path, model=model,
                         threads=str(threads))
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        config = EncoderConfig(precision=precision, intra_op_threads=threads.intra_op_threads,
                               allow_spinning=threads.allow_spinning, verify_checksums=False, use_tf32=tf32,
                               **config_fields)
        self.encoder = Encoder(model_dir, providers, config=config)
        # The options the session was really made with (the CUDA provider's, on CUDA), for the report.
        self.provider_options = {name: dict(options) for name, options in
                                 self.encoder.session.get_provider_options().items() if name != "CPUExecutionProvider"}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "provider_options": self.provider_options}

    def run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.encoder.loaded.runner.run(ids, mask)[0]

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        return self.encoder.encode(list(texts), batch_size=batch_size)

    def close(self) -> None:
        del self.encoder


# Every run path a benchmark may name.
RUN_PATHS = ("plain", "iobinding", "cudagraph")


def runtime_paths(device: str = "cpu") -> dict[str, dict[str, Any]]:
    """Run paths the installed runtime offers on ``device``, as ``EncoderConfig`` fields: always ``plain``;
    ``iobinding`` as well when ``EncoderConfig`` has an ``io_binding`` switch (then ``plain`` turns it off
    explicitly, since the runtime may pick IO binding by itself on CUDA); on CUDA, ``cudagraph`` (IO binding with
    one CUDA graph per shape) when it has a ``cuda_graph`` switch."""
    fields = {f.name for f in dataclasses.fields(EncoderConfig)}
    if "io_binding" not in fields:
        return {"plain": {}}
    paths: dict[str, dict[str, Any]] = {"plain": {"io_binding": False}, "iobinding": {"io_binding": True}}
    if device == "cuda" and "cuda_graph" in fields:
        paths["cudagraph"] = {"io_binding": True, "cuda_graph": True}
    return paths


def devices(requested: str) -> list[str]:
    """``"auto"`` -> the CPU, plus CUDA where both onnxruntime-gpu and a torch CUDA device are present."""
    if requested == "cpu":
        return ["cpu"]
    has_cuda = cuda_available() and _torch_cuda()
    if requested == "cuda" and not has_cuda:
        raise ValueError("--device cuda needs onnxruntime-gpu and a CUDA build of torch with a visible GPU; "
                         "neither is here (use --device cpu or auto)")
    if requested == "cuda":
        return ["cuda"]
    return ["cpu", "cuda"] if has_cuda else ["cpu"]


def _torch_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def torch_backends(checkpoint: str, model_dir: Path, *, model: str, device: str, max_length: int) -> list[TorchBackend]:
    """PyTorch fp32 on ``device``, and fp16 as well on CUDA."""
    precisions = ["fp32", "fp16"] if device == "cuda" else ["fp32"]
    return [TorchBackend(checkpoint, model_dir, model=model, precision=p, device=device, max_length=max_length)
            for p in precisions]


def runtime_backends(model_dir: Path, variants: Sequence[str], *, model: str, device: str,
                     threads: Sequence[ThreadSetting], paths: Sequence[str] | None = None,
                     tf32: bool = False, fields: dict[str, Any] | None = None) -> list[OrtBackend]:
    """One ``OrtBackend`` per precision variant x run path x thread setting on ``device``; ``fields`` are more
    ``EncoderConfig`` fields for all of them."""
    available = runtime_paths(device)
    chosen = list(available) if paths is None else [p for p in paths if p in available]
    return [OrtBackend(model_dir, model=model, precision=variant, device=device, path=path,
                       config_fields={**available[path], **(fields or {})}, threads=setting, tf32=tf32)
            for variant in variants for path in chosen for setting in threads]
