"""Export faults: killed processes, unwritable paths and failed writes leave no partial OUT_DIR."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deberta_onnx.export import ExportConfig, ExportError, export_model

CLI = [sys.executable, "-m", "deberta_onnx.runtime.cli"]


def _start_export(src: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([*CLI, "export", str(src), str(out), "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_staging(parent: Path, name: str, process: subprocess.Popen[str]) -> Path:
    """Waits (bounded) until the export has created its staging folder, i.e. is mid-way through writing."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        found = [p for p in parent.glob(f".{name}.partial-*") if any(p.iterdir())]
        if found:
            return found[0]
        if process.poll() is not None:
            pytest.fail(f"export ended before it was interrupted: {process.communicate()}")
        time.sleep(0.05)
    process.kill()
    pytest.fail("the export never created its staging folder")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_export_leaves_no_out_dir(tiny_checkpoint: Path, tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "model"
    process = _start_export(tiny_checkpoint, out)
    staging = _wait_for_staging(tmp_path, "model", process)
    process.send_signal(sig)
    process.communicate(timeout=120)
    assert process.returncode != 0
    assert not out.exists()
    if sig == signal.SIGTERM:
        assert not staging.exists()  # cleaned up on the way out
    # A later export succeeds and removes what a killed one left behind.
    export_model(tiny_checkpoint, out, ExportConfig(quiet=True, validation_shapes=((2, 5),)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_permission_error_names_the_path(tiny_checkpoint: Path) -> None:
    # /sys refuses new folders even to root, so this holds on any Linux machine.
    with pytest.raises(ExportError, match=r"cannot write /sys/.*(permission denied|operation not permitted)"):
        export_model(tiny_checkpoint, "/sys/deberta-onnx-test/model", ExportConfig(quiet=True))


def test_failed_write_reports_the_path_and_leaves_nothing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # A file-size limit makes the model write fail part-way, as a full disk would.
    code = textwrap.dedent(
        """
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        from deberta_onnx.runtime.cli import main
        sys.exit(main(["export", sys.argv[1], sys.argv[2], "--quiet"]))
        """
    )
    out = tmp_path / "model"
    result = subprocess.run([sys.executable, "-c", code, str(tiny_checkpoint), str(out)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 1
    assert "error: " in result.stderr and str(tmp_path) in result.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
