"""Writing the results: ``results.json`` (one row per configuration), ``results.md`` and ``throughput.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deberta_onnx.runtime.files import atomic_write

__all__ = ["JSON_FILE", "MARKDOWN_FILE", "PLOT_FILE", "markdown", "plot", "write_reports"]

JSON_FILE = "results.json"
MARKDOWN_FILE = "results.md"
PLOT_FILE = "throughput.png"


def write_reports(document: dict[str, Any], out_dir: Path, *, plot: bool = True) -> list[Path]:
    """Writes the three files into ``out_dir`` (each written beside its name and renamed into place)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_write_text(out_dir / JSON_FILE, json.dumps(document, indent=2, sort_keys=True) + "\n"),
               _write_text(out_dir / MARKDOWN_FILE, markdown(document))]
    if plot:
        written.append(_plot_file(document, out_dir / PLOT_FILE))
    return written


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(document: dict[str, Any]) -> str:
    """The results as markdown: environment, then one table per workload with ratios against PyTorch."""
    env = document["environment"]
    hardware = env["hardware"]
    lines = ["# deberta-onnx benchmark", ""]
    if env.get("random_weights"):
        lines += ["Models with **random weights** (published shapes): right for speed and parity, meaningless as "
                  "embeddings.", ""]
    cores = f"{hardware.get('physical_cores')} physical / {hardware.get('logical_cores')} logical cores"
    load = hardware.get("load_average") or {}
    busy = (f"; 1-min load average {load['start']:.1f} at start, {load['end']:.1f} at end"
            if load.get("start") is not None and load.get("end") is not None else "")
    features = hardware.get("cpu_features")
    isa = f" ({', '.join(features) or 'none of AVX2, AVX-512, VNNI, AMX'})" if features is not None else ""
    lines.append(f"- hardware: {hardware.get('cpu')}{isa}, {cores}, {hardware.get('memory_gb')} GB"
                 + (f"; GPU {hardware['gpu']}" if hardware.get("gpu") else "") + busy)
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    build = env.get("onnxruntime")
    if build:
        lines.append(f"- onnxruntime {build['version']} ({build['device']} build) from `{build['file']}`; providers: "
                     f"{', '.join(build['providers'])}")
    tf32 = env.get("tf32")
    if tf32:
        state = "on (opt-in, `--tf32`)" if tf32["runtime_use_tf32"] else "off (the default)"
        lines.append(f"- TF32 for fp32 matrix products on CUDA: {state}; the runtime's use_tf32 = "
                     f"{int(tf32['runtime_use_tf32'])}, PyTorch's allow_tf32 = {tf32['torch_matmul_allow_tf32']}")
    settings = env["settings"]
    lines.append(f"- threads: {settings.get('threads') or 'library defaults'} "
                 f"(torch uses {settings.get('torch_threads')}); "
                 f"runtime paths offered: {', '.join(settings.get('runtime_paths', []))}")
    if env.get("command"):
        lines.append(f"- command: `{env['command']}`")
    lines.append(f"- run at {env['created_at']}")
    lines += ["", "`x PyTorch`: grid rows, PyTorch's p50 latency over this row's; corpus rows, this row's sentences/s "
              "over PyTorch's (same device; fp16 against PyTorch fp16 where it ran). Parity against PyTorch fp32 on "
              "the same inputs. RSS: peak of the whole process while the row ran (all models stay loaded); load: "
              "what loading this configuration added. GPU MB, per configuration: PyTorch, the peak its allocator "
              "reached during its own calls of this workload; ONNX Runtime, the device memory its session added "
              "at load and at its first calls of each shape so far (its arena keeps what it grew to), measured "
              "while nothing else ran.",
              ""]
    fp16 = any(row.get("vs_pytorch_fp16") is not None for row in document["rows"])
    header = ("| model | workload | configuration | p50 ms | p95 ms | sent/s | x PyTorch "
              + ("| x PyTorch fp16 " if fp16 else "") + "| min cos | max abs diff | RSS MB | load MB | GPU MB |")
    lines += [header, "|" + " --- |" * (13 if fp16 else 12)]
    for row in document["rows"]:
        versus_fp16 = f"{_fmt(row.get('vs_pytorch_fp16'), '.2f')} | " if fp16 else ""
        lines.append(
            f"| {row['model']} | {row['shape']} | {row['label']} | {_fmt(row['p50_ms'], '.2f')} | "
            f"{_fmt(row['p95_ms'], '.2f')} | {_fmt(row['sentences_per_s'], '.1f')} | "
            f"{_fmt(row['vs_pytorch'], '.2f')} | {versus_fp16}{_fmt(row['min_cosine'], '.6f')} | "
            f"{_fmt(row['max_abs_diff'], '.1e')} | "
            f"{_fmt(row['rss_peak_mb'], '.0f')} | {_fmt(row['rss_load_mb'], '.0f')} | {_fmt(row['gpu_mb'], '.0f')} |"
        )
    corpus = next((row["corpus"] for row in document["rows"] if row["workload"] == "corpus"), None)
    if corpus:
        lines += ["", f"Corpus: {corpus['texts']} texts, tokens per text min {corpus['tokens_min']}, median "
                      f"{corpus['tokens_median']:.0f}, p90 {corpus['tokens_p90']:.0f}, max {corpus['tokens_max']} "
                      "(special tokens included); encoded end to end, tokenization included."]
    return "\n".join(lines) + "\n"


def plot(document: dict[str, Any]) -> Any:
    """A matplotlib figure: grid throughput against batch size, one line per configuration, one panel per
    model source and device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [row for row in document["rows"] if row["workload"] == "grid"]
    panels = sorted({(row["source"], row["device"]) for row in grid})
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(6.5 * max(len(panels), 1), 4.8), squeeze=False)
    for ax, (source, device) in zip(axes[0], panels):
        rows = [row for row in grid if row["source"] == source and row["device"] == device]
        for name in dict.fromkeys(f"{row['model']}: {row['label']}" for row in rows):
            points = sorted((row["batch"], row["sentences_per_s"], row["shape"]) for row in rows
                            if f"{row['model']}: {row['label']}" == name)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        for batch, rate, shape in sorted({(r["batch"], r["sentences_per_s"], r["shape"]) for r in rows
                                          if r["engine"] == "pytorch" and r["precision"] == "fp32"}):
            ax.annotate(shape, (batch, rate), textcoords="offset points", xytext=(3, -10), fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size (sequence length as annotated)")
        ax.set_ylabel("sentences / s")
        ax.set_title(f"{source} on {device}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if document["environment"].get("random_weights"):
        fig.suptitle("random weights (speed only)", fontsize=8)
    fig.tight_layout()
    return fig


def _plot_file(document: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure = plot(document)
    try:
        return atomic_write(path, lambda handle: figure.savefig(handle, dpi=120, format="png"))
    finally:
        plt.close(figure)


def _write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
