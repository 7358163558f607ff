"""Argument checks the config dataclasses share. Standard library only."""

from __future__ import annotations

__all__ = ["check_positive_int"]


def check_positive_int(name: str, value: object, *, optional: bool = False, minimum: int = 1) -> None:
    """Raises ``ValueError`` unless ``value`` is an int (not a bool) >= ``minimum`` (or ``None`` if ``optional``)."""
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind}{' or None' if optional else ''}, got {value!r}")
