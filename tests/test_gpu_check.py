"""``benchmarks/gpu_check.sh``, the one command for a GPU machine: the parts that run without one. Where there is
no GPU it must stop cleanly with a message that says why; bad wheel parts must stop it before anything runs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def _check(*args: str | Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    # The providers step's own limit (20 s) is for a GPU machine at rest; importing torch on a loaded 2-core
    # machine can take longer, and the test is about what the script says, not how fast it imports.
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_PROVIDERS_S": "240"}
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_the_script_parses_and_wants_an_output_folder() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    result = _check()
    assert result.returncode == 2 and "usage: bash benchmarks/gpu_check.sh OUT_DIR [WHEEL_PARTS_DIR]" in result.stderr


def test_without_a_gpu_it_stops_cleanly_and_says_why(tmp_path: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("the CUDA provider is installed here: the script would run the whole check")
    out = tmp_path / "out"
    result = _check(out)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no usable GPU on this machine" in result.stdout
    log = (out / "gpu_check.log").read_text()
    assert "providers: " in log and f"onnxruntime {ort.__version__}" in log
    assert "NO USABLE GPU HERE: this onnxruntime has no CUDAExecutionProvider" in log
    # Nothing else ran: no test, export or benchmark log, no results.
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log"]


def test_bad_wheel_parts_stop_it_before_anything_runs(tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    parts.mkdir()
    result = _check(tmp_path / "out", parts)
    assert result.returncode == 2 and "must hold the wheel's parts (part_*) and its NAME and SHA256" in result.stdout
    wheel = b"not really a wheel, " * 1000
    (parts / "part_00").write_bytes(wheel[:5000])
    (parts / "part_01").write_bytes(wheel[5000:])
    (parts / "NAME").write_text("onnxruntime_gpu-0-cp312-cp312-linux_x86_64.whl\n")
    (parts / "SHA256").write_text(hashlib.sha256(b"another file").hexdigest() + "\n")
    result = _check(tmp_path / "out", parts)
    assert result.returncode == 2 and "does not match its SHA256" in result.stdout
    (parts / "SHA256").write_text(hashlib.sha256(wheel).hexdigest() + "\n")  # whole again, but not a wheel
    result = _check(tmp_path / "out", parts)
    assert result.returncode == 2 and "could not install" in result.stdout
    assert not (tmp_path / "out" / "tests.log").exists()
