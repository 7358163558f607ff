"""The task classes against the transformers / PyTorch code they replace, on the same inputs, in one run:
``ZeroShotClassifier`` vs ``pipeline("zero-shot-classification")``, ``MultipleChoice`` vs
``DebertaV2ForMultipleChoice`` + softmax, ``FillMask`` vs ``pipeline("fill-mask")``.

    python benchmarks/tasks.py                                   # deberta-v3-xsmall shape, random weights, 2 threads
    python benchmarks/tasks.py --shape tiny --threads 1 --output tasks.json

Each head is built on a random-weight checkpoint of the shape (heads re-drawn at random too), exported fp32 with
transformers' tokenizer, and both sides answer the same texts with the same thread count; answers are checked to
agree before anything is timed. Reports seconds per call (p50), the ratio, the CPU and its vector extensions, and
versions. Absolute times depend on what else the machine runs; compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deberta_onnx.benchmarks.environment import cpu_features, cpu_name
from deberta_onnx.benchmarks.timing import time_calls

_TINY = {"vocab_size": 2000, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 64, "max_position_embeddings": 512, "relative_attention": True, "position_buckets": 8,
         "max_relative_positions": -1, "pos_att_type": ["p2c", "c2p"], "share_att_key": True,
         "norm_rel_ebd": "layer_norm", "position_biased_input": False, "type_vocab_size": 0}
_TOKENIZER_FILES = ("spm.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_NLI = ["entailment", "neutral", "contradiction"]
_LABELS = ["travel", "cooking", "sports", "finance"]


def _head(encoder: Path, out: Path, kind: str) -> Path:
    """``encoder``'s weights under a random head of ``kind`` (AutoModelFor... name), with its tokenizer."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(encoder, legacy=False,
                                                     id2label=dict(enumerate(_NLI)),
                                                     label2id={label: i for i, label in enumerate(_NLI)})
    torch.manual_seed(0)
    model = getattr(transformers, kind)(config).eval()
    model.deberta.load_state_dict(transformers.AutoModel.from_pretrained(encoder).state_dict())
    model.save_pretrained(out)
    for name in _TOKENIZER_FILES:
        shutil.copy(encoder / name, out / name)
    return out


def _export(src: Path, out: Path) -> Path:
    from deberta_onnx.export import ExportConfig, export_model

    export_model(src, out, ExportConfig(quiet=True, tokenizer="transformers", validation_shapes=((2, 16), (3, 64))))
    return out


def _agree(same: bool, what: str) -> None:
    if not same:
        raise RuntimeError(f"deberta-onnx and transformers disagree on the {what}; timings would compare different "
                           "work")


def _compare(name: str, ours: Callable[[], Any], theirs: Callable[[], Any], items: int, repeats: int
             ) -> dict[str, Any]:
    ours_time = time_calls(ours, sentences=items, warmup=1, repeats=repeats)
    theirs_time = time_calls(theirs, sentences=items, warmup=1, repeats=repeats)
    row = {"task": name, "items": items, "deberta_onnx_p50_s": ours_time["p50_ms"] / 1e3,
           "transformers_p50_s": theirs_time["p50_ms"] / 1e3,
           "speedup": theirs_time["p50_ms"] / ours_time["p50_ms"]}
    print(f"{name:<16} {items:>4} items  deberta-onnx {row['deberta_onnx_p50_s']:.3f} s  transformers "
          f"{row['transformers_p50_s']:.3f} s  {row['speedup']:.2f}x", flush=True)
    return row


def _zero_shot(encoder: Path, root: Path, config: Any, texts: list[str], repeats: int) -> dict[str, Any]:
    from transformers import pipeline

    from deberta_onnx.runtime import ZeroShotClassifier

    src = _head(encoder, root / "nli", "DebertaV2ForSequenceClassification")
    zero_shot = ZeroShotClassifier(_export(src, root / "nli-onnx"), config=config)
    pipe = pipeline("zero-shot-classification", model=str(src), device="cpu")
    ours, theirs = zero_shot.predict(texts, _LABELS), pipe(texts, _LABELS)
    _agree([r.labels for r in ours] == [r["labels"] for r in theirs], "zero-shot labels")
    return _compare("zero-shot", lambda: zero_shot.predict(texts, _LABELS), lambda: pipe(texts, _LABELS), len(texts),
                    repeats)


def _multiple_choice(encoder: Path, root: Path, config: Any, questions: list[tuple[str, list[str]]], repeats: int
                     ) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForMultipleChoice, AutoTokenizer

    from deberta_onnx.runtime import MultipleChoice

    src = _head(encoder, root / "mc", "DebertaV2ForMultipleChoice")
    chooser = MultipleChoice(_export(src, root / "mc-onnx"), config=config)
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForMultipleChoice.from_pretrained(src).eval()
    choices = len(questions[0][1])

    def pytorch_choices() -> np.ndarray:
        encoded = tokenizer([p for p, offered in questions for _ in offered],
                            [c for _, offered in questions for c in offered], padding=True, truncation=True,
                            return_tensors="pt")
        with torch.no_grad():
            logits = model(**{k: v.view(len(questions), choices, -1) for k, v in encoded.items()}).logits
        return logits.softmax(-1).numpy()

    _agree(np.allclose([r.scores for r in chooser.predict(questions)], pytorch_choices(), atol=1e-4, rtol=0),
           "multiple-choice scores")
    return _compare("multiple-choice", lambda: chooser.predict(questions), pytorch_choices, len(questions), repeats)


def _fill_mask(encoder: Path, root: Path, config: Any, masked: list[str], repeats: int) -> list[dict[str, Any]]:
    from transformers import pipeline

    from deberta_onnx.runtime import FillMask

    src = _head(encoder, root / "mlm", "DebertaV2ForMaskedLM")
    unmasker = FillMask(_export(src, root / "mlm-onnx"), config=config)
    fill = pipeline("fill-mask", model=str(src), device="cpu")
    _agree([[c["token"] for c in r] for r in unmasker(masked)] == [[c["token"] for c in r] for r in fill(masked)],
           "fill-mask tokens")
    return [_compare("fill-mask", lambda: unmasker(masked), lambda: fill(masked), len(masked), repeats),
            _compare("fill-mask (pipeline batch_size=8)", lambda: unmasker(masked),
                     lambda: fill(masked, batch_size=8), len(masked), repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="deberta-v3-xsmall", help="random checkpoint shape, or 'tiny'")
    parser.add_argument("--threads", type=int, default=2, help="threads on both sides (default 2)")
    parser.add_argument("--texts", type=int, default=16, help="texts / questions per call (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per side (default 5)")
    parser.add_argument("--tasks", default="zero-shot,multiple-choice,fill-mask",
                        help="comma-separated: which of zero-shot, multiple-choice, fill-mask to run (default all)")
    parser.add_argument("--output", default=None, help="also write the result as JSON here")
    args = parser.parse_args()
    tasks = set(args.tasks.split(","))

    import onnxruntime
    import torch
    import transformers

    from deberta_onnx.export.testing import build_random_checkpoint, shipped_sentences
    from deberta_onnx.runtime import EncoderConfig

    torch.set_num_threads(args.threads)
    config = EncoderConfig(precision="fp32", intra_op_threads=args.threads)
    sentences = shipped_sentences()
    texts = sentences[: args.texts]
    masked = [" ".join(w if i != min(3, len(s.split()) - 1) else "[MASK]" for i, w in enumerate(s.split()))
              for s in sentences[: args.texts]]
    questions = [(sentences[i], sentences[100 + 4 * i : 104 + 4 * i]) for i in range(args.texts)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="deberta-onnx-tasks-") as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = Path(scratch)
        encoder = build_random_checkpoint(_TINY if args.shape == "tiny" else args.shape, root / "encoder",
                                          texts=sentences, seed=1)
        transformers.logging.set_verbosity_error()

        if "zero-shot" in tasks:
            rows.append(_zero_shot(encoder, root, config, texts, args.repeats))
        if "multiple-choice" in tasks:
            rows.append(_multiple_choice(encoder, root, config, questions, args.repeats))
        if "fill-mask" in tasks:
            rows += _fill_mask(encoder, root, config, masked, args.repeats)

    document = {"cpu": cpu_name(), "extensions": cpu_features(), "threads": args.threads, "shape": args.shape,
                "load_average": os.getloadavg()[0],
                "random_weights": True, "versions": {"torch": torch.__version__,
                                                     "transformers": transformers.__version__,
                                                     "onnxruntime": onnxruntime.__version__},
                "results": rows}
    print(f"{document['cpu']} ({', '.join(document['extensions'])}), {args.threads} threads, {args.shape}")
    if args.output:
        Path(args.output).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
