"""Lower-precision variants beside the fp32 graph, each built by a recipe and checked by the quality gate."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch

from deberta_onnx.runtime.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    MODEL_FILE,
    PRECISIONS,
    TASK_EMBEDDING,
    TOKENIZER_FILE,
    variant_file,
)
from deberta_onnx.runtime.files import text_lines
from deberta_onnx.runtime.tokenization import TextTokenizer

from .._errors import ExportError, QualityGateError
from .._sentences import shipped_sentences
from ._activations import ActivationStats, collect_activation_stats
from ._fp16 import build_fp16
from ._int8 import build_int8, int8_source, int8_units
from ._onnx_edit import prepare_base
from ._quality import (
    BATCH_INVARIANCE,
    ExampleFeed,
    HeldOut,
    Readout,
    format_quality,
    gate_failure,
    gate_feeds,
    gate_readout,
    held_out_set,
    measure,
    split_sentences,
)
from ._range_audit import audit_fp16_range
from ._recipes import RECIPES, Recipe
from ._sensitivity import PROBE_TEXTS, probe_set, rank_matmuls, search_fp32_matmuls

if TYPE_CHECKING:  # config.py reads RECIPES from this package: a run-time import would be a cycle
    from ..config import ExportConfig

__all__ = ["build_variant", "derive_variants", "read_calibration", "recipe_chain"]


def read_calibration(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file, one calibration text each (split as ``files.text_lines`` does).

    Raises:
        ValueError: the file is missing, unreadable, or has no text.
    """
    source = Path(path)
    try:
        lines = [line for line in text_lines(source.read_bytes().decode("utf-8")) if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"calibration file {source} cannot be read ({exc}); give a UTF-8 text file with one "
                         "sentence per line.") from exc
    if not lines:
        raise ValueError(f"calibration file {source} has no text; give one sentence per line (a few hundred "
                         "sentences like the ones you will embed).")
    return lines


def build_variant(recipe: Recipe, base_path: Path, out_path: Path, *,
                  calibration: Sequence[dict[str, np.ndarray]] = (), stats: ActivationStats | None = None,
                  keep_fp32: Collection[str] = (), fp16_keep: Collection[str] = ()) -> dict[str, Any]:
    """Builds ``recipe``'s graph from the folded fp32 graph at ``base_path`` and writes it to ``out_path``.

    Args:
        recipe: what to build (see ``RECIPES``).
        base_path: the fp32 graph after ``prepare_base``.
        out_path: where to write the new graph (``FILE.data`` beside it when over 2 GB).
        calibration: int8-static only: the inputs (one feed per text) whose activation ranges fix the scales.
        stats: the fp32 graph's tensors on the calibration texts: the int8 outlier split and the fp16 range
            audit read them (without them, neither runs).
        keep_fp32: int8: weight MatMuls to leave in fp32 (the mixed recipe's choice).
        fp16_keep: fp16 only: nodes that stay fp32 whatever the recipe.

    Returns:
        A summary of the graph's nodes by precision, for the manifest; fp16 with the range audit's record
        under ``range_audit``.
    """
    if recipe.precision == "fp16":
        audit = None
        if recipe.fp16_range_audit and stats is not None:
            audit = audit_fp16_range(onnx.load(str(base_path), load_external_data=False), stats)
        keep = {*fp16_keep, *(audit.keep if audit is not None else ())}
        nodes = build_fp16(recipe, base_path, out_path, keep_nodes=keep)
        if audit is not None:
            nodes["range_audit"] = audit.to_manifest()
        return nodes
    return build_int8(recipe, base_path, out_path, calibration=calibration, stats=stats, keep_fp32=keep_fp32)


def derive_variants(
    module: torch.nn.Module,
    folder: Path,
    config: ExportConfig,
    scratch: Path,
    *,
    max_length: int,
    pad_id: int,
    say: Callable[[str], None],
) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """Builds every precision of ``config.precisions`` other than fp32 from ``folder/model.onnx``.

    The fp32 graph first runs on the calibration texts (``ActivationStats``: what the int8 outlier split and the
    fp16 range audit read). Each precision is then measured against the fp32 PyTorch ``module`` on the
    held-out sentences (unless ``config.validate`` is false) and must reach its threshold; with
    ``config.fallback``, a failing recipe gives way to the next, safer one.

    Returns:
        ``(fp32 quality report or None, {precision: manifest entry})``.

    Raises:
        QualityGateError: a precision fails the gate with every recipe tried.
    """
    derived = [name for name in PRECISIONS[1:] if name in config.precisions]
    if not derived:
        return None, {}
    tokenizer = TextTokenizer(folder / TOKENIZER_FILE, max_length=max_length, pad_id=pad_id)
    default_calibration, held_texts = split_sentences(shipped_sentences())
    fp32_path = folder / MODEL_FILE
    held = fp32_report = None
    base_bytes = sum(p.stat().st_size for p in folder.glob(f"{MODEL_FILE}*"))
    # What the graph takes and gives: an embedding graph's sentence vectors, or another task's outputs (Readout;
    # a sequence classifier's depends on how many labels it has).
    task = str(getattr(module, "task", TASK_EMBEDDING))
    readout = gate_readout(task, labels=int(getattr(module, "labels", 0)))
    inputs = tuple(spec.name for spec in getattr(module, "inputs", ())) or (INPUT_IDS, ATTENTION_MASK)
    example_feed = getattr(module, "example_feed", None)
    if config.validate:
        what = "held-out sentences" if task == TASK_EMBEDDING else f"{task} inputs made of held-out sentences"
        say(f"quality gate: {len(held_texts)} {what} against the fp32 PyTorch reference")
        held = held_out_set(module, tokenizer, held_texts, readout=readout, inputs=inputs)
        fp32_report = measure(fp32_path, held)
        say(format_quality("fp32", "reference", fp32_report, base_bytes))
    base = prepare_base(fp32_path, scratch / "folded.onnx")
    texts = read_calibration(config.calibration) if config.calibration else default_calibration
    # One text per feed (a single segment), made into the graph's feed by its example_feed where it has one.
    feeds = [dict(zip(inputs, feed)) for feed in gate_feeds(tokenizer, texts, inputs, example_feed)[0]]
    calibration = {
        "source": str(config.calibration) if config.calibration else "shipped sentences not held out",
        "texts": len(texts),
        "sha256": hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest(),
        "method": "minmax",
    }
    say(f"activation ranges: the fp32 graph on {len(texts)} calibration texts")
    weights = int8_units(onnx.load(str(base), load_external_data=False))[0]
    matmul_inputs = {node.input[0] for node in onnx.load(str(base), load_external_data=False).graph.node
                     if node.name in set(weights)}
    stats = collect_activation_stats(base, feeds, channels_of=matmul_inputs)
    search = _Search(base=base, folder=folder, config=config, held=held, feeds=feeds, stats=stats,
                     probe_texts=texts[:PROBE_TEXTS], tokenizer=tokenizer, base_bytes=base_bytes, say=say,
                     readout=readout, inputs=inputs, example_feed=example_feed)
    entries: dict[str, dict[str, Any]] = {}
    for precision in derived:
        entry = search.derive(precision)
        entry["calibration"] = calibration if precision != "fp16" else {
            key: calibration[key] for key in ("source", "texts", "sha256")}
        entries[precision] = entry
    return fp32_report, entries


@dataclass
class _Search:
    """Builds one precision by its recipes in turn, each judged by the quality gate, until one passes."""

    base: Path
    folder: Path
    config: ExportConfig
    held: HeldOut | None
    feeds: list[dict[str, np.ndarray]]
    stats: ActivationStats
    probe_texts: list[str]
    tokenizer: TextTokenizer
    base_bytes: int
    say: Callable[[str], None]
    readout: Readout
    inputs: tuple[str, ...] = (INPUT_IDS, ATTENTION_MASK)
    example_feed: ExampleFeed | None = None
    _probes: HeldOut | None = None

    def derive(self, precision: str) -> dict[str, Any]:
        config, say = self.config, self.say
        threshold = config.min_cosine_fp16 if precision == "fp16" else config.min_cosine_int8
        invariance = BATCH_INVARIANCE if precision == "int8-static" else None
        chain = recipe_chain(precision, config)
        recipes = chain if config.fallback else chain[:1]
        path = self.folder / variant_file(precision)
        reports: list[dict[str, Any]] = []
        failure: str | None = None
        for number, recipe in enumerate(recipes):
            say(f"building {precision} ({recipe.name}: {recipe.description})")
            tried: list[dict[str, Any]] = []
            nodes = self._build(recipe, path, threshold, invariance, tried) if recipe.mixed else build_variant(
                recipe, self.base, path, calibration=self.feeds, stats=self.stats)
            if nodes is None:
                best = max(tried, key=lambda t: t["min_cosine"])
                failure = (f"with up to {tried[-1]['fp32_matmuls']} weight MatMuls in fp32 the best min cosine on "
                           f"{len(self.probe_texts)} calibration texts was {best['min_cosine']:.8f} "
                           f"({best['fp32_matmuls']} in fp32) < {threshold:.8f}")
                reports.append({"recipe": recipe.name, "min_cosine": best["min_cosine"],
                                "batch_invariance": best["batch_invariance"], "passed": False, "search": tried})
            elif self.held is None:
                return _entry(precision, recipe, path, nodes, None, reports)
            else:
                report = measure(path, self.held)
                failure = gate_failure(report, threshold, invariance)
                report.update(recipe=recipe.name, threshold=threshold, passed=failure is None)
                if invariance is not None:
                    report["batch_invariance_required"] = invariance
                reports.append(report)
                say(format_quality(precision, recipe.name, report, self.base_bytes))
                if failure is None:
                    if number:
                        failed = ", ".join(repr(r.name) for r in recipes[:number])
                        say(f"{precision}: fell back to recipe {recipe.name!r} after {failed} failed the quality gate")
                    return _entry(precision, recipe, path, nodes, report, reports[:-1])
            for stale in self.folder.glob(f"{path.name}*"):
                stale.unlink()
            if number + 1 < len(recipes):
                say(f"{precision}: recipe {recipe.name!r} failed the quality gate ({failure}); "
                    f"trying {recipes[number + 1].name!r}")
        raise QualityGateError(_gate_message(precision, failure or "", recipes, chain), precision, reports)

    def _build(self, recipe: Recipe, path: Path, threshold: float, invariance: float | None,
               tried: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The mixed recipe: ranks the weight MatMuls by their int8 error, then keeps the fewest in fp32 that
        pass the gate's test on calibration texts (each graph tried is appended to ``tried``)."""
        source = onnx.load(str(self.base))
        matmuls = int8_source(source, recipe, self.stats, ())[0]
        ranking = rank_matmuls(source, matmuls, self.feeds[:PROBE_TEXTS],
                               per_text_scale=recipe.precision == "int8-dynamic")
        self.say(f"  ranked {len(ranking)} weight MatMuls by int8 error; largest: " + ", ".join(
            f"{name} {error:.3f}" for name, error in ranking[:3]))

        def build(keep: list[str]) -> dict[str, Any]:
            return build_variant(recipe, self.base, path, calibration=self.feeds, stats=self.stats, keep_fp32=keep)

        if self._probes is None:
            self._probes = probe_set(self.base, self.tokenizer, self.probe_texts, readout=self.readout,
                                     inputs=self.inputs, example_feed=self.example_feed)
        probes = self._probes

        def test() -> tuple[str | None, dict[str, Any]]:
            # Calibration texts first (cheap to fail); a graph that passes them must pass the held-out gate too.
            report = measure(path, probes)
            why = gate_failure(report, threshold, invariance)
            if why is None and self.held is not None:
                held = measure(path, self.held)
                why = gate_failure(held, threshold, invariance)
                if why is not None:
                    why = f"passed on the calibration texts, not on the held-out ones: {why}"
            return why, report

        nodes, probes_tried = search_fp32_matmuls(ranking, build, test, self.say)
        tried += probes_tried
        if nodes is not None:
            nodes["sensitivity"] = {"ranking": [{"matmul": name, "int8_error": round(error, 6)}
                                                for name, error in ranking], "tried": probes_tried}
        return nodes


def recipe_chain(precision: str, config: ExportConfig) -> tuple[Recipe, ...]:
    """The recipe the config asks for, then the safer ones (the order ``--fallback`` tries them in)."""
    recipes = RECIPES[precision]
    first = config.fp16_recipe if precision == "fp16" else recipes[0].name
    return recipes[[recipe.name for recipe in recipes].index(first):]


def _gate_message(precision: str, failure: str, tried: tuple[Recipe, ...], chain: tuple[Recipe, ...]) -> str:
    flag = "--min-cosine-fp16 (min_cosine_fp16)" if precision == "fp16" else "--min-cosine-int8 (min_cosine_int8)"
    safer = [recipe.name for recipe in chain[len(tried):]]
    hints = [f"drop --no-fallback (fallback=True) to try the safer recipe(s) {', '.join(safer)}"] if safer else []
    hints += [f"lower the threshold with {flag}", f"or leave {precision} out"]
    recipes = ", ".join(recipe.name for recipe in tried)
    return (f"{precision} failed the quality gate against the fp32 PyTorch reference (recipe(s) tried: {recipes}): "
            f"{failure}. To go on: {'; '.join(hints)}. Nothing was written.")


def _entry(precision: str, recipe: Recipe, path: Path, nodes: dict[str, Any], report: dict[str, Any] | None,
           rejected: list[dict[str, Any]]) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(f"building {precision} wrote no {path.name}; this is a bug in deberta-onnx: please "
                          "report it.")
    audit = nodes.pop("range_audit", None)
    return {
        "file": path.name,
        "extra_files": sorted(p.name for p in path.parent.glob(f"{path.name}.data")),
        "precision": precision,
        "recipe": recipe.name,
        "recipe_description": recipe.description,
        "nodes": nodes,
        "quality": report,
        "rejected_recipes": [{key: r[key] for key in ("recipe", "min_cosine", "batch_invariance")} for r in rejected],
        **({"range_audit": audit} if audit is not None else {}),
    }
