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


def test_export_passes_the_nncf_sample_count_and_records_it(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The sample count reaches only the NNCF step's child, and WORK/exports.json keeps it beside the outcome; an
    entry another export run wrote meanwhile is kept. The children are real processes that exit at once."""
    import subprocess
    import sys

    commands: list[list[str]] = []
    real_popen = subprocess.Popen

    def child(command: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        commands.append(command)
        (tmp_path / peers.EXPORTS_FILE).write_text('{"onnx-O3": {"status": "written by another run"}}')
        return real_popen([sys.executable, "-c", "pass"])

    monkeypatch.setattr(peers.subprocess, "Popen", child)
    (tmp_path / peers.ST_FOLDER).mkdir()
    status = peers.export_peers(tmp_path, steps=["onnx", "openvino-int8"], memory_cap_gb=14, timeout_s=None,
                                ov_num_samples=32)
    assert [c[3:] for c in commands] == [["onnx", str(tmp_path)], ["openvino-int8", str(tmp_path),
                                                                    "--ov-num-samples", "32"]]
    assert status["openvino-int8"]["status"] == "ok" and status["openvino-int8"]["num_samples"] == 32
    assert "num_samples" not in status["onnx"] and status["onnx-O3"]["status"] == "written by another run"


def test_nncf_sample_count_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        peers.main(["export", str(tmp_path), "--ov-num-samples", "0"])
    assert "expected a positive number of texts, got 0" in capsys.readouterr().err
