"""``relayd status`` against a real health server (hypercorn on a free port)."""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from relayd import fastpath
from relayd.cli import main as cli_main
from relayd.health import FeedReport, HealthApp, serve_health
from relayd.tools import status
from relayd.tools.status import (
    choose_url,
    format_age,
    format_uptime,
    health_url,
    main,
    render_table,
    upstream_line,
    url_from_config,
)
from tests.helpers.health_model import StaticHealthModel as Model

EMIT_FEED = """
[[emit]]
name = "prod"
listen = "0.0.0.0:6000"
interface = "127.0.0.1"
allowed_sources = ["10.0.0.0/8"]
allowed_groups = ["239.0.0.0/8"]
"""


@pytest.fixture
async def server() -> AsyncIterator[tuple[Model, str]]:
    model = Model(
        [
            FeedReport(
                "prod",
                "emit",
                True,
                "streaming",
                {
                    "connections": [{"peer": "10.0.0.1:5000"}],
                    "datagrams_per_second": 1234.56,
                    "last_datagram_age_seconds": 0.012,
                },
            ),
            FeedReport(
                "dev",
                "emit",
                True,
                "listening",
                {"connections": [], "last_datagram_age_seconds": None},
            ),
        ],
        uptime=3725.0,
    )
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(
            lambda task_status: serve_health(
                HealthApp(model),
                "127.0.0.1",
                0,
                shutdown_trigger=stop.wait,
                task_status=task_status,
            )
        )
        yield model, f"http://127.0.0.1:{port}"
        stop.set()


async def run_status(
    url: str | None, *, as_json: bool = False, config: Path | None = None
) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    args = argparse.Namespace(url=url, config=config, json=as_json, timeout=3.0)
    code = await trio.to_thread.run_sync(lambda: main(args, out, err))
    return code, out.getvalue(), err.getvalue()


async def test_healthy_table(server: tuple[Model, str]) -> None:
    _, url = server
    code, out, err = await run_status(url)
    assert code == 0
    assert err == ""
    lines = out.splitlines()
    assert lines[0].startswith("relayd ")
    assert lines[0].endswith(f" at {url}: ok, up 1h02m, data path {fastpath.active()}")
    assert lines[1].split() == [
        "FEED",
        "KIND",
        "STATE",
        "HEALTHY",
        "CONNECTIONS",
        "DATAGRAMS/S",
        "LAST",
        "DATAGRAM",
    ]
    assert lines[2].split() == ["prod", "emit", "streaming", "yes", "1", "1234.6", "12ms", "ago"]
    assert lines[3].split() == ["dev", "emit", "listening", "yes", "0", "-", "none"]
    # Columns line up.
    assert lines[1].index("STATE") == lines[2].index("streaming") == lines[3].index("listening")


async def test_unhealthy_and_config_errors(server: tuple[Model, str]) -> None:
    model, url = server
    model.reports.append(
        FeedReport("dc", "capture", False, "failed", {"last_error": "OSError: no such device"})
    )
    model.errors = ("invalid value @ $.emit[0].ttl",)
    code, out, _ = await run_status(url + "/")
    assert code == 1
    assert ": unhealthy, up " in out
    assert "dc    capture  failed     NO       0" in out
    assert "dc: not healthy: failed; last error: OSError: no such device" in out
    assert "the last reload failed (1 problems); the old config serves:" in out
    assert "  invalid value @ $.emit[0].ttl" in out
    code, out, _ = await run_status(url, as_json=True)
    assert code == 1
    doc = json.loads(out)
    assert doc["feeds"]["dc"]["state"] == "failed"
    assert doc["config_errors"] == ["invalid value @ $.emit[0].ttl"]


async def test_unreachable_and_not_relayd(server: tuple[Model, str]) -> None:
    _, url = server
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    code, out, err = await run_status(f"http://127.0.0.1:{free}")
    assert code == 3
    assert out == ""
    assert err.startswith(f"relayd status: cannot reach http://127.0.0.1:{free}/healthz: ")
    # A server that answers something else (here: relayd's 404 for an unknown feed).
    code, _, err = await run_status(url + "/healthz/nothing")
    assert code == 3
    assert "/healthz/nothing answered HTTP 404" in err
    code, _, err = await run_status("ftp://example.invalid")
    assert code == 3
    assert "not an http:// URL" in err


async def test_through_the_cli(
    server: tuple[Model, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, url = server
    code = await trio.to_thread.run_sync(lambda: cli_main(["status", "--url", url, "--json"]))
    assert code == 0
    assert json.loads(capsys.readouterr().out)["status"] == "ok"


def test_formatting() -> None:
    assert format_age(None) == "none"
    assert format_age("soon") == "-"
    assert format_age(0.5) == "500ms ago"
    assert format_age(61) == "61.0s ago"
    assert format_age(600) == "10m ago"
    assert format_age(36000) == "10.0h ago"
    assert format_uptime(59) == "0m59s"
    assert format_uptime(90061) == "1d01h01m"


async def test_url_forms(server: tuple[Model, str]) -> None:
    _, url = server
    hostport = url.removeprefix("http://")
    code, out, _ = await run_status(hostport)
    assert code == 0
    assert f" at {url}: ok" in out
    code, out, _ = await run_status(url + "/healthz/prod")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["prod"]
    assert health_url("10.0.0.5:8080") == "http://10.0.0.5:8080/healthz"
    assert health_url("http://h:1/healthz/") == "http://h:1/healthz"
    assert health_url("http://h:1/proxy/") == "http://h:1/proxy/healthz"
    assert health_url("https://h/healthz/prod") == "https://h/healthz/prod"


async def test_the_health_port_comes_from_the_config(
    server: tuple[Model, str], tmp_path: Path
) -> None:
    _, url = server
    port = url.rsplit(":", 1)[1]
    config = tmp_path / "relayd.toml"
    config.write_text(f'[health]\nlisten = "0.0.0.0:{port}"\n' + EMIT_FEED)
    code, out, err = await run_status(None, config=config)
    assert (code, err) == (0, "")
    assert f"at http://127.0.0.1:{port}: ok" in out
    config.write_text(f'[health]\nlisten = "[::]:{port}"\n' + EMIT_FEED)
    assert url_from_config(config) == f"http://[::1]:{port}/healthz"
    config.write_text("[health]\nlisten = 8080\n")
    code, out, err = await run_status(None, config=config)
    assert (code, out) == (2, "")
    assert err.startswith(f"relayd status: {config}: ")
    assert err.endswith("(or give --url)\n")


def test_without_url_or_config_the_default_file_then_the_default_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(status, "DEFAULT_CONFIG_PATH", tmp_path / "missing.toml")
    assert choose_url(None, None) == "http://127.0.0.1:8080/healthz"
    present = tmp_path / "relayd.toml"
    present.write_text('[health]\nlisten = "10.1.2.3:9000"\n' + EMIT_FEED)
    monkeypatch.setattr(status, "DEFAULT_CONFIG_PATH", present)
    assert choose_url(None, None) == "http://10.1.2.3:9000/healthz"
    assert choose_url("h:1", present) == "http://h:1/healthz"


def test_an_unreadable_default_config_falls_back_to_the_default_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """/etc/relayd/relayd.toml is root:relayd 0640 on the appliance: a plain user still gets
    an answer, and a word on why it is the default port."""
    present = tmp_path / "relayd.toml"
    present.write_text('[health]\nlisten = "10.1.2.3:9000"\n' + EMIT_FEED)
    monkeypatch.setattr(status, "DEFAULT_CONFIG_PATH", present)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert choose_url(None, None) == "http://127.0.0.1:8080/healthz"
    assert capsys.readouterr().err == (
        f"relayd status: cannot read {present} (run as root or in group relayd, or give --url);"
        " asking http://127.0.0.1:8080/healthz\n"
    )


def test_reasons_and_upstream_gaps() -> None:
    doc = {
        "status": "unhealthy",
        "feeds": {
            "dc": {
                "kind": "capture",
                "state": "disconnected",
                "healthy": False,
                "disconnected_for": 12.4,
                "last_error": "emit.example:6000: cannot resolve: [Errno -2] Name or service"
                " not known",
            },
            "cloud": {
                "kind": "emit",
                "state": "failing",
                "healthy": False,
                "sending_failed": True,
                "upstream_gaps": 3,
                "last_error": "multicast send: ENETUNREACH",
            },
            "new": {"kind": "emit", "state": "starting", "healthy": False},
        },
    }
    text = render_table(doc)
    assert (
        "dc: not healthy: disconnected for 12s; last error: emit.example:6000: cannot resolve"
        in text
    )
    assert "cloud: not healthy: failing; multicast sends fail; last error: multicast send" in text
    assert "new: not healthy: starting; not ready yet" in text
    header = text.splitlines()[1]
    assert header.endswith("UPSTREAM GAPS")
    assert text.splitlines()[3].split()[-1] == "3"
    assert text.splitlines()[2].split()[-1] == "-"
    assert "UPSTREAM GAPS" not in render_table({"feeds": {"x": {"healthy": True}}})


def test_arbitration_lines() -> None:
    deribit = {
        "mode": "deribit",
        "deribit_layout": "frame-v1",
        "duplicates": 5066,
        "gaps": 1,
        "missing": 2,
        "overlaps": 0,
        "resets": 0,
        "held_now": 0,
        "sent_by_source": {"10.0.0.1": 3, "10.0.0.2": 1},
    }
    doc = {
        "feeds": {
            "ab": {"kind": "emit", "healthy": True, "arbitration": deribit},
            "twice": {
                "kind": "emit",
                "healthy": True,
                "arbitration": {"mode": "none", "concurrent_sessions": 2},
            },
            "plain": {
                "kind": "emit",
                "healthy": True,
                "arbitration": {"mode": "none", "concurrent_sessions": 0},
            },
        }
    }
    lines = render_table(doc).splitlines()
    assert (
        "ab: arbitration deribit (frame-v1): 5066 duplicates suppressed, 1 gaps (2 missing), "
        "0 overlaps, 0 resets, 0 held now; sent by source: 10.0.0.1 75.0%, 10.0.0.2 25.0%"
    ) in lines
    assert (
        "twice: 2 capture sessions started while another streamed, without arbitration: "
        "each sent every datagram again"
    ) in lines
    assert not any(line.startswith("plain:") for line in lines)


def test_a_gate_that_held_emission_back_gets_a_line() -> None:
    doc = {
        "feeds": {
            "held": {
                "kind": "emit",
                "healthy": True,
                "emit_gated": 3,
                "emit_gated_seconds": 1.234,
            },
            "never": {"kind": "emit", "healthy": True, "emit_gated": 0, "emit_gated_seconds": 0},
        }
    }
    lines = render_table(doc).splitlines()
    assert (
        "held: emit gate held datagrams back 3 times, 1.2 s in all (a claim, a stale lease "
        "after a freeze or a starved observer, or standby)"
    ) in lines
    assert not any(line.startswith("never:") for line in lines)


def test_upstream_line_names_the_worst_channel_and_stays_quiet_without_loss() -> None:
    check = {
        "layout": "sbe",
        "gaps": 4,
        "missing": 9,
        "duplicates": 2,
        "resets": 0,
        "top_channels": [{"channel": "239.1.1.1:6100#3", "gaps": 3, "missing": 8, "duplicates": 0}],
    }
    doc = {
        "status": "ok",
        "feeds": {
            "dc": {"kind": "capture", "state": "streaming", "healthy": True, "upstream": check},
            "clean": {
                "kind": "capture",
                "state": "streaming",
                "healthy": True,
                "upstream": {"layout": "frame-v1", "gaps": 0, "duplicates": 0, "resets": 0},
            },
        },
    }
    text = render_table(doc)
    assert (
        "dc: upstream (sbe): 4 gaps, 9 missing, 2 duplicates, 0 resets; most on channel "
        "239.1.1.1:6100#3 (3 gaps, 8 missing, 0 duplicates)"
    ) in text
    assert "clean: upstream" not in text
    assert upstream_line({"upstream": "garbage"}) == ""


def test_a_capture_feed_with_sites_has_a_row_per_site() -> None:
    """Issue 14 item 5: a feed streaming to London and Tokyo shows each site, and why one is
    not healthy."""
    doc = {
        "status": "unhealthy",
        "feeds": {
            "deribit": {
                "kind": "capture",
                "state": "disconnected",
                "healthy": False,
                "connections": 1,
                "sites": {
                    "london": {"state": "streaming", "healthy": True},
                    "tokyo": {
                        "state": "disconnected",
                        "healthy": False,
                        "disconnected_for": 14.2,
                        "last_error": "10.1.0.5:6667: [Errno 111] Connection refused",
                    },
                },
            }
        },
    }
    lines = render_table(doc).splitlines()
    assert lines[3].split() == ["deribit/london", "site", "streaming", "yes", "1", "-", "-"]
    assert lines[4].split() == ["deribit/tokyo", "site", "disconnected", "NO", "0", "-", "-"]
    assert (
        "deribit/tokyo: not healthy: disconnected for 14s; last error: 10.1.0.5:6667: "
        "[Errno 111] Connection refused"
    ) in lines


def test_role_reason_and_split_brain() -> None:
    doc = {
        "feeds": {
            "standby": {
                "kind": "emit",
                "state": "standby",
                "healthy": True,
                "ready": False,
                "role": {
                    "role": "standby",
                    "reason": "another relay (10.0.0.2) emits the feed's groups, last seen 0.1 s",
                    "split_brain": False,
                    "split_brains": 2,
                    "other_relays": [{"source": "10.0.0.2"}],
                },
            },
            "split": {
                "kind": "emit",
                "state": "streaming",
                "healthy": True,
                "role": {
                    "role": "active",
                    "reason": None,
                    "split_brain": True,
                    "split_brains": 1,
                    "other_relays": [{"source": "10.0.0.3"}],
                },
            },
            "calm": {"kind": "emit", "state": "streaming", "healthy": True, "role": {}},
        },
    }
    text = render_table(doc)
    assert "standby: not ready: standby; another relay (10.0.0.2) emits the feed's groups" in text
    assert "standby: split-brain events: 2 (resolved; role standby)" in text
    assert "split: SPLIT-BRAIN: this host and 10.0.0.3 emit the feed (1)" in text
    assert "calm:" not in text


def test_claim_lines() -> None:
    doc = {
        "feeds": {
            "new": {
                "kind": "emit",
                "state": "streaming",
                "healthy": True,
                "role": {
                    "role": "claiming",
                    "claim_seconds": 0.3,
                    "claiming_for_seconds": 0.12,
                    "claims": {"won": 0, "yielded": 0},
                },
            },
            "gave": {
                "kind": "emit",
                "state": "standby",
                "healthy": True,
                "role": {"role": "standby", "claims": {"won": 2, "yielded": 1}},
            },
            "calm": {
                "kind": "emit",
                "state": "streaming",
                "healthy": True,
                "role": {"role": "active", "claims": {"won": 1, "yielded": 0}},
            },
        },
    }
    text = render_table(doc)
    assert "new: CLAIMING for 0.12 s of 0.3 s: streams held, nothing emitted" in text
    assert "gave: claims: 2 won, 1 yielded to another relay (role standby)" in text
    assert "calm:" not in text
