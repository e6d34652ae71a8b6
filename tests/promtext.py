"""A strict little parser of the Prometheus text exposition format 0.0.4, for tests."""

from __future__ import annotations

import math
import re

import attrs

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(\{{(.*)\}})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


@attrs.define
class Family:
    name: str
    type: str = "untyped"
    help: str = ""
    samples: list[tuple[str, dict[str, str], float]] = attrs.field(factory=list)


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), text)


def _value(text: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}[text]
    return float(text)


def parse(text: str) -> dict[str, Family]:
    """Families by name; raises AssertionError on anything the format does not allow."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    families: dict[str, Family] = {}
    current: Family | None = None
    closed: set[str] = set()
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            _, keyword, name, rest = [*line.split(" ", 3), ""][:4]
            if current is None or current.name != name:
                assert name not in families, f"family {name} appears twice"
                if current is not None:
                    closed.add(current.name)
                current = families[name] = Family(name)
            if keyword == "HELP":
                current.help = _unescape(rest)
            else:
                assert rest in ("counter", "gauge", "histogram", "summary", "untyped"), line
                assert not current.samples, f"TYPE after samples for {name}"
                current.type = rest
            continue
        assert not line.startswith("#"), line
        m = _SAMPLE.match(line)
        assert m, f"bad sample line {line!r}"
        name, _, label_text, value = m.groups()
        labels: dict[str, str] = {}
        pos = 0
        while label_text and pos < len(label_text):
            lm = _LABEL.match(label_text, pos)
            assert lm, f"bad labels in {line!r}"
            assert lm.group(1) not in labels, f"duplicate label in {line!r}"
            labels[lm.group(1)] = _unescape(lm.group(2))
            pos = lm.end()
        assert current is not None, f"sample before any TYPE: {line!r}"
        base = current.name
        allowed = {base}
        if current.type == "histogram":
            allowed = {base + "_bucket", base + "_sum", base + "_count"}
        assert name in allowed, f"sample {name} outside its family {base}"
        current.samples.append((name, labels, _value(value)))
    return families
