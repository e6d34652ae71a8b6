"""A host inside ``allowed_sources`` without the key, opening silent connections as fast as it
can, while the capture side must reconnect over a path with 20 ms one-way delay.

netem is not in every kernel: the delay comes from tests/chaos/agent.py ``delay``, a TCP proxy
in the capture side's namespace that holds each direction back by 20 ms, and the path
failure is that proxy resetting the connection it carries.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from tests.chaos.topology import EMIT_PORT, Relay, every, report, scaled
from tests.helpers.metrics import value as metric
from tests.helpers.netns import read_line

pytestmark = [pytest.mark.netns, pytest.mark.slow]

RATE = 5_000
FLOOD_RATE = 4_000
ONE_WAY_DELAY = 0.02
PROXY = "127.0.0.1:7667"


def _json_line(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, object]:
    out, _ = proc.communicate(timeout=timeout)
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    result: dict[str, object] = json.loads(lines[-1])
    return result


def test_a_silent_flood_cannot_lock_out_the_capture_side(relay: Relay) -> None:
    proxy = relay.agent(
        relay.dc, "delay",
        "--listen", PROXY,
        "--target", f"{relay.path.b_addr.ip}:{EMIT_PORT}",
        "--delay", str(ONE_WAY_DELAY),
    )  # fmt: skip
    assert read_line(proxy, 10.0).strip() == "ready"
    relay.edge.sysctl("net.ipv4.ip_local_port_range", "1024 65535")  # the flood's own ports
    relay.start(capture=relay.capture_toml(targets=f'["{PROXY}"]'))
    seconds = scaled(10.0, 45.0)
    stream = relay.stream(RATE, seconds + 6)
    relay.wait_flowing()
    flood = relay.agent(
        relay.edge, "silent",
        "--target", f"{relay.attack.b_addr.ip}:{EMIT_PORT}",
        "--rate", str(FLOOD_RATE), "--duration", str(seconds),
    )  # fmt: skip
    for _ in every(0.1, 5.0):  # the flood is on when the emit side starts evicting
        if metric(relay.metrics("emit"), "connections_rejected_total", reason="pending_limit"):
            break
    every_second = list(every(1.0, 1.5))  # one more second of flood at full rate
    assert every_second
    accepted = metric(relay.metrics("emit"), "connections_accepted_total")
    os.kill(proxy.pid, signal.SIGUSR1)  # the path fails: the capture side must reconnect
    back_after = None
    for elapsed in every(0.05, seconds):
        if flood.poll() is not None:
            break  # the flood is over: a reconnect from now on proves nothing
        if metric(relay.metrics("emit"), "connections_accepted_total") > accepted:
            back_after = elapsed
            break
    attack = _json_line(flood, seconds + 30)
    result = stream.result(timeout=90)
    evicted = metric(relay.metrics("emit"), "connections_rejected_total", reason="pending_limit")
    capture_state = relay.health("capture")[1]["feeds"]["chaos"]["state"]
    proxy.send_signal(signal.SIGTERM)
    carried = _json_line(proxy, 10)
    report(
        "silent flood during a reconnect (20 ms one-way)",
        seconds=seconds,
        flood_rate=FLOOD_RATE,
        attack=attack,
        proxy=carried,
        evicted_pending=evicted,
        back_after_s=None if back_after is None else round(back_after, 3),
        stream=result,
    )
    assert int(carried.get("cuts", 0)) == 1, carried  # type: ignore[call-overload]
    assert int(attack.get("attempts", 0)) > FLOOD_RATE * seconds * 0.5, attack  # type: ignore[call-overload]
    assert evicted > FLOOD_RATE * seconds * 0.25  # the flood reached the pending cap
    assert back_after is not None, relay.log_text("emit.log")[-3000:]  # during the flood
    assert result["lost"] == 0, result  # the replay buffer covers the reconnect
    assert capture_state == "streaming"
