"""Prints the lower bounds that pyproject.toml declares, as pip constraints (``name==version``), one a line.

    python3 .ci/floors.py runtime export   # the runtime's dependencies and the export extra

``runtime`` is ``[project] dependencies``; any other name is an extra. Every requirement of a group must carry a
plain lower bound (``name>=X``): a compatibility job that installs these pins then tests exactly what the
package claims, and an unbounded requirement would claim every release ever made.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

_LOWER_BOUND = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*>=\s*(?P<version>[0-9][^,;\s]*)")


def floors(groups: list[str], pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    extras = project.get("optional-dependencies", {})
    pins = []
    for group in groups:
        if group != "runtime" and group not in extras:
            raise SystemExit(f"no group {group!r} in {pyproject}; choose runtime or one of: {', '.join(extras)}")
        for requirement in project["dependencies"] if group == "runtime" else extras[group]:
            match = _LOWER_BOUND.fullmatch(requirement.strip())
            if match is None:
                raise SystemExit(f"{requirement!r} ({group}) is not of the form name>=version: give it a lower bound")
            pins.append(f"{match['name']}=={match['version']}")
    return pins


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print("\n".join(floors(sys.argv[1:], Path(__file__).resolve().parents[1] / "pyproject.toml")))
