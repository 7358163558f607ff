"""The deberta-onnx command, run as a real subprocess, and the runtime's independence from torch."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from deberta_onnx.runtime import Encoder

# Makes `import torch` / `import transformers` fail in the child, as on a machine without the export extra.
BLOCK_TORCH = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(f"blocked: {name}")
            return None
    sys.meta_path.insert(0, _Block())
    """
)


def _run(code: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code, *args], input=stdin, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_runtime_imports_and_embeds_without_torch(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "vectors.npy"
    code = textwrap.dedent(
        """
        import sys
        import deberta_onnx.runtime
        from deberta_onnx.runtime.cli import main
        code = main(["embed", sys.argv[1], "--input", "-", "--output", sys.argv[2]])
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
        print("LOADED", loaded)
        sys.exit(code)
        """
    )
    texts = ["first line", "second, longer line with more words", "", "ünïcödé 😀"]
    result = _run(code, str(tiny_model), str(out), stdin="\n".join(texts) + "\n")
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout
    vectors = np.load(out)
    np.testing.assert_allclose(vectors, Encoder(tiny_model).encode(texts), atol=1e-6, rtol=0)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by others, as any file the user writes


def test_export_without_torch_names_the_extra(tmp_path: Path) -> None:
    code = ("import sys\nfrom deberta_onnx.runtime.cli import main\n"
            "sys.exit(main(['export', 'random:deberta-v3-xsmall', sys.argv[1]]))")
    result = _run(code, str(tmp_path / "out"))
    assert result.returncode == 3
    assert "pip install 'deberta-onnx[export]'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_console_script_embed_from_file(tiny_model: Path, tmp_path: Path) -> None:
    texts = ["alpha", "beta gamma", "delta " * 40]
    (tmp_path / "in.txt").write_text("\n".join(texts), encoding="utf-8")
    exe = Path(sys.executable).with_name("deberta-onnx")
    result = subprocess.run([str(exe), "embed", str(tiny_model), "--input", str(tmp_path / "in.txt"), "--output",
                             str(tmp_path / "out.npy"), "--normalize"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    vectors = np.load(tmp_path / "out.npy")
    np.testing.assert_allclose(vectors, Encoder(tiny_model).encode(texts, normalize=True), atol=1e-6, rtol=0)


def test_embed_missing_input_is_a_clear_error(tiny_model: Path, tmp_path: Path) -> None:
    from deberta_onnx.runtime.cli import main

    assert main(["embed", str(tiny_model), "--input", str(tmp_path / "missing.txt"), "--output",
                 str(tmp_path / "o.npy")]) == 1
    assert not (tmp_path / "o.npy").exists()


def test_info_describes_the_folder(tiny_model: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from deberta_onnx.runtime.cli import main

    assert main(["info", str(tiny_model)]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "fp32" in out and "hidden:     32" in out
    assert "speed-ups:  optimised (2 attention layers folded; fused " in out


def test_help_lists_commands() -> None:
    result = subprocess.run([sys.executable, "-m", "deberta_onnx.runtime.cli", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    for command in ("export", "embed", "bench", "info"):
        assert command in result.stdout


def test_runtime_never_imports_ray(tiny_model: Path, tmp_path: Path) -> None:
    """The runtime, the server modules and the CLI work with ray blocked; the ray package names its extra."""
    code = textwrap.dedent("""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "ray":
                    raise ImportError(f"blocked: {name}")
        sys.meta_path.insert(0, _Block())
        import deberta_onnx.runtime
        import deberta_onnx.runtime.server.app, deberta_onnx.runtime.server.metrics
        import deberta_onnx.runtime.server.rerank_api, deberta_onnx.runtime.server.classify_api
        import deberta_onnx.runtime.server.budget
        from deberta_onnx.runtime.cli import main
        code = main(["embed", sys.argv[1], "--input", "-", "--output", sys.argv[2]])
        print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] == "ray"))
        try:
            import deberta_onnx.runtime.ray
        except ImportError as exc:
            print("REFUSED", exc)
        sys.exit(code)
    """)
    result = subprocess.run([sys.executable, "-c", code, str(tiny_model), str(tmp_path / "v.npy")], input="a\nb\n",
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout
    assert "REFUSED" in result.stdout and "pip install 'deberta-onnx[ray]'" in result.stdout


def test_every_encoder_config_field_has_a_load_flag() -> None:
    import argparse
    import dataclasses

    from deberta_onnx.runtime.cli.common import add_load_flags, load
    from deberta_onnx.runtime.config import EncoderConfig

    parser = argparse.ArgumentParser()
    add_load_flags(parser)
    assert vars(parser.parse_args([])) == {f.name: f.default for f in dataclasses.fields(EncoderConfig)}
    args = parser.parse_args([
        "--precision", "fp32", "--threads", "1", "--inter-op-threads", "1", "--no-allow-spinning", "--no-verify",
        "--device", "cpu", "--no-io-binding", "--sequence-bucket", "8", "--max-tokens", "none", "--max-buckets", "3",
        "--cpu-arena", "off", "--arena-shrink-tokens", "none", "--max-call-memory-mb", "none",
        "--cuda-arena-extend-strategy", "kSameAsRequested", "--gpu-mem-limit", "1024", "--no-tf32",
        "--engine", "openvino", "--engine-cache-dir", "none",
    ])
    captured: list[EncoderConfig] = []
    load(args, lambda folder, config: captured.append(config), "folder")
    assert captured == [EncoderConfig(
        precision="fp32", intra_op_threads=1, inter_op_threads=1, allow_spinning=False, verify_checksums=False,
        device="cpu", io_binding=False, sequence_bucket=8, max_tokens=None, max_buckets=3, cpu_arena="off",
        arena_shrink_tokens=None, max_call_memory_mb=None, cuda_arena_extend_strategy="kSameAsRequested",
        gpu_mem_limit=1024, use_tf32=False, engine="openvino", engine_cache_dir=None,
    )]


# --- --output: written through, kept, streamed or refused before the work; stdin; threads; Ctrl+C ---------------


def _embed(tiny_model: Path, tmp_path: Path, output: Path | str, *extra: str) -> int:
    from deberta_onnx.runtime.cli import main

    (tmp_path / "in.txt").write_text("a text\nanother one\n", encoding="utf-8")
    return main(["embed", str(tiny_model), "--input", str(tmp_path / "in.txt"), "--output", str(output), *extra])


def test_output_symlinks_are_written_through_and_modes_kept(tiny_model: Path, tmp_path: Path) -> None:
    expected = Encoder(tiny_model).encode(["a text", "another one"])
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "vectors.npy").write_bytes(b"old")
    link = tmp_path / "link.npy"
    link.symlink_to(shared / "vectors.npy")
    private = tmp_path / "private.npy"
    private.write_bytes(b"old")
    private.chmod(0o600)
    assert _embed(tiny_model, tmp_path, link) == 0
    assert link.is_symlink() and link.resolve() == shared / "vectors.npy"  # the link stays, its target is written
    np.testing.assert_allclose(np.load(shared / "vectors.npy"), expected, atol=1e-6, rtol=0)
    assert _embed(tiny_model, tmp_path, private) == 0
    assert private.stat().st_mode & 0o777 == 0o600  # was 0644 after a rewrite
    np.testing.assert_allclose(np.load(private), expected, atol=1e-6, rtol=0)
    assert sorted(p.name for p in shared.iterdir()) == ["vectors.npy"]  # no temporary file left beside it


def test_output_fifos_and_devices_are_streamed_to_not_replaced(tiny_model: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import stat
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    try:
        code = _embed(tiny_model, tmp_path, fifo)
    finally:  # a reader whose writer never came would block forever: one writer's open and close ends its read
        if reader.is_alive():
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert code == 0
    reader.join(timeout=120)
    assert stat.S_ISFIFO(fifo.stat().st_mode)  # was replaced by a regular file
    vectors = np.load(io.BytesIO(received[0]))
    np.testing.assert_allclose(vectors, Encoder(tiny_model).encode(["a text", "another one"]), atol=1e-6, rtol=0)
    # A device like /dev/full (a node of the same device here, not the machine's own): its error, and the node kept.
    full = tmp_path / "full"
    try:
        os.mknod(full, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    except PermissionError:
        pytest.skip("making a device node needs root")
    capsys.readouterr()
    assert _embed(tiny_model, tmp_path, full) == 1
    assert capsys.readouterr().err == f"error: cannot write {full}: No space left on device\n"
    assert stat.S_ISCHR(full.stat().st_mode)


def test_output_to_dev_stdout_writes_into_the_file_the_shell_opened(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("a text\nanother one\n", encoding="utf-8")
    with open(tmp_path / "redirected.npy", "wb") as stdout:  # `... --output /dev/stdout > redirected.npy`
        result = subprocess.run([sys.executable, "-m", "deberta_onnx.runtime.cli", "embed", str(tiny_model),
                                 "--input", str(tmp_path / "in.txt"), "--output", "/dev/stdout"], stdout=stdout,
                                stderr=subprocess.PIPE, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "redirected.npy"), Encoder(tiny_model).encode(
        ["a text", "another one"]), atol=1e-6, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "redirected.npy"]


def test_an_output_that_cannot_be_written_is_refused_before_the_work(tiny_model: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from deberta_onnx.runtime.cli import main

    folder = tmp_path / "out"
    folder.mkdir()
    # The model folder does not exist: an error about the output, not the model, shows the check came first.
    for command in (["embed", str(tmp_path / "no-model"), "--input", "-"], ["classify", str(tmp_path / "no-model"),
                                                                            "--input", "-"]):
        assert main([*command, "--output", str(folder)]) == 1
        assert capsys.readouterr().err == (f"error: --output {folder} is a folder; give a file path (e.g. "
                                           f"{folder / 'out'})\n")
    assert list(folder.iterdir()) == []


def test_embed_with_stdin_closed_is_one_error_line(tiny_model: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "deberta_onnx.runtime.cli", "embed", str(tiny_model), "--input",
                             "-", "--output", str(tmp_path / "v.npy")], capture_output=True, text=True, timeout=300,
                            preexec_fn=lambda: os.close(0))
    assert result.returncode == 1
    assert result.stderr == "error: cannot read texts from stdin (-): it is closed; pipe the texts in, or give a file\n"


def test_thread_counts_are_bounded_by_the_cores(tiny_model: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from deberta_onnx.runtime import EncoderConfig
    from deberta_onnx.runtime.cli import build_parser
    from deberta_onnx.runtime.config import MAX_THREADS_PER_CORE, max_threads

    limit = max_threads()
    assert limit == MAX_THREADS_PER_CORE * (os.cpu_count() or 1)
    for field in ("intra_op_threads", "inter_op_threads"):
        with pytest.raises(ValueError, match=rf"{field} is {limit + 1}, more than this machine can use: at most "
                                             rf"{limit}"):
            EncoderConfig(**{field: limit + 1})
        EncoderConfig(**{field: limit})
    # 100,000 threads once grew a process to 16 GB: the command refuses, for embed and for serve alike.
    with pytest.raises(SystemExit) as exited:
        _embed(tiny_model, tmp_path, tmp_path / "v.npy", "--threads", "100000")
    assert exited.value.code == 2 and not (tmp_path / "v.npy").exists()
    assert f"--threads is 100000, more than this machine can use: at most {limit}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser("serve").parse_args(["serve", str(tiny_model), "--threads", str(limit + 1)])
    assert "more than this machine can use" in capsys.readouterr().err
    # Ray sets its actors' threads through EncoderConfig, so the same bound holds there.
    pytest.importorskip("ray")
    from deberta_onnx.runtime.ray.data import _settings

    with pytest.raises(ValueError, match="intra_op_threads is"):
        _settings(limit + 1, None, False, None, None)


# Stops the process (SIGSTOP, by itself) when it first imports `module` (argv[1]), so that the test can interrupt
# it there, during start-up; then runs the command (the rest of argv).
_STOP_AT_IMPORT = textwrap.dedent(
    """
    import os, signal, sys
    module = sys.argv.pop(1)
    class _Stop:
        def find_spec(self, name, path=None, target=None):
            if name == module:
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signal.SIGSTOP)
            return None
    sys.meta_path.insert(0, _Stop())
    """
)


def wait_until_stopped(process: subprocess.Popen[str], where: str) -> subprocess.Popen[str]:
    """Waits (bounded) until ``process`` has stopped itself (SIGSTOP) at ``where``; fails the test if it ends or
    never stops."""
    stat = Path(f"/proc/{process.pid}/stat")
    deadline = time.monotonic() + 300
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "T":  # T: stopped
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the process did not stop at {where}: {process.communicate()}")
        time.sleep(0.05)
    return process


def _stopped(code: str, *args: str) -> subprocess.Popen[str]:
    # Python's own SIGINT handler first: a shell that starts a run in the background without job control ignores
    # SIGINT, the children inherit that, and Python then leaves it ignored.
    restore = "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
    process = subprocess.Popen([sys.executable, "-c", restore + _STOP_AT_IMPORT + code, *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return wait_until_stopped(process, f"the import of {args[0]}")


def test_main_gives_the_callers_sigterm_handler_back(tmp_path: Path) -> None:
    # Called in-process (a test, a script), main once left its SIGTERM handler installed: `timeout` could then no
    # longer stop that process.
    from deberta_onnx.runtime.cli import main

    before = signal.getsignal(signal.SIGTERM)
    assert main(["info", str(tmp_path / "missing")]) == 1
    assert signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_while_the_runtime_imports_is_one_line(tmp_path: Path) -> None:
    # The console script's own code: its import of the entry point loads nothing heavy, so that numpy, ONNX
    # Runtime and tokenizers load inside main's error handling. Interrupted there, it once printed a traceback.
    code = "from deberta_onnx.runtime.cli import main\nsys.exit(main())\n"
    process = _stopped(code, "numpy", "info", str(tmp_path / "missing"))
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=300)
    assert (process.returncode, stderr) == (130, "interrupted\n")


def test_ctrl_c_during_start_up_is_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # `export` imports torch while it builds its flags (seconds): interrupted there, it once printed a traceback.
    code = "from deberta_onnx.runtime.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    process = _stopped(code, "torch", "export", str(tiny_checkpoint), str(tmp_path / "model"))
    process.send_signal(signal.SIGINT)  # pending until it runs again, inside the import
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=300)
    assert (process.returncode, stderr) == (130, "interrupted\n")
    assert not (tmp_path / "model").exists()
