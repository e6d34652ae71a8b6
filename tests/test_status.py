"""``relayd status`` against a real health server (hypercorn on a free port)."""

from __future__ import annotations

import argparse
import io
import json
import socket
from collections.abc import AsyncIterator, Iterable, Sequence

import attrs
import pytest
import trio

from relayd.cli import main as cli_main
from relayd.health import FeedReport, HealthApp, serve_health
from relayd.runtime import Sample
from relayd.tools.status import format_age, format_uptime, main


@attrs.define
class Model:
    reports: list[FeedReport] = attrs.field(factory=list)
    errors: tuple[str, ...] = ()

    def feed_reports(self) -> Sequence[FeedReport]:
        return self.reports

    def config_errors(self) -> Sequence[str]:
        return self.errors

    def uptime_seconds(self) -> float:
        return 3725.0

    def stopping(self) -> bool:
        return False

    def samples(self) -> Iterable[Sample]:
        return []


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
            FeedReport("dev", "emit", True, "listening", {"connections": []}),
        ]
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


async def run_status(url: str, *, as_json: bool = False) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    args = argparse.Namespace(url=url, json=as_json, timeout=3.0)
    code = await trio.to_thread.run_sync(lambda: main(args, out, err))
    return code, out.getvalue(), err.getvalue()


async def test_healthy_table(server: tuple[Model, str]) -> None:
    _, url = server
    code, out, err = await run_status(url)
    assert code == 0
    assert err == ""
    lines = out.splitlines()
    assert lines[0].startswith("relayd ")
    assert lines[0].endswith(": ok, up 1h02m")
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
    assert lines[3].split() == ["dev", "emit", "listening", "yes", "0", "-", "-"]
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
    assert "dc: last error: OSError: no such device" in out
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
    # A server that answers something else (here: relayd's 404 for an unknown path).
    code, _, err = await run_status(url + "/healthz/nothing")
    assert code == 3
    assert "answered HTTP 404" in err
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
    assert format_age(None) == "-"
    assert format_age(0.5) == "500ms ago"
    assert format_age(61) == "61.0s ago"
    assert format_age(600) == "10m ago"
    assert format_age(36000) == "10.0h ago"
    assert format_uptime(59) == "0m59s"
    assert format_uptime(90061) == "1d01h01m"
