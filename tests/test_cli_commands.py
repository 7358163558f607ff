"""The search and classify commands, embed --dimensions, info on every kind of folder, and the export flags."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from deberta_onnx.runtime import Encoder, SequenceClassifier, TokenClassifier, semantic_search
from deberta_onnx.runtime.cli import build_parser, main
from deberta_onnx.runtime.cli.export import config_from_args as _export_config

from .test_cli import _run

COMMANDS = ("export", "embed", "search", "classify", "bench", "info")


def test_help_explains_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    # The entry point itself once, in a process of its own; each command's help from the same parser in-process.
    result = subprocess.run([sys.executable, "-m", "deberta_onnx.runtime.cli", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    for command in COMMANDS:
        assert f"\n    {command} " in result.stdout, command
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args([command, "--help"])
        out = capsys.readouterr().out
        assert exited.value.code == 0 and "usage: deberta-onnx " + command in out
        assert len(out.split("\n\n")[1]) > 60  # a description, not only the usage line


def test_export_flags_map_onto_export_config() -> None:
    args = build_parser().parse_args(["export", "src", "out", "--pooling", "cls", "--normalize",
                                      "--token-embeddings", "--task", "embedding", "--max-length", "128"])
    config = _export_config(args)
    assert (config.pooling, config.normalize, config.token_embeddings, config.task, config.max_length) == (
        "cls", True, True, "embedding", 128)
    triton = _export_config(build_parser().parse_args(["export", "src", "out", "--triton", "--triton-name", "emb",
                                                       "--triton-max-batch-size", "8",
                                                       "--triton-max-queue-delay-us", "250"]))
    assert (triton.triton, triton.triton_name, triton.triton_max_batch_size, triton.triton_max_queue_delay_us) == (
        True, "emb", 8, 250)
    defaults = _export_config(build_parser().parse_args(["export", "src", "out"]))
    # Unset means "the checkpoint's own" (a sentence-transformers Pooling module, a classifier's head).
    assert (defaults.pooling, defaults.normalize, defaults.task, defaults.token_embeddings) == (None, None, None, False)


def test_embed_dimensions(tiny_model: Path, tmp_path: Path) -> None:
    texts = ["alpha beta", "gamma", "delta epsilon zeta"]
    (tmp_path / "in.txt").write_text("\n".join(texts))
    assert main(["embed", str(tiny_model), "--input", str(tmp_path / "in.txt"), "--output",
                 str(tmp_path / "v.npy"), "--normalize", "--dimensions", "8"]) == 0
    expected = Encoder(tiny_model).encode(texts, normalize=True, dimensions=8)
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"), expected, atol=1e-6)
    assert main(["embed", str(tiny_model), "--input", str(tmp_path / "in.txt"), "--output",
                 str(tmp_path / "w.npy"), "--dimensions", "99"]) == 1


def test_search_text_corpus_finds_the_query_itself(tiny_model: Path, corpus: list[str], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    lines = corpus[:40]
    (tmp_path / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    assert main(["search", str(tiny_model), "--corpus", str(tmp_path / "corpus.txt"), "--query", lines[7],
                 "--query", lines[23], "--top-k", "3", "--json"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["query"] for r in results] == [lines[7], lines[23]]
    encoder = Encoder(tiny_model)
    expected = semantic_search(encoder.encode([lines[7], lines[23]]), encoder.encode(lines), top_k=3)
    for result, hits, wanted in zip(results, expected, (7, 23)):
        assert [h["index"] for h in result["hits"]] == [h.index for h in hits]
        assert result["hits"][0]["index"] == wanted and result["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert result["hits"][0]["text"] == lines[wanted]
    # The table form names the query and ranks the hits.
    assert main(["search", str(tiny_model), "--corpus", str(tmp_path / "corpus.txt"), "--query", lines[7]]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == f"query: {lines[7]}" and table[1].strip().startswith("1. 1.0000  [7]") and len(table) == 6


def test_search_npy_corpus_with_texts_and_errors(tiny_model: Path, corpus: list[str], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    lines = corpus[:30]
    (tmp_path / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    (tmp_path / "queries.txt").write_text(f"{lines[3]}\n{lines[11]}\n", encoding="utf-8")
    assert main(["embed", str(tiny_model), "--input", str(tmp_path / "corpus.txt"), "--output",
                 str(tmp_path / "corpus.npy")]) == 0
    assert main(["search", str(tiny_model), "--corpus", str(tmp_path / "corpus.npy"), "--corpus-texts",
                 str(tmp_path / "corpus.txt"), "--queries", str(tmp_path / "queries.txt"), "--json"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["hits"][0]["index"] for r in results] == [3, 11]
    assert [r["hits"][0]["text"] for r in results] == [lines[3], lines[11]]
    # Queries truncated to 8 dimensions cannot search 32-dimensional vectors: a clear error, exit 1.
    assert main(["search", str(tiny_model), "--corpus", str(tmp_path / "corpus.npy"), "--query", "x",
                 "--dimensions", "8"]) == 1
    assert "embed both with the same model (and --dimensions)" in capsys.readouterr().err
    assert main(["search", str(tiny_model), "--corpus", str(tmp_path / "corpus.npy")]) == 1
    assert "no query" in capsys.readouterr().err


def test_search_runs_without_torch(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_text("red apples\ngreen pears\nblue skies\n", encoding="utf-8")
    code = textwrap.dedent(
        """
        import sys
        from deberta_onnx.runtime.cli import main
        code = main(["search", sys.argv[1], "--corpus", sys.argv[2], "--query", "blue skies", "--top-k", "1"])
        print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")))
        sys.exit(code)
        """
    )
    result = _run(code, str(tiny_model), str(tmp_path / "corpus.txt"))
    assert result.returncode == 0, result.stderr
    assert "[2]  blue skies" in result.stdout and "LOADED []" in result.stdout


def test_classify_pairs_and_spans(nli: tuple[Path, Path], ner: tuple[Path, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    pairs = [("A man plays a guitar.", "Someone makes music."), ("It rains.", "The sun is out.")]
    (tmp_path / "pairs.tsv").write_text("\n".join("\t".join(p) for p in pairs), encoding="utf-8")
    assert main(["classify", str(nli[1]), "--input", str(tmp_path / "pairs.tsv"), "--pairs",
                 "--output", str(tmp_path / "out.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    expected = SequenceClassifier(nli[1]).predict(pairs)
    assert [(r["label"], round(r["score"], 5)) for r in rows] == [(p.label, round(p.score, 5)) for p in expected]
    assert all(abs(sum(r["scores"].values()) - 1) < 1e-5 for r in rows)

    texts = ["Ada Lovelace lived in London.", "nothing"]
    (tmp_path / "texts.txt").write_text("\n".join(texts), encoding="utf-8")
    assert main(["classify", str(ner[1]), "--input", str(tmp_path / "texts.txt"), "--aggregation", "simple"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected_spans = TokenClassifier(ner[1]).predict(texts, aggregation="simple")
    assert [r["text"] for r in rows] == texts
    assert [[tuple(s.values()) for s in r["spans"]] for r in rows] == [[tuple(s) for s in spans]
                                                                      for spans in expected_spans]


def test_classify_errors(nli: tuple[Path, Path], ner: tuple[Path, Path], tiny_model: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in.txt").write_text("no tab here\n", encoding="utf-8")
    assert main(["classify", str(nli[1]), "--input", str(tmp_path / "in.txt"), "--pairs"]) == 1
    assert "line 1 has no tab" in capsys.readouterr().err
    assert main(["classify", str(ner[1]), "--input", str(tmp_path / "in.txt"), "--pairs"]) == 1
    assert main(["classify", str(tiny_model), "--input", str(tmp_path / "in.txt")]) == 1
    assert "holds an embedding model; use `deberta-onnx embed`" in capsys.readouterr().err


def test_info_names_task_labels_and_outputs(nli: tuple[Path, Path], tiny_model: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(nli[1])]) == 0
    out = capsys.readouterr().out
    assert "task:       sequence-classification (SequenceClassifier, CrossEncoder, ZeroShotClassifier)" in out
    assert "labels: entailment, neutral, contradiction" in out and "outputs logits ['batch', 3]" in out
    assert main(["info", str(tiny_model)]) == 0
    out = capsys.readouterr().out
    assert "task:       embedding (Encoder)" in out and "sentence_embedding ['batch', 32]" in out


# One text per "\n"-terminated line: every other character str.splitlines() splits on stays inside its text.
_ODD_LINES = ["one\vtwo", "form\ffeed", "file\x1cgroup\x1drecord\x1eunit", "next\x85line", "line\u2028separator",
              "paragraph\u2029separator", "lone\rreturn", "windows", "", "last, without a newline"]
_ODD_FILE = "\n".join(_ODD_LINES[:7]).encode() + b"\nwindows\r\n\r\nlast, without a newline"


def test_embed_reads_one_text_per_newline_from_a_file_and_stdin(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "odd.txt").write_bytes(_ODD_FILE)
    expected = Encoder(tiny_model).encode(_ODD_LINES)
    assert main(["embed", str(tiny_model), "--input", str(tmp_path / "odd.txt"), "--output",
                 str(tmp_path / "file.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "file.npy"), expected, atol=1e-6, rtol=0)
    # stdin through the real command, as bytes: text-mode newline translation would split the lone \r.
    result = subprocess.run([sys.executable, "-m", "deberta_onnx.runtime.cli", "embed", str(tiny_model), "--input",
                             "-", "--output", str(tmp_path / "stdin.npy")], input=_ODD_FILE, capture_output=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "stdin.npy"), expected, atol=1e-6, rtol=0)
    # Not UTF-8: the error names the line.
    (tmp_path / "latin1.txt").write_bytes(b"fine\ncaf\xe9\n")
    result = subprocess.run([sys.executable, "-m", "deberta_onnx.runtime.cli", "embed", str(tiny_model), "--input",
                             str(tmp_path / "latin1.txt"), "--output", str(tmp_path / "x.npy")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "is not UTF-8 text" in result.stderr and "(line 2)" in result.stderr
    assert "Traceback" not in result.stderr


def test_search_and_classify_keep_lines_aligned(tiny_model: Path, ner: tuple[Path, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "odd.txt").write_bytes(_ODD_FILE)
    for index in (3, 6, 9):  # U+0085, the lone \r, the line after a \r\n
        assert main(["search", str(tiny_model), "--corpus", str(tmp_path / "odd.txt"), "--query", _ODD_LINES[index],
                     "--top-k", "1", "--json"]) == 0
        (hit,) = json.loads(capsys.readouterr().out)["hits"]
        assert (hit["index"], hit["text"]) == (index, _ODD_LINES[index])
    assert main(["classify", str(ner[1]), "--input", str(tmp_path / "odd.txt"), "--output",
                 str(tmp_path / "spans.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "spans.jsonl").read_text(encoding="utf-8").split("\n")[:-1]]
    assert [row["text"] for row in rows] == _ODD_LINES


def test_search_prints_corpus_texts_without_terminal_escapes(tiny_model: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # A clear-screen, a recolouring, a C1 control sequence introducer and a right-to-left override: a corpus
    # line could drive the terminal that shows the results.
    hostile = ["\x1b[2J\x1b[31mred\x1b[0m alert", "price \x9b31m tag", "evil\u202etxt.exe", "plain text"]
    (tmp_path / "corpus.txt").write_text("\n".join(hostile) + "\n", encoding="utf-8")
    assert main(["search", str(tiny_model), "--corpus", str(tmp_path / "corpus.txt"), "--query", "\x1b]0;title\x07",
                 "--top-k", "4"]) == 0
    table = capsys.readouterr().out
    assert not any(ch in table for ch in "\x1b\x07\x9b\u202e"), repr(table)
    assert "query: \\x1b]0;title\\x07" in table
    for shown in ("\\x1b[2J\\x1b[31mred\\x1b[0m alert", "price \\x9b31m tag", "evil\\u202etxt.exe", "plain text"):
        assert shown in table
    assert main(["search", str(tiny_model), "--corpus", str(tmp_path / "corpus.txt"), "--query", "red", "--json"]) == 0
    line = capsys.readouterr().out
    assert not any(ch in line for ch in "\x1b\x9b\u202e"), repr(line)
    assert sorted(hit["text"] for hit in json.loads(line)["hits"]) == sorted(hostile)  # the JSON keeps the texts


def test_info_says_whether_the_folder_loads(tiny_model: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tiny_model)]) == 0
    files = len(json.loads((tiny_model / "manifest.json").read_text(encoding="utf-8"))["files"])
    assert f"check:      loads (fp32 on CPUExecutionProvider; the checksums of all {files} files verified)" in (
        capsys.readouterr().out)
    broken = Path(shutil.copytree(tiny_model, tmp_path / "broken"))
    graph = broken / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    # It once printed the usual summary, exit 0, for a folder that cannot load.
    assert main(["info", str(broken)]) == 1
    captured = capsys.readouterr()
    assert "check:" not in captured.out
    assert captured.err.startswith(f"error: {graph} is corrupted or was replaced") and captured.err.count("\n") == 1
    assert main(["info", str(broken), "--no-check"]) == 0  # the manifest alone, when asked for
