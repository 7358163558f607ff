"""A real server process for tests and load tests: ``ServerProcess`` runs `deberta-onnx serve` in a subprocess
on a free loopback port, and ``decode_embeddings`` reads an embeddings response back into an array.

Needs httpx (in the ``dev`` extra) besides the ``server`` extra; never torch, so the server tests and the load
benchmark (``benchmarks/load.py``) share it without importing the benchmarks package.
"""

from __future__ import annotations

import base64
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

__all__ = ["ServerProcess", "decode_embeddings"]

_READY = re.compile(r"on http://(127\.0\.0\.1):(\d+)")


class ServerProcess:
    """`deberta-onnx serve MODEL_DIR --host 127.0.0.1 --port 0 FLAGS...` in a subprocess; a context manager.

    ``url`` is set once the server printed its address and ``GET /health`` answers 200. ``model_dir`` may be a
    list of folders, served by one process.
    """

    def __init__(self, model_dir: str | Path | Sequence[str | Path], *flags: str, start_timeout_s: float = 120.0,
                 launcher: Sequence[str] = (sys.executable, "-m", "deberta_onnx.runtime.cli")) -> None:
        dirs = [model_dir] if isinstance(model_dir, (str, Path)) else list(model_dir)
        self.model_dirs = [Path(d) for d in dirs]
        self.model_dir = self.model_dirs[0]
        self.flags = list(flags)
        self.launcher = list(launcher)  # what runs `deberta-onnx` with the arguments that follow
        self.start_timeout_s = start_timeout_s
        self.url = ""
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - open while the server runs; closed in stop()
            prefix="deberta-onnx-serve-", suffix=".log", delete=False)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> str:
        """What the server wrote to stdout and stderr so far."""
        return Path(self._log.name).read_text(encoding="utf-8", errors="replace")

    def start(self) -> ServerProcess:
        command = [*self.launcher, "serve", *map(str, self.model_dirs),
                   "--host", "127.0.0.1", "--port", "0", *self.flags]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout_s
        while not self.url:
            match = _READY.search(self.log)
            if match:
                self.url = f"http://{match.group(1)}:{match.group(2)}"
                break
            self._check_alive(deadline)
            time.sleep(0.05)
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            self._check_alive(deadline)
            time.sleep(0.05)

    def _check_alive(self, deadline: float) -> None:
        if self.process is None:
            raise RuntimeError("the server was not started; call start() first")
        if self.process.poll() is not None:
            raise RuntimeError(f"the server exited with code {self.process.returncode}:\n{self.log}")
        if time.monotonic() > deadline:
            self.stop()
            raise TimeoutError(f"the server did not become ready in {self.start_timeout_s} s:\n{self.log}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        """Sends ``sig`` (SIGTERM: graceful) and waits; kills it if it has not exited by ``timeout_s``."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)


def decode_embeddings(body: dict[str, Any]) -> np.ndarray:
    """The ``data[*].embedding`` of a response as a ``[n, dims]`` float32 array, from float lists or base64."""
    rows = []
    for position, item in enumerate(body["data"]):
        if item["index"] != position:
            raise ValueError(f"data[{position}] has index {item['index']}")
        value = item["embedding"]
        if isinstance(value, str):
            rows.append(np.frombuffer(base64.b64decode(value), dtype="<f4"))
        else:
            rows.append(np.asarray(value, dtype=np.float32))
    return np.stack(rows)
