"""The observability kit in etc/: Prometheus alert rules and a Grafana dashboard that refer
only to metrics a running relayd exports (scraped here from a real one carrying traffic), and
rules that promtool accepts."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.relayd_process import (
    RelaydProcess,
    get_text,
    loopback_pair_toml,
    pick_groups,
)

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "etc" / "prometheus" / "relayd-alerts.yml"
DASHBOARD = REPO / "etc" / "grafana" / "relayd-dashboard.json"

#: series Prometheus makes itself for every target
PROMETHEUS_OWN = frozenset({"up"})
# names in PromQL that are not metrics
_PROMQL_WORDS = frozenset(
    (
        *("sum", "rate", "irate", "increase", "max", "min", "avg", "count", "time", "abs"),
        *("by", "without", "on", "ignoring", "group_left", "group_right", "and", "or"),
        *("unless", "bool", "offset", "le", "histogram_quantile", "clamp_min", "delta"),
        *("deriv", "changes", "resets", "absent", "absent_over_time", "max_over_time"),
        *("min_over_time", "avg_over_time", "count_over_time", "label_replace", "topk"),
        *("bottomk", "vector", "scalar", "sort"),
    )
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label matchers, strings, ranges and
    keywords left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    words = set(re.findall(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {w for w in words if w not in _PROMQL_WORDS and not re.fullmatch(r"\d+[smhdw]", w)}


def rule_exprs() -> list[str]:
    """Every ``expr:`` of the rules file (one line each, as the file keeps them)."""
    exprs = [line.split("expr:", 1)[1].strip() for line in RULES.read_text().splitlines()
             if line.strip().startswith("expr:")]  # fmt: skip
    assert exprs
    return exprs


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in doc["panels"] for t in panel.get("targets", [])]
    assert exprs
    return exprs


def test_metric_names_of_an_expression() -> None:
    assert metric_names(
        'sum by (feed) (rate(relayd_datagrams_dropped_total{reason="x"}[5m])) > 0'
    ) == {"relayd_datagrams_dropped_total"}
    assert metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(relayd_a_bucket[5m]))) / process_max_fds"
    ) == {"relayd_a_bucket", "process_max_fds"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Sample names on /metrics of a relayd running a capture and an emit feed (each other's
    peer, on loopback) after it relayed some traffic. The sender, the emit feed and so the
    capture feed's source-specific joins use three loopback addresses: the emit feed's copies
    are not captured again."""
    tmp = tmp_path_factory.mktemp("kit")
    groups = pick_groups(3)
    config = tmp / "relayd.toml"
    config.write_text(loopback_pair_toml(groups))
    relayd = RelaydProcess(config, {})
    try:
        health = relayd.healthy_port(timeout=20)
        sent = subprocess.run(
            [sys.executable, "-m", "relayd", "send", "-i", "127.0.0.2", "--count", "200", "--rate",
             "2000", *(a for g, p in groups for a in ("--group", f"{g}:{p}"))],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert "sent 200 datagrams" in sent.stdout
        deadline = time.monotonic() + 20
        while "relayd_datagrams_out_total" not in get_text(health, "/metrics"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(2.5)  # one STATUS tick: rates and per-feed gauges filled in
        text = get_text(health, "/metrics")
        assert 'relayd_capture_datagrams_in_total{feed="kit"} 200\n' in text  # once, no loop
    finally:
        relayd.stop()
        relayd.kill()  # closes its stderr pipe
    return {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines()
             if line and not line.startswith("#")}  # fmt: skip


def test_rules_and_dashboard_use_only_exported_metrics(exported: set[str]) -> None:
    assert "process_cpu_seconds_total" in exported
    assert "relayd_build_info" in exported
    for source, exprs in (("rules", rule_exprs()), ("dashboard", dashboard_exprs())):
        for expr in exprs:
            names = metric_names(expr)
            assert names, (source, expr)
            unknown = names - exported - PROMETHEUS_OWN
            assert not unknown, f"{source}: {expr!r} reads {sorted(unknown)}, not exported"


def test_dashboard_is_importable_grafana_json() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["title"] == "relayd"
    assert doc["uid"]
    variables = {v["name"] for v in doc["templating"]["list"]}
    assert {"datasource", "instance", "feed"} <= variables
    ids = [panel["id"] for panel in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["title"]
        assert panel["gridPos"]["w"] > 0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (prometheus)")
def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
