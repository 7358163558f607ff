"""Prints the packages whose installed version differs from the lock (constraints.txt), one line.

    pip freeze --exclude-editable | python3 .ci/drift.py constraints.txt
"""

from __future__ import annotations

import sys


def pins(lines: list[str]) -> dict[str, str]:
    found = {}
    for line in lines:
        pin = line.split("#", 1)[0].strip()
        if "==" in pin:
            name, version = pin.split("==", 1)
            found[name.lower()] = version
    return found


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as lock:
        locked = pins(lock.readlines())
    installed = pins(sys.stdin.readlines())
    moved = [f"{name} {locked.get(name, '(not locked)')} -> {version}"
             for name, version in sorted(installed.items()) if locked.get(name) != version]
    print("differs from the lock:", ", ".join(moved) if moved else "nothing")
