"""Argument types the commands share (sizes, shares of capacity, devices, ages), as argparse
wants them: a value or ArgumentTypeError. Parsing only: nothing here touches a warehouse."""

import argparse

from kvfs import units


def parse_size(text: str) -> int:
    """'200G', '512MiB', '4096' -> bytes (binary units), for argparse."""
    try:
        value = units.parse_size(text)
    except ValueError as exc:
        if not (text.strip().startswith("-") and _is_size(text.strip()[1:])):
            raise argparse.ArgumentTypeError(str(exc)) from None
        value = -1  # a size with a minus sign
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a size must be positive: {text!r}")
    return value


def _is_size(text: str) -> bool:
    try:
        units.parse_size(text)
    except ValueError:
        return False
    return True


def parse_fraction(text: str) -> float:
    """'90%', '90' or '0.9' -> 0.9 (a share of the warehouse's capacity)."""
    try:
        value = float(text.strip().rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid share {text!r} (examples: 90%, 0.9)") from None
    if text.strip().endswith("%") or value > 1:
        value /= 100
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a share must be above 0% and at most 100%: {text!r}")
    return value


def parse_device(text: str) -> tuple[str, int | None]:
    """'/data/a.img:200G' -> ('/data/a.img', 200 GiB); a bare path -> (path, None)."""
    path, sep, size = text.rpartition(":")
    if sep and path and not size.startswith("/"):
        return path, parse_size(size)
    return text, None


def parse_seconds(text: str) -> float:
    """'300', '2.5' -> seconds, at least 0, for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"seconds must be a finite number >= 0: {text!r}")
    return value


def parse_age(text: str) -> float:
    """'90s', '15m', '2h', '7d' -> seconds, for argparse."""
    try:
        return units.parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
