"""Checks every exported graph must pass, whatever the precision or option: helpers the export tests call on each
variant they build."""

from __future__ import annotations

import json
from pathlib import Path

import onnx

__all__ = ["check_folder_graphs", "check_graph"]


def check_graph(path: Path) -> None:
    """``onnx.checker.check_model(full_check=True)`` on the graph at ``path``: the ONNX standard's checks (nodes in
    topological order, every operator known in its domain and opset, types consistent) and strict shape
    inference. ONNX Runtime runs graphs that fail some of them; other engines refuse them."""
    onnx.checker.check_model(str(path), full_check=True)


def check_folder_graphs(folder: Path) -> list[str]:
    """``check_graph`` on each variant a model folder's manifest lists; returns the variants checked."""
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    for entry in manifest["variants"].values():
        check_graph(folder / entry["file"])
    return sorted(manifest["variants"])
