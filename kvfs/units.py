"""Sizes and durations as people write them: '200G', '512MiB', '90s', '2h'."""

import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.I)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_AGE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.I)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_size(text: str) -> int:
    """'200G', '512MiB', '4096' -> bytes (binary units). ValueError if it is not one."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"invalid size {text!r} (examples: 4096, 64M, 200G)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value == float("inf"):  # hundreds of digits: not a size
        raise ValueError(f"size {text[:40]!r} is too large")
    return int(value)


def parse_age(text: str) -> float:
    """'90', '90s', '15m', '2h', '7d', '1w' -> seconds. ValueError if it is not one."""
    m = _AGE_RE.match(text)
    if not m:
        raise ValueError(f"invalid duration {text!r} (examples: 90s, 15m, 2h, 7d)")
    return float(m.group(1)) * _SECONDS[m.group(2).lower()]


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """'1 file', '0 files', '12,345 files' (`nouns` where adding an s is wrong)."""
    return f"{n:,} {noun if n == 1 else nouns or noun + 's'}"
