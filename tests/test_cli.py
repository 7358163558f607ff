"""The deberta-onnx command, run as a real subprocess, and the runtime's independence from torch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

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
    ])
    captured: list[EncoderConfig] = []
    load(args, lambda folder, config: captured.append(config), "folder")
    assert captured == [EncoderConfig(
        precision="fp32", intra_op_threads=1, inter_op_threads=1, allow_spinning=False, verify_checksums=False,
        device="cpu", io_binding=False, sequence_bucket=8, max_tokens=None, max_buckets=3, cpu_arena="off",
        arena_shrink_tokens=None, max_call_memory_mb=None, cuda_arena_extend_strategy="kSameAsRequested",
        gpu_mem_limit=1024, use_tf32=False,
    )]
