"""The portable graph (``ExportConfig.portable``): standard ONNX operators only, checked on every variant written."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import onnx

from ._errors import ExportError

__all__ = ["STANDARD_DOMAINS", "check_portable", "nonstandard_ops"]

# The ONNX standard's operator domain, under both its spellings.
STANDARD_DOMAINS = ("", "ai.onnx")


def nonstandard_ops(model: onnx.ModelProto) -> dict[str, int]:
    """``{"domain.OpType": count}`` of the nodes outside the standard ``ai.onnx`` domain (subgraphs included)."""
    found: Counter[str] = Counter()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.domain not in STANDARD_DOMAINS:
                found[f"{node.domain}.{node.op_type}"] += 1
            for attribute in node.attribute:
                for sub in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs):
                    visit(sub)

    visit(model.graph)
    return dict(sorted(found.items()))


def check_portable(folder: Path, files: Iterable[str]) -> None:
    """Checks that each graph file in ``folder`` holds standard operators only, and drops the opset imports of
    other domains that no node uses (the quantizer declares ``com.microsoft`` whether it uses it or not).

    Raises:
        ExportError: a graph holds a contrib operator (a bug: portable exports must not).
    """
    for name in files:
        path = folder / name
        model = onnx.load(str(path), load_external_data=False)
        found = nonstandard_ops(model)
        if found:
            raise ExportError(f"the portable export wrote {name} with operators outside the ONNX standard ({found});"
                              " this is a bug in deberta-onnx: please report it, and export without --portable "
                              "meanwhile.")
        used = {*STANDARD_DOMAINS, *(function.domain for function in model.functions)}
        imports = [entry for entry in model.opset_import if entry.domain in used]
        if len(imports) < len(model.opset_import):
            del model.opset_import[:]
            model.opset_import.extend(imports)
            # The weights stay where they are (external data, when there is any, is not rewritten).
            onnx.save(model, str(path))
