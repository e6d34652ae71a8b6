"""Every relayd metric the Terraform alarms and dashboard read exists on a running relayd.

terraform/modules/relay/relayd-metrics.json is the one list: the CloudWatch agent ships those
metrics (namespace, dimensions relay and feed) and the alarms and dashboard use only them (the
Terraform tests check that side). Here a real ``relayd run`` on loopback (an emit feed,
and a capture feed of the same name streaming to it) is scraped and each listed metric must be
on ``/metrics`` with its type and a ``feed`` label for the feed. The
metrics issue 14 adds are expected to be missing until it lands: strict xfail, so their
arrival fails this test until they move into the "metrics" list (and their alarms are on).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import metrics
from tests.helpers.loopback import free_tcp_port
from tests.helpers.relayd_process import (
    RelaydProcess,
    emit_toml,
    get_text,
    pick_groups,
    process_toml,
)

METRICS_FILE = (
    Path(__file__).resolve().parent.parent / "terraform/modules/relay/relayd-metrics.json"
)
SPEC: dict[str, Any] = json.loads(METRICS_FILE.read_text())
FEED = "prod"


def capture_toml(name: str, target: int) -> str:
    """A capture feed streaming to the emit feed on ``target``, counting the exchange's gaps
    (``relayd_upstream_*`` come from a capture feed with ``upstream_check``)."""
    group_list = ", ".join(f'"{group}:{port}"' for group, port in pick_groups(1))
    return f"""
[[capture]]
name = "{name}"
interface = "127.0.0.1"
groups = [{group_list}]
targets = ["127.0.0.1:{target}"]
upstream_check = "deribit"
"""


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[metrics.Families]:
    config = tmp_path_factory.mktemp("cloudwatch") / "relayd.toml"
    port = free_tcp_port()
    config.write_text(
        process_toml(emit_toml(FEED, listen=f"127.0.0.1:{port}"), capture_toml(FEED, port))
    )
    relayd = RelaydProcess(config, {})
    try:
        health = relayd.health_port()
        relayd.wait_line("ready")
        yield metrics.parse(get_text(health, "/metrics"))
    finally:
        relayd.kill()


def _check(families: metrics.Families, metric: dict[str, str]) -> None:
    name = metric["name"]
    # prometheus_client names a counter's family without its _total suffix
    family_name = name.removesuffix("_total") if metric["type"] == "counter" else name
    assert family_name in families, f"{name} is not on /metrics"
    family = families[family_name]
    assert family.type == metric["type"], (
        f"{name} is a {family.type}, the list says {metric['type']}"
    )
    feeds = {sample.labels.get("feed") for sample in family.samples}
    assert FEED in feeds, f"{name} has no sample with feed={FEED!r}: {family.samples}"


@pytest.mark.parametrize("metric", SPEC["metrics"], ids=lambda m: m["name"])
def test_listed_metric_exists(scraped: metrics.Families, metric: dict[str, str]) -> None:
    _check(scraped, metric)


def test_list_is_consistent() -> None:
    """Unique keys and names, the agent's dimensions are labels relayd or the scrape sets."""
    every = SPEC["metrics"]
    assert len({m["key"] for m in every}) == len(every)
    assert len({m["name"] for m in every}) == len(every)
    assert all(m["name"].startswith("relayd_") for m in every)
    assert all(m["type"] in ("counter", "gauge") for m in every)  # the agent drops histograms
    assert all(m["name"].endswith("_total") == (m["type"] == "counter") for m in every)
    assert SPEC["dimensions"] == ["relay", "feed"]
