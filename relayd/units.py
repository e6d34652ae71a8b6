"""Durations and sizes as operators write them: ``"250ms"``, ``"2s"``, ``"4MiB"``.

Parsing is strict and exact: a duration is a number of seconds (int or float) or a decimal
number followed by one of ``us``, ``ms``, ``s``, ``m``, ``h`` (several such parts add up:
``"1m30s"``); a size is a whole number of
bytes (int) or a decimal number followed by one of ``B``, ``KB``, ``MB``, ``GB``, ``TB``
(powers of 1000) or ``KiB``, ``MiB``, ``GiB``, ``TiB`` (powers of 1024) that comes to a whole
number of bytes. Negative values, NaN, infinities and booleans are refused. Whether zero is
acceptable is the caller's business.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

__all__ = [
    "DURATION_UNITS",
    "SIZE_UNITS",
    "UnitError",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_size",
]

# Exact rational arithmetic: "1.5MiB" is 1572864 bytes, whatever the number of digits.
DURATION_UNITS: dict[str, Fraction] = {
    "us": Fraction(1, 1_000_000),
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
}

SIZE_UNITS: dict[str, int] = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}

# A plain decimal number (no sign, no exponent), optional blanks, then an optional unit.
_QUANTITY = re.compile(r"\s*(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[A-Za-z]*)\s*")
_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]+)")
_COMPOUND = re.compile(r"\s*(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*[A-Za-z]+\s*)+")


class UnitError(ValueError):
    """A duration or size that cannot be parsed; the message says what was expected."""


_MAX_TEXT = 64  # longer strings are refused before any arithmetic


def _split(text: str, kind: str, units: str) -> tuple[Fraction, str]:
    match = _QUANTITY.fullmatch(text)
    if match is None:
        raise UnitError(f"invalid {kind} {text!r}: expected a number with a unit ({units})")
    return Fraction(match["number"]), match["unit"]


def parse_duration(value: str | float) -> float:
    """Seconds from a number of seconds or a string such as ``"250ms"``, ``"2s"``, ``"1.5m"``
    or ``"1m30s"`` (parts with units add up, so ``format_duration``'s output parses back)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UnitError(f"invalid duration {value!r}: expected a number of seconds or a string")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise UnitError(f"invalid duration {value!r}: must be a finite number >= 0")
        return float(value)
    units = ", ".join(DURATION_UNITS)
    if len(value) > _MAX_TEXT:
        raise UnitError(f"invalid duration {value[:_MAX_TEXT]!r}...: too long")
    if value.strip().startswith("-"):
        raise UnitError(f"invalid duration {value!r}: must not be negative")
    if _QUANTITY.fullmatch(value) is None and _COMPOUND.fullmatch(value) is not None:
        # "1m30s", "1h 15m": every part has a unit.
        parts = [(Fraction(number), unit) for number, unit in _PART.findall(value)]
    else:
        parts = [_split(value, "duration", units)]
    total = Fraction(0)
    for number, unit in parts:
        scale = DURATION_UNITS.get(unit) if unit or len(parts) > 1 else Fraction(1)
        if scale is None:
            raise UnitError(f"invalid duration {value!r}: unknown unit {unit!r} (use {units})")
        total += number * scale
    try:
        return float(total)
    except OverflowError:
        raise UnitError(f"invalid duration {value!r}: too large") from None


def parse_size(value: str | int) -> int:
    """Bytes from a whole number of bytes or a string such as ``"64KiB"``, ``"4MiB"``, ``"1GB"``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UnitError(f"invalid size {value!r}: expected a whole number of bytes or a string")
    if isinstance(value, int):
        if value < 0:
            raise UnitError(f"invalid size {value!r}: must be >= 0")
        return value
    units = ", ".join(SIZE_UNITS)
    if len(value) > _MAX_TEXT:
        raise UnitError(f"invalid size {value[:_MAX_TEXT]!r}...: too long")
    if value.strip().startswith("-"):
        raise UnitError(f"invalid size {value!r}: must not be negative")
    number, unit = _split(value, "size", units)
    if not unit:
        scale = 1
    else:
        found = SIZE_UNITS.get(unit)
        if found is None:
            raise UnitError(f"invalid size {value!r}: unknown unit {unit!r} (use {units})")
        scale = found
    size = number * scale
    if size.denominator != 1:
        raise UnitError(f"invalid size {value!r}: not a whole number of bytes")
    return int(size)


def _trim(number: float, digits: int) -> str:
    text = f"{number:.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def format_duration(seconds: float) -> str:
    """A short human form for logs: ``"850us"``, ``"250ms"``, ``"2.5s"``, ``"1m30s"``, ``"2h5m"``.

    Values below one second keep three significant digits; longer ones are rounded to a tenth of
    a second (below a minute) or to whole seconds, then to whole minutes from an hour on.
    """
    if not math.isfinite(seconds):
        return str(seconds)
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds == 0:
        return "0s"
    # Thresholds sit just below each boundary so that rounding never prints "1000ms" or "60s".
    if seconds < 0.0009995:
        micros = seconds * 1e6
        return _trim(micros, 2 if micros < 10 else 1 if micros < 100 else 0) + "us"
    if seconds < 0.9995:
        millis = seconds * 1e3
        return _trim(millis, 2 if millis < 10 else 1 if millis < 100 else 0) + "ms"
    if seconds < 59.5:
        return _trim(seconds, 1 if seconds < 10 else 0) + "s"
    whole = round(seconds)
    if whole < 3600:
        minutes, secs = divmod(whole, 60)
        return f"{minutes}m{secs}s" if secs else f"{minutes}m"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours}h{minutes}m" if minutes else f"{hours}h"


def format_size(size: int) -> str:
    """A short human form for logs in powers of 1024: ``"512B"``, ``"1.5KiB"``, ``"4MiB"``."""
    if size < 0:
        return "-" + format_size(-size)
    if size < 1024:
        return f"{size}B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1023.5 or unit == "TiB":
            return _trim(value, 0 if value >= 100 else 1 if value >= 10 else 2) + unit
    raise AssertionError("unreachable")  # pragma: no cover
