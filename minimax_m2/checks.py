"""Type and range checks for values read from files and flags: each failure is a ValueError naming
where the value came from (a file and key, or a flag), so the user sees one line saying what is wrong."""

import math
from typing import Any

MAX_SIZE = 1 << 24  # no dimension, count or length this project handles comes near it


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def integer(where: str, value: Any, low: int = 1, high: int = MAX_SIZE) -> int:
    """An int (not a bool, not a float) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} is {_show(value)}, expected an integer")
    if not low <= value <= high:
        raise ValueError(f"{where} is {value}, expected an integer in [{low}, {high}]")
    return value


def number(where: str, value: Any, low: float = 0.0, high: float = math.inf, low_open: bool = True) -> float:
    """A finite int or float (not a bool) in (low, high] (or [low, high] when not low_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} is {_show(value)}, expected a number")
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        bound = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{where} is {value}, expected a finite number in {bound}")
    return float(value)


def boolean(where: str, value: Any) -> bool:
    """true or false exactly (a string such as "false" is refused, not read as true)."""
    if not isinstance(value, bool):
        raise ValueError(f"{where} is {_show(value)}, expected true or false")
    return value


def mapping(where: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where} is {_show(value)}, expected a JSON object")
    return value


def text(where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where} is {_show(value)}, expected a string")
    return value


def integers(where: str, value: Any, low: int = 0, high: int = MAX_SIZE) -> list[int]:
    """One integer or a list of integers, each in [low, high] -> a list."""
    values = value if isinstance(value, list) else [value]
    return [integer(f"{where}[{i}]" if isinstance(value, list) else where, v, low, high) for i, v in enumerate(values)]
