"""Export faults: killed processes, unwritable paths and failed writes leave no partial OUT_DIR."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from deberta_onnx.export import ExportConfig, ExportError, OutputExistsError, _export, export_model
from deberta_onnx.runtime import Encoder

from .test_cli import wait_until_stopped

# The start of a script that exports in a process of its own, writing a graph exported before (argv[1], taken off
# argv) instead of tracing one: for the tests of what an export does around the trace (cleaning up, swapping
# folders), where the graph is beside the point and a trace would be most of the test's time.
_WITH_GRAPH = textwrap.dedent(
    """
    import os, shutil, signal, sys
    import onnx
    from deberta_onnx.export import _export, _staging
    from deberta_onnx.runtime.cli import main

    graph = sys.argv.pop(1)
    def traced(module, path, **options):
        shutil.copyfile(graph, path)
        return onnx.load(str(path))
    _export.export_onnx = traced
    """
)

# Each test exports in a subprocess and kills or faults it: the full suite's, not the quick tier's.
pytestmark = pytest.mark.slow


def _start_export(src: Path, out: Path, graph: Path) -> subprocess.Popen[str]:
    script = _WITH_GRAPH + "sys.exit(main(sys.argv[1:]))\n"
    return subprocess.Popen([sys.executable, "-c", script, str(graph), "export", str(src), str(out), "--quiet",
                             "--no-optimize"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


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


def _copied_graph(graph: Path) -> Callable[..., onnx.ModelProto]:
    """An ``export_onnx`` that writes a graph exported before instead of tracing one: for the tests of what an
    export does around the trace (cleaning up, swapping folders), where the graph is beside the point."""

    def traced(module: object, path: Path, **options: object) -> onnx.ModelProto:
        shutil.copyfile(graph, path)
        return onnx.load(str(path))

    return traced


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_export_leaves_no_out_dir(tiny_checkpoint: Path, tiny_model: Path, tmp_path: Path,
                                         sig: signal.Signals, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "model"
    process = _start_export(tiny_checkpoint, out, tiny_model / "model.onnx")
    staging = _wait_for_staging(tmp_path, "model", process)
    process.send_signal(sig)
    process.communicate(timeout=120)
    assert process.returncode != 0
    assert not out.exists()
    if sig == signal.SIGTERM:
        assert not staging.exists()  # cleaned up on the way out
    # A later export succeeds and removes what a killed one left behind.
    monkeypatch.setattr(_export, "export_onnx", _copied_graph(tiny_model / "model.onnx"))
    export_model(tiny_checkpoint, out, ExportConfig(quiet=True, validate=False, optimize=False))
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


# --- the swap of --overwrite: real exports stopped (SIGSTOP, by themselves) at a point of the swap, then killed,
# interrupted or continued by the test (with the tiny model's graph in place of a trace, ``_WITH_GRAPH``) -------

_STOPPING_EXPORT = _WITH_GRAPH + textwrap.dedent(
    """
    mode, stop_at, args = sys.argv[1], sys.argv[2], sys.argv[3:]

    def stop():
        os.kill(os.getpid(), signal.SIGSTOP)  # the test looks at the disk, then kills or continues this process

    if mode == "renames":  # a filesystem without an atomic exchange (NFS, macOS): two renames
        _staging._exchange = lambda staging, target: False
    if stop_at == "before-swap":
        flush = _staging._flush
        def stopped_flush(folder):
            flush(folder)
            stop()
        _staging._flush = stopped_flush
    elif mode == "renames":  # mid-swap: right after OUT_DIR was moved aside
        rename = os.rename
        def stopped_rename(src, dst):
            rename(src, dst)
            if ".old-" in os.path.basename(dst):
                stop()
        os.rename = stopped_rename
    else:  # mid-swap: right after the exchange, before the old folder is removed
        exchange = _staging._exchange
        def stopped_exchange(staging, target):
            done = exchange(staging, target)
            stop()
            return done
        _staging._exchange = stopped_exchange
    sys.exit(main(args))
    """
)


def _stopped_export(src: Path, out: Path, mode: str, stop_at: str, graph: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", _STOPPING_EXPORT, str(graph), mode, stop_at, "export", str(src),
                                str(out), "--overwrite", "--no-validate", "--no-optimize", "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return wait_until_stopped(process, stop_at)


_OLD_EXPORT = "2000-01-01T00:00:00+00:00"


def _old_folder(tiny_model: Path, parent: Path) -> Path:
    """OUT_DIR before the export replaces it: a model folder, marked (in its manifest, since an export replaces
    only folders of its own files) so that it is known again."""
    out = Path(shutil.copytree(tiny_model, parent / "model"))
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    (out / "manifest.json").write_text(json.dumps({**manifest, "created_at": _OLD_EXPORT}), encoding="utf-8")
    return out


def _is_old(folder: Path) -> bool:
    """Whether ``folder`` is the one ``_old_folder`` made."""
    path = folder / "manifest.json"
    return path.is_file() and json.loads(path.read_text(encoding="utf-8"))["created_at"] == _OLD_EXPORT


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name != "model")


@pytest.mark.parametrize("mode", ["renames", "exchange"])
def test_an_export_killed_mid_swap_loses_nothing(tiny_checkpoint: Path, tiny_model: Path, tmp_path: Path,
                                                 mode: str) -> None:
    out = _old_folder(tiny_model, tmp_path)
    process = _stopped_export(tiny_checkpoint, out, mode, "mid-swap", tiny_model / "model.onnx")
    if mode == "renames":  # between the renames: OUT_DIR is aside, the new one not yet in place
        assert not out.exists()
        (retired,) = tmp_path.glob(".model.old-*")
        assert _is_old(retired) and retired.name.startswith(f".model.old-{process.pid}@")
    else:  # an exchange has no such moment: OUT_DIR is the new folder already
        assert (out / "manifest.json").is_file() and not _is_old(out)
    process.kill()
    process.communicate(timeout=60)
    # The next export puts back (or keeps) what a finished swap would have left, and cleans up, before it checks
    # OUT_DIR: without --overwrite it is refused, as for any non-empty OUT_DIR.
    with pytest.raises(OutputExistsError):
        export_model(tiny_checkpoint, out, ExportConfig(quiet=True, validate=False))
    assert _is_old(out) == (mode == "renames")
    assert _leftovers(tmp_path) == []
    Encoder(out)  # a whole model folder either way


def test_an_interrupted_swap_is_undone(tiny_checkpoint: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = _old_folder(tiny_model, tmp_path)
    process = _stopped_export(tiny_checkpoint, out, "renames", "mid-swap", tiny_model / "model.onnx")
    process.send_signal(signal.SIGTERM)  # pending until the process runs again, between the two renames
    process.send_signal(signal.SIGCONT)
    process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert _is_old(out) and _leftovers(tmp_path) == []


@pytest.mark.parametrize("mode", ["renames", "exchange"])
def test_a_failed_swap_keeps_out_dir_and_the_new_export(tiny_checkpoint: Path, tiny_model: Path, tmp_path: Path,
                                                        mode: str) -> None:
    out = _old_folder(tiny_model, tmp_path)
    process = _stopped_export(tiny_checkpoint, out, mode, "before-swap", tiny_model / "model.onnx")
    (staging,) = tmp_path.glob(".model.partial-*")
    # An immutable folder cannot be renamed, not even by root: the swap's move of the new folder fails.
    if subprocess.run(["chattr", "+i", str(staging)], capture_output=True).returncode != 0:
        process.kill()
        process.communicate()
        pytest.skip("chattr +i is not available here")
    try:
        process.send_signal(signal.SIGCONT)
        _, stderr = process.communicate(timeout=120)
    finally:
        subprocess.run(["chattr", "-i", str(staging)], check=True)
    assert process.returncode == 1
    assert "cannot move the new export into place" in stderr and "was left as it was" in stderr, stderr
    assert str(staging) in stderr and "Nothing was written" not in stderr
    assert _is_old(out)  # rolled back
    assert (staging / "manifest.json").is_file()  # and the complete new export is kept, where the message says
    assert _leftovers(tmp_path) == [staging.name]


def test_staging_folders_are_owned_by_host_and_process(tmp_path: Path) -> None:
    from deberta_onnx.export._staging import _host, recover

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    dead_here = tmp_path / f".model.partial-{ended.pid}@{_host()}-abcd1234"
    elsewhere = tmp_path / f".model.partial-{ended.pid}@another-host.example-abcd1234"
    live_here = tmp_path / f".model.partial-{os.getpid()}@{_host()}-abcd1234"
    for folder in (dead_here, elsewhere, live_here):
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"half written")
    recover(tmp_path / "model")  # what every export does first
    # The dead local export's folder is removed; another host's export cannot be checked, so it is kept.
    assert _leftovers(tmp_path) == sorted([elsewhere.name, live_here.name])


# --- what OUT_DIR may be: never the checkpoint, never a folder of someone else's files ------------------------


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_out_dir_that_is_or_holds_the_source_is_refused(tiny_checkpoint: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from deberta_onnx.runtime.cli import main

    src = Path(shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint"))
    (src / "NOTES.txt").write_text("not the exporter's\n", encoding="utf-8")
    before = _tree(tmp_path)
    monkeypatch.chdir(src)
    # `export . . --overwrite` once deleted the checkpoint and the notes beside it, and said nothing (rc 0).
    assert main(["export", ".", ".", "--overwrite", "--quiet"]) == 1
    assert "is the source checkpoint" in capsys.readouterr().err
    assert main(["export", str(src), str(tmp_path), "--overwrite", "--quiet"]) == 1
    assert f"holds the source checkpoint {src}" in capsys.readouterr().err
    assert _tree(tmp_path) == before


def test_overwrite_replaces_only_a_previous_export(tiny_checkpoint: Path, tiny_model: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from deberta_onnx.runtime.cli import main

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "NOTES.txt").write_text("mine\n", encoding="utf-8")
    mixed = Path(shutil.copytree(tiny_model, tmp_path / "mixed"))  # an export, and a file the export did not write
    (mixed / "sub").mkdir()
    (mixed / "sub" / "results.csv").write_text("a,b\n", encoding="utf-8")
    linked = Path(shutil.copytree(tiny_model, tmp_path / "linked"))
    (linked / "tokenizer.json").unlink()
    (linked / "tokenizer.json").symlink_to(notes / "NOTES.txt")  # listed by name, but no export writes a link
    before = _tree(tmp_path)
    for out, named in ((notes, "NOTES.txt"), (mixed, "sub/"), (linked, "tokenizer.json")):
        assert main(["export", str(tiny_checkpoint), str(out), "--overwrite", "--quiet", "--no-validate"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and f"holds {named}" in err and "no deberta-onnx export wrote" in err, err
    assert _tree(tmp_path) == before and (linked / "tokenizer.json").is_symlink()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder was left either


def test_a_checkpoint_without_tokenizer_files_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from deberta_onnx.export import CheckpointError

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_checkpoint / name, bare / name)
    # It once exported "successfully", with a 7-entry tokenizer that made every word [UNK].
    with pytest.raises(CheckpointError, match=r"has no tokenizer: none of tokenizer.json, spm.model, vocab.json.*"
                                              r"Copy the tokenizer files"):
        export_model(bare, tmp_path / "model", ExportConfig(quiet=True))
    # A tokenizer file that holds the special tokens alone (no vocabulary) is refused as well.
    tokenizer = json.loads((tiny_checkpoint / "tokenizer.json").read_text(encoding="utf-8"))
    special = {token["content"]: token["id"] for token in tokenizer["added_tokens"]}
    tokenizer["model"] = {"type": "WordLevel", "vocab": special, "unk_token": "[UNK]"}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_checkpoint / name, bare / name)
    (bare / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"holds only its \d+ special tokens: the vocabulary is missing"):
        export_model(bare, tmp_path / "model", ExportConfig(quiet=True))
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("damage", ["truncated-weights", "string-in-config"])
def test_a_damaged_checkpoint_is_one_error_line(tiny_checkpoint: Path, tmp_path: Path, damage: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from deberta_onnx.runtime.cli import main

    src = Path(shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint"))
    if damage == "truncated-weights":
        weights = src / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        says = "cannot read the weights (model.safetensors or pytorch_model.bin)"
    else:
        config = json.loads((src / "config.json").read_text(encoding="utf-8"))
        (src / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "two"}), encoding="utf-8")
        says = "cannot read the config.json"
    assert main(["export", str(src), str(tmp_path / "model"), "--quiet"]) == 1  # no exception escapes
    err = capsys.readouterr().err
    assert err.startswith(f"error: {says} of {src}") and err.count("\n") == 1, err
    assert not (tmp_path / "model").exists()


def test_nan_weights_name_the_row_and_the_cause(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    from deberta_onnx.export import ValidationError

    src = Path(shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint"))
    weights = load_file(src / "model.safetensors")
    name = next(key for key in weights if key.endswith("word_embeddings.weight"))
    weights[name][:] = float("nan")
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValidationError) as caught:
        export_model(src, tmp_path / "model", ExportConfig(quiet=True, optimize=False))
    message = str(caught.value)
    assert "row -1" not in message and "(row 0)" in message, message  # the first row that is not finite
    assert "the checkpoint's own PyTorch output is NaN or infinite" in message and "weights hold NaN" in message
