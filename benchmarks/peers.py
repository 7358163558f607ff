"""sentence-transformers' OpenVINO and ONNX backends beside this runtime's best configurations, on one checkpoint.

Three steps in two virtual environments (benchmarks/README.md, "The peer: sentence-transformers"), all files
under one WORK folder:

    # the project's .venv (export extra): the checkpoint, wrapped as a sentence-transformers folder; the texts
    python benchmarks/peers.py prepare random:deberta-v3-base WORK
    deberta-onnx export WORK/st WORK/ours --precision fp32,int8-static
    # .venv-peer (sentence-transformers 5.x with its onnx and openvino extras, this runtime without the export extra)
    python benchmarks/peers.py export WORK
    python benchmarks/peers.py run WORK --threads 2 --out WORK/peers.json

``export`` makes sentence-transformers' own files with its own functions: the ONNX export and its
``export_dynamic_quantized_onnx_model`` (qint8, avx512_vnni) and ``export_optimized_onnx_model`` (O3); the OpenVINO
export and its ``export_static_quantized_openvino_model`` (NNCF static int8, calibrated on the shipped sentences
instead of its default hub dataset). Each runs in a child process under a memory cap; one that fails or is stopped
becomes a row that says so. ``run`` loads every configuration in one process, 2 threads each, and times them
interleaved, call by call, round by round: one model call on ready ids per grid shape (``workloads.grid_batch``,
half the rows padded; the peer through its module stack's ``forward``, this runtime through its runner, both
with pooling), the corpus end to end (``encode``, batches of 32, tokenization included), and 32 texts of 512 tokens
end to end (each side's own batching: sentence-transformers one batch of 32, this runtime its token budget).
Quality: per text min cosine to PyTorch fp32 (sentence-transformers' torch backend) on the corpus and the long
texts.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deberta_onnx.benchmarks.environment import cpu_features, cpu_name, load_average
from deberta_onnx.benchmarks.timing import Timer
from deberta_onnx.benchmarks.workloads import grid_batch, parse_shapes

__all__ = ["OURS", "PEERS", "PEER_EXPORTS", "main"]

ST_FOLDER = "st"
OURS_FOLDER = "ours"
TEXTS_FILE = "texts.json"
CALIBRATION_FOLDER = "calibration"
EXPORTS_FILE = "exports.json"
LONG_TOKENS = 512
LONG_LABEL = f"32x{LONG_TOKENS}"

# sentence-transformers' files, as its export functions name them (relative to the st folder).
PEER_EXPORTS: dict[str, str] = {
    "onnx": "onnx/model.onnx",
    "onnx-qint8": "onnx/model_qint8_avx512_vnni.onnx",
    "onnx-O3": "onnx/model_O3.onnx",
    "openvino": "openvino/openvino_model.xml",
    "openvino-int8": "openvino/openvino_model_qint8_quantized.xml",
}
# The peer's configurations: key -> (row label, backend, export step, extra OpenVINO properties).
PEERS: dict[str, tuple[str, str, str | None, dict[str, str]]] = {
    "pytorch": ("PyTorch fp32 eager (sentence-transformers' torch backend)", "torch", None, {}),
    "st-ov-int8": ("st OpenVINO int8 (NNCF static)", "openvino", "openvino-int8", {}),
    "st-ort-qint8": ("st ONNX Runtime qint8 (avx512_vnni)", "onnx", "onnx-qint8", {}),
    "st-ort-O3": ("st ONNX Runtime O3", "onnx", "onnx-O3", {}),
    "st-ov": ("st OpenVINO default (bf16 where the CPU has it)", "openvino", "openvino", {}),
    "st-ov-f32": ("st OpenVINO f32 forced", "openvino", "openvino", {"INFERENCE_PRECISION_HINT": "f32"}),
}
# This runtime's configurations, ENGINE:PRECISION.
OURS = ("auto:int8-static", "onnxruntime:int8-static", "openvino:int8-static", "onnxruntime:fp32", "openvino:bf16",
        "auto:fp32")
REFERENCE = "pytorch"
PEER_TARGET = "st-ov-int8"


# -- prepare (the project's .venv) -----------------------------------------------------------------------------

def prepare(source: str, work: Path, *, corpus_size: int) -> None:
    """Writes WORK/st (a random checkpoint with sentence-transformers' module files: mean pooling, 512 tokens),
    WORK/texts.json (the corpus and the long texts) and WORK/calibration/train.jsonl (the shipped sentences that
    this project's int8-static export calibrates on by default, so that both int8 exports see the same texts)."""
    from deberta_onnx.benchmarks.workloads import build_corpus, token_lengths
    from deberta_onnx.export.precision._quality import split_sentences
    from deberta_onnx.export.testing import RANDOM_PREFIX, build_random_checkpoint, shipped_sentences

    if not source.startswith(RANDOM_PREFIX):
        raise SystemExit(f"prepare takes a random:SHAPE source (e.g. random:deberta-v3-base), got {source!r}")
    st = work / ST_FOLDER
    if st.exists():
        raise SystemExit(f"{st} exists already: remove WORK or give another folder")
    build_random_checkpoint(source[len(RANDOM_PREFIX):], st)
    hidden = json.loads((st / "config.json").read_text())["hidden_size"]
    # The older layout (pooling flags, sentence_bert_config.json), which sentence-transformers 5 and 6 and this
    # project's export all read.
    files = {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ],
        "sentence_bert_config.json": {"max_seq_length": LONG_TOKENS, "do_lower_case": False},
        "1_Pooling/config.json": {
            "word_embedding_dimension": hidden, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, "include_prompt": True,
        },
    }
    for name, content in files.items():
        (st / name).parent.mkdir(parents=True, exist_ok=True)
        (st / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    sentences = shipped_sentences()
    tokenizer = st / "tokenizer.json"
    corpus = build_corpus(sentences, tokenizer, size=corpus_size, max_tokens=268, seed=0)
    # 32 texts of more than 512 tokens (both sides cut them at 512): runs of consecutive sentences.
    long: list[str] = []
    start = 0
    while len(long) < 32:
        run: list[str] = []
        while not run or token_lengths(tokenizer, [" ".join(run)])[0] <= LONG_TOKENS + 16:
            run.append(sentences[start % len(sentences)])
            start += 1
        long.append(" ".join(run))
    (work / TEXTS_FILE).write_text(json.dumps({"corpus": corpus, "long": long}, ensure_ascii=False, indent=1))
    (work / CALIBRATION_FOLDER).mkdir()
    with open(work / CALIBRATION_FOLDER / "train.jsonl", "w", encoding="utf-8") as handle:
        for sentence in split_sentences(sentences)[0]:
            handle.write(json.dumps({"sentence": sentence}, ensure_ascii=False) + "\n")
    print(f"wrote {st}, {work / TEXTS_FILE} ({len(corpus)} corpus texts, {len(long)} long texts) and "
          f"{work / CALIBRATION_FOLDER}; next: deberta-onnx export {st} {work / OURS_FOLDER} "
          f"--precision fp32,int8-static")


# -- export (.venv-peer): sentence-transformers' own files ------------------------------------------------------

def _export_step(step: str, work: Path, *, ov_num_samples: int | None = None) -> None:
    """One of sentence-transformers' exports, in this (child) process. ``ov_num_samples``: the NNCF int8 export's
    ``OVQuantizationConfig(num_samples=...)`` (None: sentence-transformers' default config, which calibrates on 128
    texts)."""
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model
    from sentence_transformers.backend import export_optimized_onnx_model, export_static_quantized_openvino_model

    st = str(work / ST_FOLDER)
    backend: Any = "onnx" if step.startswith("onnx") else "openvino"
    model = SentenceTransformer(st, backend=backend, device="cpu")
    if step in ("onnx", "openvino"):
        # Loading a folder without the backend's file exported it; write only that file (into st/onnx or
        # st/openvino), not sentence-transformers' rewrite of the folder's other files.
        model[0].auto_model._save_pretrained(st)  # type: ignore[union-attr, operator]
    elif step == "onnx-qint8":
        export_dynamic_quantized_onnx_model(model, "avx512_vnni", st)
    elif step == "onnx-O3":
        export_optimized_onnx_model(model, "O3", st)
    elif step == "openvino-int8":
        # Its default calibration set is a hub dataset (glue/sst2); here the same local sentences as this
        # project's int8-static calibration, through the same function. Each text is padded to 384 tokens and
        # every calibration text runs through the whole model once per `If` node (12 in optimum's DeBERTa-v2
        # export) besides the statistics passes, so the sample count sets the export's time.
        from optimum.intel import OVQuantizationConfig

        config = None if ov_num_samples is None else OVQuantizationConfig(num_samples=ov_num_samples)
        export_static_quantized_openvino_model(model, config, st, dataset_name=str(work / CALIBRATION_FOLDER),
                                               dataset_config_name="default", dataset_split="train",
                                               column_name="sentence")
    else:
        raise SystemExit(f"unknown export step {step!r}; choose one of {', '.join(PEER_EXPORTS)}")


def _tree_rss(process: Any) -> int:
    import psutil

    total = 0
    for item in [process, *process.children(recursive=True)]:
        try:
            total += item.memory_info().rss
        except psutil.Error:
            continue
    return total


def export_peers(work: Path, *, steps: Sequence[str], memory_cap_gb: float, timeout_s: float | None,
                 ov_num_samples: int | None = None) -> dict[str, Any]:
    """Runs each missing export step in a child process, stopped when its memory passes ``memory_cap_gb`` or it
    runs past ``timeout_s``; records status, seconds and peak RSS of each in WORK/exports.json (re-read before each
    write, so that export runs of different steps side by side keep each other's entries)."""
    import psutil

    status_file = work / EXPORTS_FILE
    status: dict[str, Any] = json.loads(status_file.read_text()) if status_file.exists() else {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for step in steps:
        if (work / ST_FOLDER / PEER_EXPORTS[step]).exists():
            status.setdefault(step, {"status": "ok"})
            continue
        start = time.perf_counter()
        samples = ["--ov-num-samples", str(ov_num_samples)] if step == "openvino-int8" and ov_num_samples else []
        child = subprocess.Popen([sys.executable, __file__, "_export-step", step, str(work), *samples], env=env)
        process = psutil.Process(child.pid)
        peak, stopped = 0, ""
        while child.poll() is None:
            peak = max(peak, _tree_rss(process))
            if peak > memory_cap_gb * 2**30:
                stopped = f"stopped at {memory_cap_gb:g} GB RSS (the cap; this machine has 24 GB)"
            elif timeout_s is not None and time.perf_counter() - start > timeout_s:
                stopped = f"stopped after {timeout_s:g} s (the time limit), unfinished"
            if stopped:
                for item in [*process.children(recursive=True), process]:
                    item.kill()
                child.wait()
            time.sleep(0.5)
        seconds = round(time.perf_counter() - start, 1)
        if stopped:
            outcome = stopped
        elif child.returncode == -15:
            outcome = "stopped (SIGTERM), unfinished"
        elif child.returncode == -9:
            outcome = "killed (SIGKILL: the kernel's OOM killer, most likely)"
        elif child.returncode:
            outcome = f"failed (exit {child.returncode}; its error is above)"
        else:
            outcome = "ok"
        entry: dict[str, Any] = {"status": outcome, "seconds": seconds, "peak_rss_gb": round(peak / 2**30, 2)}
        if step == "openvino-int8":
            entry["num_samples"] = ov_num_samples or "default (128)"
        print(f"export {step}: {outcome}, {seconds} s, peak RSS {peak / 2**30:.1f} GB", flush=True)
        status = {**(json.loads(status_file.read_text()) if status_file.exists() else {}), **status, step: entry}
        status_file.write_text(json.dumps(status, indent=2))
    return status


# -- run (.venv-peer): the comparison ---------------------------------------------------------------------------

@dataclass
class _Config:
    """One configuration: how to run one grid call on ids, how to encode texts, or why it cannot run."""

    key: str
    label: str
    call: Callable[[np.ndarray, np.ndarray], Any]
    encode: Callable[[list[str]], np.ndarray]
    note: str = ""
    available: bool = True
    timers: dict[str, Timer] = field(default_factory=dict)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)


def _unavailable(*_args: Any) -> Any:
    raise RuntimeError("this configuration could not be made; its note says why")


def _peer(key: str, work: Path, threads: int, exports: dict[str, Any]) -> _Config:
    import torch
    from sentence_transformers import SentenceTransformer

    label, backend, step, properties = PEERS[key]
    backend_name: Any = backend
    kwargs: dict[str, Any] = {}
    if step is not None:
        path = work / ST_FOLDER / PEER_EXPORTS[step]
        if not path.exists():
            outcome = exports.get(step, {}).get("status", "not exported (run `peers.py export WORK`)")
            return _Config(key, label, _unavailable, _unavailable, note=f"{step}: {outcome}", available=False)
        kwargs["file_name"] = PEER_EXPORTS[step]
    if backend == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        kwargs.update(provider="CPUExecutionProvider", session_options=options)
    elif backend == "openvino":
        kwargs["ov_config"] = {"INFERENCE_NUM_THREADS": str(threads), **properties}
    model = SentenceTransformer(str(work / ST_FOLDER), backend=backend_name, device="cpu", model_kwargs=kwargs)

    def call(ids: np.ndarray, mask: np.ndarray) -> Any:
        features = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                    "token_type_ids": torch.zeros_like(torch.from_numpy(ids))}
        with torch.inference_mode():
            return model(features)["sentence_embedding"]

    def encode(texts: list[str]) -> np.ndarray:
        return np.asarray(model.encode(texts, batch_size=32, convert_to_numpy=True))

    note = ""
    if backend == "openvino":
        compiled: Any = model[0].auto_model.request  # type: ignore[union-attr]
        if hasattr(compiled, "get_compiled_model"):  # an InferRequest in some optimum-intel versions
            compiled = compiled.get_compiled_model()
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        note = f"OpenVINO INFERENCE_PRECISION_HINT {getattr(hint, 'get_type_name', lambda: hint)()}"
        if step == "openvino-int8" and "num_samples" in exports.get(step, {}):
            note += f"; NNCF calibration on {exports[step]['num_samples']} texts"
    return _Config(key, label, call=call, encode=encode, note=note)


def _ours(key: str, work: Path, threads: int) -> _Config:
    from deberta_onnx.runtime import Encoder, EncoderConfig

    engine, _, precision = key.partition(":")
    encoder = Encoder(str(work / OURS_FOLDER), config=EncoderConfig(
        engine=engine, precision=precision, intra_op_threads=threads, verify_checksums=False))
    note = f"engine {encoder.engine}" + (f" ({encoder.engine_reason})" if engine == "auto" else "")
    label = f"ours {'auto' if engine == 'auto' else encoder.engine} {precision}"
    return _Config(key, label, call=encoder.loaded.runner.run,
                   encode=lambda texts: encoder.encode(texts, batch_size=32), note=note)


def _time(config: _Config, label: str, fn: Callable[[], Any], texts: int) -> None:
    config.timers.setdefault(label, Timer()).call(fn, texts)


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def run(work: Path, *, threads: int, shapes: str, rounds: int, calls: int, long_rounds: int, peers: Sequence[str],
        ours: Sequence[str], out: Path | None) -> dict[str, Any]:
    """Loads every configuration, times them interleaved and returns (and writes to ``out``) the document."""
    import torch

    torch.set_num_threads(threads)
    texts = json.loads((work / TEXTS_FILE).read_text(encoding="utf-8"))
    corpus, long = texts["corpus"], texts["long"]
    exports = json.loads((work / EXPORTS_FILE).read_text()) if (work / EXPORTS_FILE).exists() else {}
    loads = [load_average()]
    configs: list[_Config] = []
    for key in peers:
        configs.append(_peer(key, work, threads, exports))
    for key in ours:
        configs.append(_ours(key, work, threads))
    runnable = [c for c in configs if c.available]
    manifest = json.loads((work / OURS_FOLDER / "manifest.json").read_text())
    model = manifest["model"]
    grid = {str(s): grid_batch(s, vocab=model["vocab_size"], pad_id=model["pad_token_id"])
            for s in parse_shapes(shapes)}
    # Warm-up: every grid shape once; the corpus and the long texts once, their vectors kept for quality.
    for config in runnable:
        for ids, mask in grid.values():
            config.call(ids, mask)
        config.vectors["corpus"] = config.encode(corpus)
        if long_rounds:
            config.vectors[LONG_LABEL] = config.encode(long)
        print(f"warmed up: {config.label}", flush=True)
    loads.append(load_average())
    for index in range(max(rounds, long_rounds)):
        order = runnable[index % len(runnable):] + runnable[:index % len(runnable)]
        if index < rounds:
            for label, (ids, mask) in grid.items():
                for _ in range(calls):
                    for config in order:
                        _time(config, label, functools.partial(config.call, ids, mask), len(ids))
            for config in order:
                _time(config, "corpus", functools.partial(config.encode, corpus), len(corpus))
        if index < long_rounds:
            for config in order:
                _time(config, LONG_LABEL, functools.partial(config.encode, long), len(long))
        loads.append(load_average())
        print(f"round {index + 1} done, load average {loads[-1]}", flush=True)
    rows = []
    reference = next((c for c in runnable if c.key == REFERENCE), None)
    for config in configs:
        row: dict[str, Any] = {"key": config.key, "configuration": config.label, "note": config.note}
        for label, timer in config.timers.items():
            seconds = timer.samples.seconds
            # Grid: the median call; corpus and long texts: the best pass (one or two per round).
            value = statistics.median(seconds) if label in grid else min(seconds)
            row[label] = {"ms": value * 1000, "calls": len(seconds)}
            if label not in grid:
                row[label]["texts_per_s"] = len(corpus if label == "corpus" else long) / value
        if reference is not None and config.vectors:
            row["min_cosine"] = {name: float(_row_cosine(vectors, reference.vectors[name]).min())
                                 for name, vectors in config.vectors.items()}
        rows.append(row)
    document = {
        "cpu": cpu_name(), "extensions": cpu_features(), "threads": threads, "rounds": rounds, "calls": calls,
        "long_rounds": long_rounds, "corpus_texts": len(corpus), "long_texts": len(long),
        "load_average_1min": loads, "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "versions": _versions(), "exports": exports, "rows": rows,
    }
    text = json.dumps(document, indent=2)
    if out is not None:
        out.write_text(text)
    print(markdown(document))
    return document


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in ("sentence-transformers", "transformers", "torch", "optimum", "optimum-onnx", "optimum-intel",
                 "nncf", "openvino", "onnxruntime", "deberta-onnx"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def markdown(document: dict[str, Any]) -> str:
    """The document's rows as a markdown table, with each time's ratio to the peer's OpenVINO int8 row."""
    labels: list[str] = []
    for row in document["rows"]:
        labels += [key for key in row if key not in labels and isinstance(row[key], dict) and "ms" in row[key]]
    target: dict[str, Any] = next((row for row in document["rows"] if row["key"] == PEER_TARGET), {})
    head = ["configuration", *(f"{label} (x st OV int8)" for label in labels), "min cosine (corpus / 32x512)", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in document["rows"]:
        cells = [row["configuration"]]
        for label in labels:
            if label not in row:
                cells.append("")
                continue
            ms = row[label]["ms"]
            per_s = row[label].get("texts_per_s")
            shown = f"{ms:,.1f} ms" if per_s is None else f"{per_s:.2f} texts/s"
            ratio = f" ({target[label]['ms'] / ms:.2f}x)" if label in target else ""
            cells.append(shown + ratio)
        cosine = row.get("min_cosine", {})
        cells.append(" / ".join(f"{cosine[k]:.5f}" for k in ("corpus", LONG_LABEL) if k in cosine))
        cells.append(row["note"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of texts, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="(the project's .venv) the checkpoint as a sentence-transformers "
                                            "folder, and the texts")
    p.add_argument("source", help="random:SHAPE, e.g. random:deberta-v3-base")
    p.add_argument("work", type=Path)
    p.add_argument("--corpus", type=int, default=100, help="texts in the corpus")
    p = commands.add_parser("export", help="(.venv-peer) sentence-transformers' ONNX and OpenVINO files")
    p.add_argument("work", type=Path)
    p.add_argument("--steps", default=",".join(PEER_EXPORTS))
    p.add_argument("--memory-cap-gb", type=float, default=14.0,
                   help="stop an export step whose processes pass this RSS, and record it as such")
    p.add_argument("--timeout-s", type=float, help="stop an export step that runs longer, and record it as such")
    p.add_argument("--ov-num-samples", type=_positive, metavar="N",
                   help="openvino-int8: calibrate on N texts, OVQuantizationConfig(num_samples=N) (default: "
                        "sentence-transformers' default config, 128 texts)")
    p = commands.add_parser("_export-step")
    p.add_argument("step")
    p.add_argument("work", type=Path)
    p.add_argument("--ov-num-samples", type=_positive)
    p = commands.add_parser("run", help="(.venv-peer) the comparison, in one process")
    p.add_argument("work", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", default="1x32,8x128", help="grid shapes, one model call each on ready ids")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the grid and the corpus")
    p.add_argument("--calls", type=int, default=3, help="timed calls per grid shape and round")
    p.add_argument("--long-rounds", type=int, default=1, help=f"timed passes of {LONG_LABEL} (0: skip it)")
    p.add_argument("--peers", default=",".join(PEERS), help="the peer's configurations, comma-separated")
    p.add_argument("--ours", default=",".join(OURS), help="this runtime's, ENGINE:PRECISION, comma-separated")
    p.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.source, args.work, corpus_size=args.corpus)
    elif args.command == "_export-step":
        _export_step(args.step, args.work, ov_num_samples=args.ov_num_samples)
    elif args.command == "export":
        steps = [s for s in args.steps.split(",") if s]
        unknown = sorted(set(steps) - set(PEER_EXPORTS))
        if unknown:
            parser.error(f"unknown --steps {', '.join(unknown)}; choose from {', '.join(PEER_EXPORTS)}")
        if not (args.work / ST_FOLDER).is_dir():
            parser.error(f"{args.work / ST_FOLDER} is missing: run `peers.py prepare SOURCE {args.work}` first")
        export_peers(args.work, steps=steps, memory_cap_gb=args.memory_cap_gb, timeout_s=args.timeout_s,
                     ov_num_samples=args.ov_num_samples)
    else:
        chosen = {"peers": [s for s in args.peers.split(",") if s], "ours": [s for s in args.ours.split(",") if s]}
        for name, known in (("peers", tuple(PEERS)), ("ours", OURS)):
            unknown = sorted(set(chosen[name]) - set(known))
            if unknown:
                parser.error(f"unknown --{name} {', '.join(unknown)}; choose from {', '.join(known)}")
        for needed in (TEXTS_FILE, ST_FOLDER, f"{OURS_FOLDER}/manifest.json"):
            if not (args.work / needed).exists():
                parser.error(f"{args.work / needed} is missing: run the prepare step and `deberta-onnx export "
                             f"{args.work / ST_FOLDER} {args.work / OURS_FOLDER} --precision fp32,int8-static` first")
        run(args.work, threads=args.threads, shapes=args.shapes, rounds=args.rounds, calls=args.calls,
            long_rounds=args.long_rounds, peers=chosen["peers"], ours=chosen["ours"], out=args.out)


if __name__ == "__main__":
    main()
