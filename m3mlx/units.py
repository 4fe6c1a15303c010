"""Sizes a user types and sizes m3mlx prints: one parser for the API and every command.

Units are binary, as Apple counts memory (a "64 GB" Mac has 64 x 2^30 bytes) and as mlx-lm's
5 GB shard limit does: K, M, G, T are 2^10, 2^20, 2^30, 2^40 bytes, with or without a trailing
B or iB. A bare number is bytes. Where a fraction makes sense (`--expert-cache 25%`), a
percentage is one.
"""

import math
import re
from typing import Union

from .checks import InputError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*%\s*$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
GiB = 1 << 30


class Fraction(float):
    """A share of something (a percentage given as '25%' is Fraction(0.25))."""

    def __repr__(self) -> str:
        return f"{100 * float(self):g}%"


def parse_size(value, what: str = "the size") -> int:
    """'5GB', '500MB', '1.5G', '64GiB', '1048576', or an int -> bytes."""
    if isinstance(value, bool):
        raise InputError(f"{what} is {value!r}; give bytes or a size like 40GB")
    if isinstance(value, int):
        if value < 0:
            raise InputError(f"{what} is {value}; a size cannot be negative")
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise InputError(f"{what} is {str(value)[:40]!r}, not a size like 40GB, 500MB or "
                         "1048576 (bytes)")
    n = float(m[1]) * _UNITS[m[2].lower()]
    if not math.isfinite(n):
        raise InputError(f"{what} is {str(value)[:40]!r}, too large")
    return int(n)


def parse_size_or_fraction(value, what: str = "the size") -> Union[int, Fraction]:
    """A size (see `parse_size`) or a percentage ('25%' -> Fraction(0.25), in (0, 100%])."""
    if isinstance(value, Fraction):
        share = float(value)
    elif isinstance(value, str) and "%" in value:
        m = _PERCENT.match(value)
        if not m:
            raise InputError(f"{what} is {value[:40]!r}, not a percentage like 25%")
        share = float(m[1]) / 100
    else:
        return parse_size(value, what)
    if not 0 < share <= 1:
        raise InputError(f"{what} is {100 * share:g}%; give a share above 0% and at most 100%")
    return Fraction(share)


def format_size(n: float) -> str:
    """Bytes as a short binary size: '1.50 GB', '340 MB', '12 KB' (GB = 2^30 bytes)."""
    for unit, scale in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.2f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{n:.0f} B"
