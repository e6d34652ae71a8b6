"""Metrics: Prometheus text rendering of Samples, a cheap latency histogram, a rate helper.

No I/O here. Feeds build their samples (see :class:`relayd.runtime.Sample`), the health server
renders them with :func:`render` in the text exposition format 0.0.4.
"""

from __future__ import annotations

import collections
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator

from relayd.runtime import MetricType, Sample

PREFIX = "relayd_"
#: Process metrics under the names every Prometheus client library exports (and stock
#: dashboards query), without the ``relayd_`` prefix.
STANDARD_NAMES = frozenset(
    {
        "process_cpu_seconds_total",
        "process_max_fds",
        "process_open_fds",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
    }
)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_:]")
_LABEL_BAD = re.compile(r"[^a-zA-Z0-9_]")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
#: Buckets of the latency histograms: log2 of 1 us .. 2**25 us (the C data plane counts in
#: the same buckets; relayd/fastpath/abi.py checks it at load).
LATENCY_BUCKETS = 26


def metric_name(name: str) -> str:
    """``relayd_`` + name, with characters Prometheus does not allow replaced by ``_``; the
    standard process metrics keep their own names."""
    if name in STANDARD_NAMES:
        return name
    full = name if name.startswith(PREFIX) else PREFIX + name
    return _NAME_BAD.sub("_", full)


def label_name(name: str) -> str:
    clean = _LABEL_BAD.sub("_", name) or "_"
    return "_" + clean if clean[0].isdigit() else clean


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**63:
        return str(int(value))
    return repr(float(value))


def sample_name(sample: Sample) -> str:
    """The exposed name: ``relayd_`` prefix, and ``_total`` at the end of every counter, as
    Prometheus names counters (feeds may give ``frames_in`` or ``frames_in_total``)."""
    name = metric_name(sample.name)
    if sample.type == "counter" and not name.endswith("_total"):
        name += "_total"
    return name


def family_of(sample: Sample) -> str:
    """The metric family a sample belongs to (a histogram's suffix stripped)."""
    name = sample_name(sample)
    if sample.type == "histogram":
        for suffix in _HISTOGRAM_SUFFIXES:
            if name.endswith(suffix):
                return name[: -len(suffix)]
    return name


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{label_name(k)}="{escape_label_value(str(v))}"' for k, v in labels)
    return "{" + inner + "}"


def render(samples: Iterable[Sample]) -> str:
    """The text exposition format: every family's samples together, HELP and TYPE once.

    Samples of one family may come from several feeds in any order; they are grouped. A
    sample whose type disagrees with the first one seen for its family is dropped, so the
    output is always parseable.
    """
    families: dict[str, tuple[MetricType, str, list[str]]] = {}
    for sample in samples:
        family = family_of(sample)
        entry = families.get(family)
        if entry is None:
            entry = (sample.type, sample.help, [])
            families[family] = entry
        elif entry[0] != sample.type:
            continue
        entry[2].append(
            f"{sample_name(sample)}{_labels(sample.labels)} {format_value(sample.value)}"
        )
    out: list[str] = []
    for family, (kind, help_text, lines) in families.items():
        out.append(f"# HELP {family} {escape_help(help_text)}")
        out.append(f"# TYPE {family} {kind}")
        out.extend(lines)
    return "\n".join(out) + "\n" if out else ""


class LatencyHistogram:
    """Fixed log2 buckets, in seconds on the outside and integer nanoseconds inside.

    Bucket ``k`` counts observations of at most ``2**k`` microseconds (1 µs .. 2**(n-1) µs),
    plus +Inf. ``observe_ns`` is one integer division, one ``bit_length`` and an add, cheap
    enough for a per-datagram call. Negative values (clock skew between hosts) count as 0.
    """

    __slots__ = ("_counts", "_n", "count", "sum_ns")

    def __init__(self, buckets: int = LATENCY_BUCKETS) -> None:
        if buckets < 1:
            raise ValueError("a histogram needs at least one bucket")
        self._n = buckets
        self._counts = [0] * (buckets + 1)  # the last one is +Inf
        self.count = 0
        self.sum_ns = 0

    @property
    def bounds_seconds(self) -> tuple[float, ...]:
        return tuple((1 << k) / 1e6 for k in range(self._n))

    def observe_ns(self, ns: int) -> None:
        if ns <= 0:
            ns = 0
            k = 0
        else:
            k = ((ns - 1) // 1000).bit_length()
        self._counts[k if k < self._n else self._n] += 1
        self.count += 1
        self.sum_ns += ns

    @property
    def counts(self) -> list[int]:
        """Observations per bucket, +Inf last (a copy)."""
        return list(self._counts)

    def add_counts(self, counts: list[int], sum_ns: int) -> None:
        """Add observations counted elsewhere in the same buckets (the C data path)."""
        if len(counts) != self._n + 1:
            raise ValueError(f"{len(counts)} bucket counts for {self._n + 1} buckets")
        for k, count in enumerate(counts):
            self._counts[k] += count
        self.count += sum(counts)
        self.sum_ns += sum_ns

    def samples(
        self,
        family: str,
        labels: tuple[tuple[str, str], ...] = (),
        help_text: str = "Latency in seconds.",
    ) -> Iterator[Sample]:
        cumulative = 0
        for k, bound in enumerate(self.bounds_seconds):
            cumulative += self._counts[k]
            le = (("le", format_value(bound)),)
            yield Sample(f"{family}_bucket", "histogram", help_text, labels + le, cumulative)
        cumulative += self._counts[self._n]
        inf = (*labels, ("le", "+Inf"))
        yield Sample(f"{family}_bucket", "histogram", help_text, inf, cumulative)
        yield Sample(f"{family}_sum", "histogram", help_text, labels, self.sum_ns / 1e9)
        yield Sample(f"{family}_count", "histogram", help_text, labels, self.count)


class Rate:
    """Per-second rate of a growing counter over a sliding window of snapshots.

    Call :meth:`update` with the counter's total every so often (the STATUS tick); the rate is
    the growth between the oldest snapshot still inside ``window`` and the newest. A counter
    that went backwards (a restarted feed) starts the window again.
    """

    def __init__(self, window: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._points: collections.deque[tuple[float, float]] = collections.deque()

    def update(self, total: float, now: float | None = None) -> None:
        t = self._clock() if now is None else now
        if self._points and total < self._points[-1][1]:
            self._points.clear()
        self._points.append((t, total))
        while len(self._points) > 2 and t - self._points[1][0] >= self.window:
            self._points.popleft()

    def per_second(self) -> float:
        if len(self._points) < 2:
            return 0.0
        (t0, v0), (t1, v1) = self._points[0], self._points[-1]
        return (v1 - v0) / (t1 - t0) if t1 > t0 else 0.0
