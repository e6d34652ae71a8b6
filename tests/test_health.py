"""The health app and /metrics rendering, in-process and through a real hypercorn server."""

from __future__ import annotations

import contextlib
import json
import math
import socket
import time
from typing import Any

import pytest
import trio

import relayd.health
from relayd import __version__, fastpath
from relayd.health import FeedReport, HealthApp, health_body, process_samples, serve_health
from relayd.metrics import LatencyHistogram, Rate, render
from relayd.runtime import Sample
from tests.helpers.health_model import StaticHealthModel as Model
from tests.helpers.metrics import parse


def _prod(healthy: bool = True) -> FeedReport:
    return FeedReport("prod", "emit", healthy, "listening", {"connections": 1, "kind": "x"})


# -- /metrics rendering ------------------------------------------------------------------


def test_render_groups_families_and_escapes() -> None:
    samples = [
        Sample("frames_in_total", "counter", "Frames received.", (("feed", "a"),), 3),
        Sample("active_connections", "gauge", "Open connections.", (("feed", "a"),), 1),
        # A counter named without _total gets it.
        Sample("frames_in", "counter", "Frames received.", (("feed", "b"),), 4.5),
        Sample(
            "drops_total",
            "counter",
            'Drops.\nBy "reason" \\ cause.',
            (("feed", 'we"ird\\na\nme'), ("reason", "group")),
            7,
        ),
        # Same family, another type: dropped rather than producing an invalid exposition.
        Sample("frames_in_total", "gauge", "x", (("feed", "c"),), 9),
        Sample("big", "gauge", "x", (), math.inf),
    ]
    text = render(samples)
    families = parse(text)
    assert list(families) == [
        "relayd_frames_in",
        "relayd_active_connections",
        "relayd_drops",
        "relayd_big",
    ]
    frames = families["relayd_frames_in"]
    assert frames.type == "counter"
    assert frames.documentation == "Frames received."
    assert [s[:3] for s in frames.samples] == [
        ("relayd_frames_in_total", {"feed": "a"}, 3.0),
        ("relayd_frames_in_total", {"feed": "b"}, 4.5),
    ]
    assert [s[:3] for s in families["relayd_active_connections"].samples] == [
        ("relayd_active_connections", {"feed": "a"}, 1.0)
    ]
    drops = families["relayd_drops"]
    assert drops.documentation == 'Drops.\nBy "reason" \\ cause.'
    assert drops.samples[0][1] == {"feed": 'we"ird\\na\nme', "reason": "group"}
    assert 'feed="we\\"ird\\\\na\\nme"' in text
    assert 'relayd_frames_in_total{feed="a"} 3\n' in text
    assert families["relayd_big"].samples[0][2] == math.inf
    assert text.count("# TYPE relayd_frames_in_total") == 1
    assert render([]) == ""


def test_histogram_buckets_are_exact_and_cumulative() -> None:
    h = LatencyHistogram(buckets=4)  # le 1, 2, 4, 8 µs and +Inf
    for ns in (0, -5, 1000, 1001, 2000, 2001, 4000, 8000, 8001, 10**9):
        h.observe_ns(ns)
    samples = list(h.samples("latency_seconds", (("feed", "prod"),), "Capture to emit."))
    families = parse(render(samples))
    fam = families["relayd_latency_seconds"]
    assert fam.type == "histogram"
    assert fam.documentation == "Capture to emit."
    buckets = [(labels["le"], value) for name, labels, value, *_ in fam.samples if "bucket" in name]
    # <=1µs: 0, -5 (as 0), 1000; <=2µs: +1001, 2000; <=4µs: +2001, 4000; <=8µs: +8000
    assert buckets == [("1e-06", 3), ("2e-06", 5), ("4e-06", 7), ("8e-06", 8), ("+Inf", 10)]
    by_name = {name: value for name, _, value, *_ in fam.samples if "bucket" not in name}
    assert by_name["relayd_latency_seconds_count"] == 10
    total_ns = 1000 + 1001 + 2000 + 2001 + 4000 + 8000 + 8001 + 10**9
    assert by_name["relayd_latency_seconds_sum"] == pytest.approx(total_ns / 1e9)
    assert all(labels["feed"] == "prod" for _, labels, _, *_ in fam.samples)


def test_histogram_default_range_and_cost() -> None:
    h = LatencyHistogram()
    assert h.bounds_seconds[0] == 1e-06
    assert h.bounds_seconds[-1] == pytest.approx(33.554432)
    n = 200_000
    t0 = time.perf_counter()
    for i in range(n):
        h.observe_ns(i * 1733)
    per_call = (time.perf_counter() - t0) / n
    assert h.count == n
    assert per_call < 5e-6, f"observe_ns took {per_call * 1e9:.0f} ns"


def test_rate_over_a_window() -> None:
    r = Rate(window=10.0)
    assert r.per_second() == 0.0
    r.update(0, now=0.0)
    r.update(100, now=2.0)
    assert r.per_second() == 50.0
    for t in range(4, 30, 2):
        r.update(100 + (t - 2) * 10, now=float(t))
    assert r.per_second() == pytest.approx(10.0)
    r.update(5, now=30.0)  # the counter restarted
    assert r.per_second() == 0.0
    r.update(25, now=31.0)
    assert r.per_second() == 20.0


# -- the app, routed directly ------------------------------------------------------------


def test_healthz_ok_unhealthy_and_config_errors() -> None:
    model = Model([_prod(), FeedReport("dev", "emit", True, "streaming", {"connections": 2})])
    app = HealthApp(model)
    status, headers, body = app.respond("GET", "/healthz")
    assert status == 200
    assert (b"content-type", b"application/json") in headers
    doc = json.loads(body)
    assert doc == {
        "status": "ok",
        "version": __version__,
        "uptime_seconds": 12.346,
        "data_path": fastpath.active(),
        "config_errors": [],
        "feeds": {
            "prod": {"kind": "emit", "healthy": True, "state": "listening", "connections": 1},
            "dev": {"kind": "emit", "healthy": True, "state": "streaming", "connections": 2},
        },
    }
    # A failed reload is shown, but the old config still serves: still 200.
    model.errors = ("bad ttl @ $.emit[0].ttl",)
    status, _, body = app.respond("GET", "/healthz")
    assert status == 200
    assert json.loads(body)["config_errors"] == ["bad ttl @ $.emit[0].ttl"]
    model.reports[1] = FeedReport("dev", "emit", False, "failed", {"last_error": "boom"})
    status, _, body = app.respond("GET", "/healthz")
    assert status == 503
    assert json.loads(body)["status"] == "unhealthy"
    # Each feed's own path only looks at that feed.
    assert app.respond("GET", "/healthz/prod")[0] == 200
    status, _, body = app.respond("GET", "/healthz/dev")
    assert status == 503
    assert list(json.loads(body)["feeds"]) == ["dev"]
    status, _, body = app.respond("GET", "/healthz/nope")
    assert status == 404
    assert "nope" in json.loads(body)["error"]


def test_no_feeds_is_healthy_and_stopping_is_not() -> None:
    model = Model()
    assert health_body(model) == (
        200,
        {
            "status": "ok",
            "version": __version__,
            "uptime_seconds": 12.346,
            "data_path": fastpath.active(),
            "config_errors": [],
            "feeds": {},
        },
    )
    model.is_stopping = True
    answer = health_body(model)
    assert answer is not None
    assert answer[0] == 503
    assert answer[1]["status"] == "stopping"


def test_same_name_capture_and_emit_are_told_apart() -> None:
    model = Model(
        [
            FeedReport("prod", "capture", True, "streaming", {}),
            FeedReport("prod", "emit", False, "listening", {}),
        ]
    )
    app = HealthApp(model)
    status, _, body = app.respond("GET", "/healthz")
    assert status == 503
    assert list(json.loads(body)["feeds"]) == ["capture/prod", "emit/prod"]
    assert app.respond("GET", "/healthz/capture/prod")[0] == 200
    assert app.respond("GET", "/healthz/emit/prod")[0] == 503
    assert app.respond("GET", "/healthz/prod")[0] == 503


def test_a_feed_not_ready_is_503_on_its_path_only() -> None:
    """A standby emit feed (healthy, not ready): its NLB target group's check fails, while
    the instance stays healthy, so neither the host check nor a container health check
    replaces a standby host."""
    model = Model(
        [
            FeedReport("prod", "emit", True, "standby", {"role": {"role": "standby"}}, 0, False),
            FeedReport("dev", "emit", True, "streaming", {}),
        ]
    )
    app = HealthApp(model)
    status, _, body = app.respond("GET", "/healthz")
    assert status == 200
    doc = json.loads(body)
    assert doc["status"] == "ok"
    assert doc["feeds"]["prod"]["ready"] is False
    assert "ready" not in doc["feeds"]["dev"]
    status, _, body = app.respond("GET", "/healthz/prod")
    assert status == 503
    assert json.loads(body)["status"] == "not ready"
    assert app.respond("GET", "/healthz/dev")[0] == 200


def test_routes_methods_and_metrics() -> None:
    model = Model([_prod()], extra=[Sample("x_total", "counter", "X.", (), 1)])
    app = HealthApp(model)
    assert app.respond("GET", "/")[0] == 404
    assert app.respond("GET", "/healthzz")[0] == 404
    assert app.respond("GET", "/healthz/")[0] == 404
    assert app.respond("POST", "/nothing")[0] == 404
    status, headers, _ = app.respond("POST", "/healthz")
    assert status == 405
    assert (b"allow", b"GET, HEAD") in headers
    assert app.respond("DELETE", "/metrics")[0] == 405
    status, headers, body = app.respond("GET", "/metrics")
    assert status == 200
    assert (b"content-type", b"text/plain; version=0.0.4; charset=utf-8") in headers
    families = parse(body.decode())
    assert [s[:3] for s in families["relayd_x"].samples] == [("relayd_x_total", {}, 1.0)]
    rss = families["process_resident_memory_bytes"].samples[0][2]
    assert 1e6 < rss < 1e10
    fds = families["process_open_fds"].samples[0][2]
    assert 3 <= fds < 10000
    build = families["relayd_build_info"].samples[0]
    assert build[1]["version"] == __version__
    assert build[1]["data_path"] == fastpath.active()
    assert build[2] == 1


def test_build_info_names_the_python_data_path_when_chosen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RELAYD_DATAPATH", "python")
    build = next(s for s in process_samples(time.time()) if s.name == "build_info")
    assert ("data_path", "python") in build.labels


# -- through hypercorn --------------------------------------------------------------------


async def _request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on a fresh connection; returns status, headers, body."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(raw)
            data = b""
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, body


def _get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()


async def test_served_by_hypercorn_on_port_zero() -> None:
    model = Model([_prod()])
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(
            lambda task_status: serve_health(
                HealthApp(model),
                "127.0.0.1",
                0,
                shutdown_trigger=stop.wait,
                task_status=task_status,
            )
        )
        assert host == "127.0.0.1"
        assert port > 0
        status, headers, body = await _request(port, _get("/healthz"))
        assert status == 200
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["feeds"]["prod"]["healthy"] is True
        assert int(headers["content-length"]) == len(body)
        status, headers, body = await _request(port, _get("/healthz", "HEAD"))
        assert status == 200
        assert body == b""
        assert int(headers["content-length"]) > 0
        status, _, body = await _request(port, _get("/metrics"))
        assert status == 200
        assert "process_open_fds" in parse(body.decode())
        assert (await _request(port, _get("/other")))[0] == 404
        status, headers, _ = await _request(port, _get("/healthz", "PUT"))
        assert status == 405
        assert headers["allow"] == "GET, HEAD"
        t0 = trio.current_time()
        stop.set()
    assert trio.current_time() - t0 < 3


async def test_bind_conflict_raises_a_plain_os_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="in use"):
            await serve_health(
                HealthApp(Model()), "127.0.0.1", port, shutdown_trigger=trio.sleep_forever
            )


async def test_idle_and_slow_clients_do_not_block_health(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hundreds of connections from one source that never finish a request: /healthz from
    another source (the load balancer) still answers at once, and the idle ones are closed
    after the keep-alive timeout, or shed before."""
    monkeypatch.setattr(relayd.health, "KEEP_ALIVE_TIMEOUT", 1.0)
    monkeypatch.setattr(relayd.health, "READ_TIMEOUT", 1)
    stop = trio.Event()
    idle: list[socket.socket] = []
    try:
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(
                lambda task_status: serve_health(
                    HealthApp(Model([_prod()])),
                    "127.0.0.1",
                    0,
                    shutdown_trigger=stop.wait,
                    task_status=task_status,
                )
            )
            for i in range(300):
                s = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
                idle.append(s)
                if i % 2:  # half send a partial request line and then stall
                    with contextlib.suppress(ConnectionResetError):  # shed already
                        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            await trio.sleep(0.1)
            worst = 0.0
            for _ in range(20):
                t0 = time.perf_counter()
                status, _, _ = await _request(port, _get("/healthz"))
                worst = max(worst, time.perf_counter() - t0)
                assert status == 200
            # NLB health checks time out after 2 s at the least; measured: a few ms.
            assert worst < 2.0, f"slowest /healthz took {worst * 1000:.0f} ms"
            # After the timeouts every idle connection has been closed by the server.
            await trio.sleep(2.5)
            closed = 0
            for s in idle:
                s.setblocking(False)
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    data = b""
                closed += 1 if data == b"" or data.startswith(b"HTTP/1.1") else 0
            assert closed == len(idle)
            stop.set()
    finally:
        for s in idle:
            s.close()


def test_feed_report_detail_never_overrides_core_fields() -> None:
    report = FeedReport("a", "emit", False, "failed", {"healthy": True, "state": "x", "n": 1})
    doc: dict[str, Any] = report.as_json()
    assert doc == {"kind": "emit", "healthy": False, "state": "failed", "n": 1}


def test_process_metrics_have_the_standard_names() -> None:
    families = parse(HealthApp(Model([_prod()])).respond("GET", "/metrics")[2].decode())
    # prometheus_client names a counter's family without its _total suffix
    for name in ("process_cpu_seconds", "process_start_time_seconds", "process_max_fds"):
        assert name in families
    assert not [
        name
        for name in families
        if name.startswith("relayd_process_") and name != "relayd_process_uptime_seconds"
    ]


async def test_a_flood_of_idle_clients_is_shed_by_source_and_counted() -> None:
    """At most ``connection_limit`` health connections, a quarter per source: a flood of idle
    clients from one address holds 2 of 8, the rest are shed (counted), and a probe from
    another address is answered throughout."""
    stop = trio.Event()
    idle: list[socket.socket] = []
    shed_before = relayd.health.HEALTH_SHED.total
    try:
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(
                lambda task_status: serve_health(
                    HealthApp(Model([_prod()])),
                    "127.0.0.1",
                    0,
                    shutdown_trigger=stop.wait,
                    connection_limit=8,
                    task_status=task_status,
                )
            )
            for _ in range(50):
                idle.append(
                    socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
                )
                status, _, _ = await _request(port, _get("/healthz"))
                assert status == 200
            with trio.fail_after(5):
                while relayd.health.HEALTH_SHED.total - shed_before < 50 - 2:
                    await trio.sleep(0.01)
            held = 0
            for s in idle:  # the ones still open have not been told anything yet
                s.setblocking(False)
                try:
                    held += 1 if s.recv(1) else 0
                except BlockingIOError:
                    held += 1
                except ConnectionResetError:
                    pass
            assert held == 2
            samples = {s.name: s.value for s in process_samples(0.0)}
            assert samples["health_connections_shed_total"] >= 50 - 2
            stop.set()
    finally:
        for s in idle:
            s.close()
    assert relayd.health.health_connection_limit(256) == 32
    assert relayd.health.health_connection_limit(16) == 8
    assert relayd.health.health_connection_limit(1 << 20) == 256
