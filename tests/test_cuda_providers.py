"""Execution providers: a CUDA request without the GPU package, a silent fallback to the CPU, the CUDA provider's
options from ``EncoderConfig`` and the CLI, and which load failure is which named error."""

from __future__ import annotations

import importlib.metadata
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from deberta_onnx.runtime import Encoder, EncoderConfig
from deberta_onnx.runtime.cli import build_parser, main
from deberta_onnx.runtime.cli.common import load
from deberta_onnx.runtime.errors import CudaGraphError, ModelFolderError, ModelLoadError, ProviderUnavailableError
from deberta_onnx.runtime.session import CudaSettings, SessionSettings, create_session, load_error, resolve_providers


def test_cuda_request_names_the_gpu_package(tiny_model: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("the CUDA provider is installed here")
    with pytest.raises(ProviderUnavailableError) as caught:
        Encoder(tiny_model, config=EncoderConfig(device="cuda"))
    message = str(caught.value)
    assert "CUDAExecutionProvider is not available" in message
    assert "deberta-onnx[gpu]" in message and "onnxruntime-gpu" in message
    assert "must not be installed at once" in message


def test_both_onnxruntime_packages_installed_is_named(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("the CUDA provider is installed here")
    real_version = importlib.metadata.version
    fake = {"onnxruntime": ort.__version__, "onnxruntime-gpu": ort.__version__}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: fake.get(name) or real_version(name))
    with pytest.raises(ProviderUnavailableError, match=r"Both onnxruntime \S+ and onnxruntime-gpu \S+ are installed"):
        Encoder(tiny_model, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_silent_fallback_to_cpu_is_refused(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Claim CUDA is installed: ONNX Runtime then really makes a CPU-only session, which must be refused."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("the CUDA provider is installed here")
    real = ort.get_available_providers
    monkeypatch.setattr(ort, "get_available_providers", lambda: [*real(), "CUDAExecutionProvider"])
    with pytest.warns(UserWarning), pytest.raises(ProviderUnavailableError) as caught:
        create_session(tiny_model / "model.onnx", ["CUDAExecutionProvider", "CPUExecutionProvider"], SessionSettings())
    message = str(caught.value)
    assert "without CUDAExecutionProvider (active: CPUExecutionProvider)" in message
    assert "deberta-onnx[gpu]" in message


def test_device_and_cuda_graph_arguments_are_checked(tiny_model: Path) -> None:
    assert resolve_providers(None, "cuda:1") == [("CUDAExecutionProvider", {"device_id": "1", "use_tf32": "0"}),
                                                 "CPUExecutionProvider"]
    # With CUDA graphs the arena grows by what is asked for, as ONNX Runtime's own CUDA-graph helper sets it.
    assert resolve_providers(None, "cuda", cuda_graph=True)[0] == ("CUDAExecutionProvider", {
        "device_id": "0", "enable_cuda_graph": "1", "arena_extend_strategy": "kSameAsRequested", "use_tf32": "0"})
    assert resolve_providers(None, None) == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="not both"):
        resolve_providers(["CPUExecutionProvider"], "cpu")
    with pytest.raises(ValueError, match="cuda_graph needs CUDAExecutionProvider"):
        Encoder(tiny_model, config=EncoderConfig(cuda_graph=True))
    with pytest.raises(ValueError, match="device must be"):
        EncoderConfig(device="gpu")
    with pytest.raises(ValueError, match="cuda_graph needs io_binding"):
        EncoderConfig(cuda_graph=True, io_binding=False)
    for field in ("sequence_bucket", "max_tokens", "max_buckets"):
        with pytest.raises(ValueError, match=field):
            EncoderConfig(**{field: 0})
    with pytest.raises(ValueError, match="batch_size"):
        Encoder(tiny_model).encode(["a"], batch_size=0)


def test_cuda_provider_options_come_from_the_config() -> None:
    def cuda_options(**fields: object) -> object:
        config = EncoderConfig(device="cuda", **fields)  # type: ignore[arg-type]
        return resolve_providers(None, config.device, cuda=CudaSettings.from_config(config))[0]

    assert cuda_options() == ("CUDAExecutionProvider", {"device_id": "0", "use_tf32": "0"})  # TF32 off by default
    assert cuda_options(use_tf32=True, gpu_mem_limit=8 << 30, cuda_arena_extend_strategy="kNextPowerOfTwo") == (
        "CUDAExecutionProvider", {"device_id": "0", "use_tf32": "1", "gpu_mem_limit": str(8 << 30),
                                  "arena_extend_strategy": "kNextPowerOfTwo"})
    # An explicit strategy wins over the CUDA-graph default; options given with the provider win over the config.
    settings = CudaSettings(arena_extend_strategy="kNextPowerOfTwo", cuda_graph=True)
    assert resolve_providers(None, "cuda", cuda=settings)[0][1]["arena_extend_strategy"] == "kNextPowerOfTwo"
    given = [("CUDAExecutionProvider", {"device_id": "1", "use_tf32": "1"}), "CPUExecutionProvider"]
    assert resolve_providers(given, None, cuda=CudaSettings(gpu_mem_limit=1024)) == [
        ("CUDAExecutionProvider", {"device_id": "1", "use_tf32": "1", "gpu_mem_limit": "1024"}), "CPUExecutionProvider"]
    cpu_only = ["CPUExecutionProvider"]
    assert resolve_providers(cpu_only, None, cuda=CudaSettings(use_tf32=True)) == cpu_only
    for field, value, message in (("cuda_arena_extend_strategy", "kFast", "cuda_arena_extend_strategy must be one of"),
                                  ("gpu_mem_limit", 0, "gpu_mem_limit must be a positive int"),
                                  ("use_tf32", "yes", "use_tf32 must be True or False")):
        with pytest.raises(ValueError, match=message):
            EncoderConfig(**{field: value})  # type: ignore[arg-type]


def test_cuda_flags_map_onto_the_config(tiny_model: Path) -> None:
    words = ["embed", str(tiny_model), "--input", "-", "--output", "x.npy"]
    args = build_parser("embed").parse_args([*words, "--tf32", "--gpu-mem-limit", "4096",
                                             "--cuda-arena-extend-strategy", "kSameAsRequested"])
    config = load(args, lambda model_dir, config: config)
    assert (config.use_tf32, config.gpu_mem_limit, config.cuda_arena_extend_strategy) == (
        True, 4096, "kSameAsRequested")
    defaults = load(build_parser("embed").parse_args(words), lambda model_dir, config: config)
    assert defaults == EncoderConfig()


def test_load_failures_are_named_with_their_cause(tiny_model: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Only ONNX Runtime's refusal of CUDA graphs is a CudaGraphError; a corrupt file is a ModelLoadError, CUDA
    graphs asked for or not."""
    folder = tmp_path / "model"

    shutil.copytree(tiny_model, folder)
    (folder / "model.onnx").write_bytes(b"not an onnx graph" * 100)
    with pytest.raises(ModelLoadError, match=r"ONNX Runtime \S+ could not load .*model\.onnx: .*") as caught:
        Encoder(folder, config=EncoderConfig(verify_checksums=False))
    assert isinstance(caught.value, ModelFolderError) and caught.value.__cause__ is not None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        real = ort.get_available_providers
        monkeypatch.setattr(ort, "get_available_providers", lambda: [*real(), "CUDAExecutionProvider"])
    # (Where the provider is faked, ONNX Runtime warns that it is not really there before it reads the file.)
    with warnings.catch_warnings(), pytest.raises(ModelLoadError, match="could not load"):
        warnings.simplefilter("ignore", UserWarning)
        create_session(folder / "model.onnx", resolve_providers(None, "cuda", cuda_graph=True), SessionSettings())
    # The refusal, in the words of both ONNX Runtime generations (inference_session.cc), read from its own class.
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    path = folder / "model.onnx"
    for words in ("This session cannot use the CUDA Graph feature as requested by the user  as all compute graph "
                  "nodes have not been partitioned to the CUDA EP.",
                  "This session cannot use the graph capture feature as requested by the user  as all compute "
                  "graph nodes have not been partitioned to the CUDAExecutionProvider"):
        refusal = Fail(f"[ONNXRuntimeError] : 1 : FAIL : {words}")
        error = load_error(path, refusal, cuda_graph=True)
        assert isinstance(error, CudaGraphError) and words in str(error) and "re-export" in str(error)
        assert isinstance(load_error(path, refusal, cuda_graph=False), ModelLoadError)
    out_of_memory = Fail("[ONNXRuntimeError] : 1 : FAIL : Failed to allocate memory for requested buffer of size 1")
    assert isinstance(load_error(path, out_of_memory, cuda_graph=True), ModelLoadError)


def test_cli_flags_reach_the_config(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    texts = ["one short text", "and another, somewhat longer text than the first"]
    (tmp_path / "in.txt").write_text("\n".join(texts), encoding="utf-8")
    args = ["embed", str(tiny_model), "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "o.npy")]
    assert main([*args, "--io-binding", "--sequence-bucket", "32", "--max-tokens", "64", "--max-buckets", "2"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "o.npy"), Encoder(tiny_model).encode(texts), atol=1e-5, rtol=0)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert main([*args, "--device", "cuda"]) == 1
        assert "deberta-onnx[gpu]" in capsys.readouterr().err
    assert main([*args, "--cuda-graph"]) == 1
    assert "cuda_graph needs CUDAExecutionProvider" in capsys.readouterr().err
