"""Durations and sizes: parsing, refusals with their messages, and the log formats."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.units import (
    DURATION_UNITS,
    SIZE_UNITS,
    UnitError,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("10us", 0.00001),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("3", 3.0),
        ("0.25", 0.25),
        ("2 s", 2.0),
        ("1m30s", 90.0),
        ("1h 15m", 4500.0),
        (5, 5.0),
        (0.125, 0.125),
        (0, 0.0),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12)
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("5x", "invalid duration '5x': unknown unit 'x' (use us, ms, s, m, h)"),
        ("2S", "invalid duration '2S': unknown unit 'S' (use us, ms, s, m, h)"),
        ("-2s", "invalid duration '-2s': must not be negative"),
        ("", "invalid duration '': expected a number with a unit (us, ms, s, m, h)"),
        ("s", "invalid duration 's': expected a number with a unit (us, ms, s, m, h)"),
        ("1e3", "invalid duration '1e3': expected a number with a unit (us, ms, s, m, h)"),
        ("1m30", "invalid duration '1m30': expected a number with a unit (us, ms, s, m, h)"),
        (-1, "invalid duration -1: must be a finite number >= 0"),
        (math.nan, "invalid duration nan: must be a finite number >= 0"),
        (math.inf, "invalid duration inf: must be a finite number >= 0"),
        (True, "invalid duration True: expected a number of seconds or a string"),
        ("1" * 65, f"invalid duration {'1' * 64!r}...: too long"),
    ],
)
def test_parse_duration_refuses(value: object, message: str) -> None:
    with pytest.raises(UnitError) as info:
        parse_duration(value)  # type: ignore[arg-type]
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64KiB", 65536),
        ("4MiB", 4 * 1024**2),
        ("1GiB", 1024**3),
        ("1TiB", 1024**4),
        ("1GB", 10**9),
        ("64KB", 64000),
        ("12B", 12),
        ("12", 12),
        ("0.5KiB", 512),
        ("1.5 MiB", 1572864),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size
    assert type(parse_size(text)) is int


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("4MB2", "invalid size '4MB2': expected a number with a unit ({units})"),
        ("4mib", "invalid size '4mib': unknown unit 'mib' (use {units})"),
        ("1.3B", "invalid size '1.3B': not a whole number of bytes"),
        ("-1KiB", "invalid size '-1KiB': must not be negative"),
        (-5, "invalid size -5: must be >= 0"),
        (1.5, "invalid size 1.5: expected a whole number of bytes or a string"),
        (False, "invalid size False: expected a whole number of bytes or a string"),
        ("9" * 5000, f"invalid size {'9' * 64!r}...: too long"),
    ],
)
def test_parse_size_refuses(value: object, message: str) -> None:
    with pytest.raises(UnitError) as info:
        parse_size(value)  # type: ignore[arg-type]
    assert str(info.value) == message.format(units="B, KB, MB, GB, TB, KiB, MiB, GiB, TiB")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (1e-7, "0.1us"),
        (0.000005, "5us"),
        (0.00085, "850us"),
        (0.0009996, "1ms"),
        (0.0123, "12.3ms"),
        (0.25, "250ms"),
        (0.9996, "1s"),
        (2.5, "2.5s"),
        (59.4, "59s"),
        (59.6, "1m"),
        (90, "1m30s"),
        (3599.6, "1h"),
        (7500, "2h5m"),
        (-2, "-2s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0B"),
        (512, "512B"),
        (1024, "1KiB"),
        (1536, "1.5KiB"),
        (4 * 1024**2, "4MiB"),
        (1024**2 - 1, "1MiB"),
        (10**9, "954MiB"),
        (2**50, "1024TiB"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


@given(st.integers(min_value=0, max_value=2**60), st.sampled_from(sorted(SIZE_UNITS)))
def test_size_units_scale_exactly(count: int, unit: str) -> None:
    assert parse_size(f"{count}{unit}") == count * SIZE_UNITS[unit]


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from(sorted(DURATION_UNITS)))
def test_duration_units_scale(count: int, unit: str) -> None:
    expected = count * float(DURATION_UNITS[unit])
    assert parse_duration(f"{count}{unit}") == pytest.approx(expected, rel=1e-12)


@given(st.floats(min_value=1e-6, max_value=1e7))
def test_formatted_duration_parses_back_close(seconds: float) -> None:
    # Formats keep three significant digits below 1 s, tenths to 10 s, then whole seconds
    # and, from an hour on, whole minutes: never more than 5 % off.
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, rel=0.05)


@given(st.integers(min_value=0, max_value=2**50))
def test_formatted_size_is_close(size: int) -> None:
    # Three significant digits (a fraction of a byte need not parse back as a size).
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]+)", format_size(size))
    assert match is not None
    value = float(match[1]) * SIZE_UNITS[match[2]]
    assert value == pytest.approx(size, rel=0.005)


@given(
    st.one_of(st.text(max_size=20), st.from_regex(r"[0-9. ]{0,70}[a-zA-Z]{0,3}", fullmatch=True))
)
def test_arbitrary_text_raises_only_unit_error(text: str) -> None:
    for parse in (parse_duration, parse_size):
        try:
            value = parse(text)
        except UnitError:
            continue
        assert value >= 0
