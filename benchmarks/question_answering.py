"""``QuestionAnswerer`` against the PyTorch code of transformers 4.x's question-answering pipeline, on the same
questions and contexts, in one run.

    python benchmarks/question_answering.py                           # random deberta-v3-xsmall, 2 threads
    python benchmarks/question_answering.py --shape deberta-v3-base --threads 4

A random-weight checkpoint of the shape gets a question-answering head, is exported (fp32), and both sides answer
the same questions: a short context, a paragraph, and a context of several 384-token windows. The PyTorch side is
what the pipeline runs (transformers 5 removed it): the fast tokenizer's overflowing windows, one model call per
window (the pipeline's default), the span selection on the logits. Both sides' answers must agree. Reports the
time per round of all questions, the ratio, the CPU and its vector extensions. Compare ratios, not times.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from deberta_onnx.benchmarks.environment import cpu_features, cpu_name
from deberta_onnx.benchmarks.timing import time_calls
from deberta_onnx.runtime import EncoderConfig, QuestionAnswerer
from deberta_onnx.runtime.question_answering import Window, pick_answers


def _inputs() -> list[tuple[str, str]]:
    from deberta_onnx.export.testing import shipped_sentences

    sentences = shipped_sentences()
    return [("What does it say?", sentences[3]), ("Who did it, and when?", " ".join(sentences[10:16])),
            ("Where is the answer in the long one?", " ".join(sentences[40:120]))]


def _checkpoint(shape: str, scratch: Path) -> Path:
    """A random ``shape`` encoder under a question-answering head, saved with its tokenizer."""
    from deberta_onnx.export.testing import add_question_answering_head, random_source

    return add_question_answering_head(random_source(f"random:{shape}", scratch), scratch / "qa")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="deberta-v3-xsmall", help="random checkpoint shape (default xsmall)")
    parser.add_argument("--threads", type=int, default=2, help="threads for both sides (default 2)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds per side (default 10)")
    parser.add_argument("--output", default=None, help="also write the result as JSON here")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from deberta_onnx.export import ExportConfig, export_model

    torch.set_num_threads(args.threads)
    pairs = _inputs()
    with tempfile.TemporaryDirectory(prefix="deberta-onnx-qa-") as scratch:
        print(f"building a random {args.shape} question-answering checkpoint and exporting it", file=sys.stderr)
        src = _checkpoint(args.shape, Path(scratch))
        # Validation on two shapes only: the export's own tests cover the grid; here it would take minutes.
        export_model(src, Path(scratch) / "model", ExportConfig(quiet=True, tokenizer="transformers",
                                                                validation_shapes=((1, 64), (2, 384))))
        answerer = QuestionAnswerer(Path(scratch) / "model", config=EncoderConfig(intra_op_threads=args.threads))
        tokenizer = AutoTokenizer.from_pretrained(src)
        model = AutoModelForQuestionAnswering.from_pretrained(src).eval()
        options = answerer.options()

        def pytorch() -> list[Any]:
            found = []
            for question, context in pairs:
                encoded = tokenizer(question, context, truncation="only_second", max_length=options.max_seq_len,
                                    stride=options.doc_stride, return_overflowing_tokens=True,
                                    return_offsets_mapping=True)
                windows = []
                for number, ids in enumerate(encoded["input_ids"]):
                    with torch.no_grad():
                        output = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                                                              dtype=torch.long))
                    windows.append(Window(output.start_logits[0].numpy(), output.end_logits[0].numpy(),
                                          encoded.encodings[number]))
                found.append(pick_answers(context, windows, cls_id=answerer.cls_id, options=options)[0])
            return found

        def onnx() -> Any:
            return answerer.answer([q for q, _ in pairs], [c for _, c in pairs])

        print(f"timing {args.repeats} rounds of {len(pairs)} questions on each side", file=sys.stderr)
        same = [(a["start"], a["end"]) for a in pytorch()] == [(a["start"], a["end"]) for a in onnx()]
        windows = sum(len(answerer.windows(q, c)) for q, c in pairs)
        timed = {"pytorch": time_calls(pytorch, sentences=len(pairs), warmup=2, repeats=args.repeats),
                 "deberta-onnx": time_calls(onnx, sentences=len(pairs), warmup=2, repeats=args.repeats)}
    result = {"shape": args.shape, "threads": args.threads, "questions": len(pairs), "windows": windows,
              "same_answers": same, "cpu": cpu_name(), "cpu_features": cpu_features(),
              "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
              "ms_per_round": {name: round(t["mean_ms"], 1) for name, t in timed.items()},
              "speedup": round(timed["pytorch"]["mean_ms"] / timed["deberta-onnx"]["mean_ms"], 2)}
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
