"""/metrics as the tests read it: parsed by prometheus_client's parser, independent of the
exposition relayd renders by hand (relayd/metrics.py), and one lookup of a value."""

from __future__ import annotations

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

#: families by name; counters are named without ``_total``, as Prometheus names them
Families = dict[str, Metric]


def parse(text: str) -> Families:
    """Every family of an exposition. The parser raises ValueError on a line the format does
    not allow; a family that appears twice, or a missing final newline, fail here."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    families: Families = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in families, f"family {family.name} appears twice"
        families[family.name] = family
    return families


def value(metrics: str | Families, name: str, **labels: str) -> float:
    """The sum of the samples of ``relayd_<name>`` (``_total`` optional for counters) whose
    labels include ``labels``. A name no sample has is an error, so that a renamed metric cannot
    pass for a zero."""
    families = parse(metrics) if isinstance(metrics, str) else metrics
    full = f"relayd_{name.removeprefix('relayd_')}"
    names = {full, f"{full.removesuffix('_total')}_total"}
    samples = [s for family in families.values() for s in family.samples if s.name in names]
    if not samples:
        raise AssertionError(f"no metric {full} in {sorted(families)}")
    wanted = labels.items()
    return sum(float(s.value) for s in samples if wanted <= s.labels.items())
