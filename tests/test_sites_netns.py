"""One capture feed streaming to two sites, London and Tokyo, as ``relayd run`` processes in
network namespaces (issue 14 item 5):

    exch ──veth── dc (relayd run: capture, two sites) ──veth── lon (relayd run: emit) ── lonc
                                                       └─veth── tok (relayd run: emit) ── tokc

A sender in ``exch`` multicasts at a steady rate, each payload carrying its group's own
sequence; a receiver at each site's customer (``lonc``, ``tokc``) checks every datagram. The
dc-Tokyo link is cut for 10 s mid-stream.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.netns import Netns, NetnsHarness, read_line, stop_process
from tests.helpers.relayd_process import emit_toml, groups_arg, peer_argv, process_toml
from tests.helpers.steady import lost_and_duplicated

pytestmark = [pytest.mark.netns, pytest.mark.slow]

GROUPS = [("239.51.0.1", 32001), ("239.51.0.2", 32001), ("239.51.0.3", 32002)]
RATE = 2000
SECONDS = 24.0
CUT_AT = 4.0
OUTAGE = 10.0


def capture_toml(interface: str, london: str, tokyo: str) -> str:
    groups = ", ".join(f'"{g}:{p}"' for g, p in GROUPS)
    return f"""
[[capture]]
name = "deribit"
interface = "{interface}"
groups = [{groups}]
heartbeat_interval = "500ms"
idle_timeout = "2s"
connect_timeout = "1s"

[[capture.site]]
name = "london"
targets = ["{london}:6667"]

[[capture.site]]
name = "tokyo"
targets = ["{tokyo}:6667"]
"""


def wait_healthy(ns: Netns, timeout: float = 30.0, path: str = "/healthz") -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            code, body = ns.http_get(f"http://127.0.0.1:8080{path}")
        except Exception:
            code, body = 0, ""
        if code == 200:
            doc: dict[str, Any] = json.loads(body)
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"{ns.label}: not healthy within {timeout} s: {code} {body}")
        time.sleep(0.3)


def relayd(ns: Netns, tmp_path: Path, toml: str) -> subprocess.Popen[bytes]:
    path = tmp_path / f"{ns.label}.toml"
    path.write_text(toml)
    return ns.popen(
        ns.relayd_argv("run", "--config", str(path)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def check(got: list[list[Any]], sent: dict[tuple[str, int], int]) -> tuple[int, int, bool]:
    """(lost, duplicated, in order per group) of what a receiver got."""
    per_group: dict[tuple[str, int], list[int]] = {}
    for group, port, seq in got:
        per_group.setdefault((group, port), []).append(seq)
    return lost_and_duplicated(per_group, sent)


def test_london_loses_nothing_while_tokyo_is_cut_off_and_tokyo_catches_up(
    netns: NetnsHarness, tmp_path: Path
) -> None:
    exch, dc = netns.namespace("exch"), netns.namespace("dc")
    lon, tok = netns.namespace("lon"), netns.namespace("tok")
    lonc, tokc = netns.namespace("lonc"), netns.namespace("tokc")
    ingress = netns.link(exch, dc)
    to_lon = netns.link(dc, lon)
    to_tok = netns.link(dc, tok)
    lon_out = netns.link(lon, lonc)
    tok_out = netns.link(tok, tokc)
    for site, up, out in ((lon, to_lon, lon_out), (tok, to_tok, tok_out)):
        relayd(
            site,
            tmp_path,
            process_toml(
                emit_toml(
                    "deribit",
                    listen=f"{up.b_ip}:6667",
                    interface=out.a_dev,
                    loop=False,
                    sources=f"{up.a_addr.network}",
                    groups="239.51.0.0/16",
                ),
                health="127.0.0.1:8080",
            ),
        )
    for site in (lon, tok):
        wait_healthy(site)
    relayd(
        dc,
        tmp_path,
        process_toml(
            capture_toml(ingress.b_dev, to_lon.b_ip, to_tok.b_ip), health="127.0.0.1:8080"
        ),
    )
    doc = wait_healthy(dc, path="/healthz/deribit")
    sites = doc["feeds"]["deribit"]["sites"]
    assert {name: s["state"] for name, s in sites.items()} == {
        "london": "streaming",
        "tokyo": "streaming",
    }
    receivers = {}
    for name, cust, out in (("london", lonc, lon_out), ("tokyo", tokc, tok_out)):
        proc = cust.popen(
            peer_argv("receive", "--interface", out.b_ip, "--groups", groups_arg(GROUPS),
                      "--duration", "120", "--quiet", "20"),
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert read_line(proc, 15).strip() == "ready"
        receivers[name] = proc
    sender = exch.popen(
        exch.python_argv("-m", "tests.helpers.steady", "--interface", ingress.a_ip,
                         "--groups", groups_arg(GROUPS), "--rate", str(RATE),
                         "--seconds", str(SECONDS)),
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert read_line(sender, 15).strip() == "sending"
    time.sleep(CUT_AT)
    to_tok.set_up(False)
    try:
        time.sleep(OUTAGE / 2)
        code, body = dc.http_get("http://127.0.0.1:8080/healthz/deribit")
        during = json.loads(body)["feeds"]["deribit"]
        time.sleep(OUTAGE / 2)
    finally:
        to_tok.set_up(True)
    sent_line = read_line(sender, SECONDS + 30)
    sent = {(g, p): n for g, p, n in json.loads(sent_line)["sent"]}
    results = {}
    for name, proc in receivers.items():
        received_out, _ = proc.communicate(timeout=120)
        results[name] = json.loads(received_out.decode().splitlines()[-1])["got"]
    final = wait_healthy(dc, path="/healthz/deribit")["feeds"]["deribit"]
    stop_process(sender)
    total = sum(sent.values())
    print(f"sent {total}; during the outage: {json.dumps(during['sites'])}")
    print(f"after: {json.dumps(final['sites'])}")
    assert code in (200, 503)  # a site reconnecting is healthy for reconnect_budget
    assert during["sites"]["london"]["state"] == "streaming"
    assert during["sites"]["tokyo"]["state"] in ("reconnecting", "stalled")
    assert check(results["london"], sent) == (0, 0, True)
    assert check(results["tokyo"], sent) == (0, 0, True)
    assert final["sites"]["tokyo"]["replay_dropped_datagrams"] == 0
    assert final["sites"]["london"]["replay_dropped_datagrams"] == 0
