"""benchmarks/peers.py: its argument handling and its table, without sentence-transformers' backends (they live in a
virtual environment of their own; see benchmarks/README.md). No timing asserts."""

from __future__ import annotations

from pathlib import Path

import pytest

from deberta_onnx.benchmarks import peers


def test_run_names_the_missing_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        peers.main(["run", str(tmp_path)])
    assert exc.value.code == 2
    message = capsys.readouterr().err
    assert str(tmp_path / peers.TEXTS_FILE) in message and "deberta-onnx export" in message


def test_unknown_configurations_and_steps_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        peers.main(["run", str(tmp_path), "--ours", "onnxruntime:fp16,auto:int8-static"])
    message = capsys.readouterr().err
    assert "unknown --ours onnxruntime:fp16" in message and "onnxruntime:int8-static" in message
    with pytest.raises(SystemExit):
        peers.main(["export", str(tmp_path), "--steps", "onnx-O4"])
    message = capsys.readouterr().err
    assert "unknown --steps onnx-O4" in message and "openvino-int8" in message
    with pytest.raises(SystemExit):
        peers.main(["export", str(tmp_path)])
    assert "peers.py prepare" in capsys.readouterr().err


def test_table_puts_every_row_against_the_peers_openvino_int8() -> None:
    """Ratios are the peer's time over the row's; a row that could not run keeps its reason and no figures."""
    rows = [
        {"key": "st-ov-int8", "configuration": "st OpenVINO int8 (NNCF static)", "note": "",
         "8x128": {"ms": 500.0}, "corpus": {"ms": 10_000.0, "texts_per_s": 10.0}},
        {"key": "auto:int8-static", "configuration": "ours auto int8-static", "note": "engine openvino",
         "8x128": {"ms": 400.0}, "corpus": {"ms": 8_000.0, "texts_per_s": 12.5},
         "min_cosine": {"corpus": 0.99971, "32x512": 0.9996}},
        {"key": "st-ort-O3", "configuration": "st ONNX Runtime O3", "note": "onnx-O3: stopped at 14 GB RSS"},
    ]
    lines = peers.markdown({"rows": rows}).splitlines()
    assert lines[0].startswith("| configuration | 8x128 (x st OV int8) | corpus (x st OV int8) |")
    assert "| ours auto int8-static | 400.0 ms (1.25x) | 12.50 texts/s (1.25x) | 0.99971 / 0.99960 |" in lines[3]
    assert lines[4] == "| st ONNX Runtime O3 |  |  |  | onnx-O3: stopped at 14 GB RSS |"
