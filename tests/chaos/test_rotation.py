"""A full key rotation on both sides during a 20k/s authenticated stream, with a forced
reconnect on the new key, and a flood of wrong-key HELLOs: nothing lost."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest

from tests.chaos.topology import EMIT_PORT, Relay, every, report, scaled
from tests.helpers.metrics import value as metric

pytestmark = [pytest.mark.netns, pytest.mark.slow]

RATE = 20_000


def _write_key(path: Path) -> None:
    """A new key, written as a secrets agent would: a new file renamed into place."""
    staging = path.with_suffix(".tmp")
    staging.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    staging.chmod(0o400)
    staging.replace(path)


def _reload(relay: Relay, which: str, config: str) -> None:
    path = relay.workdir / f"{which}.toml"
    before = metric(relay.metrics(which), "reloads_total", result="ok")
    staging = path.with_suffix(".new")
    staging.write_text(config)
    staging.replace(path)
    relay.hup(which)
    for _ in every(0.1, 10.0):
        if metric(relay.metrics(which), "reloads_total", result="ok") > before:
            return
    raise AssertionError(f"{which} did not reload")


def test_key_rotation_during_the_stream(relay: Relay) -> None:
    relay.start()
    seconds = 16.0
    stream = relay.stream(RATE, seconds, idle=6.0)
    keys = relay.workdir / "keys"
    time.sleep(1.5)
    # 1. The emit side accepts the old and the new key.
    _write_key(keys / "new.key")
    _reload(relay, "emit", relay.emit_toml(auth_key_files='["keys/feed.key", "keys/new.key"]'))
    # 2. The capture side switches to the new key (its current connection stays up).
    _reload(relay, "capture", relay.capture_toml(auth_key_file='"keys/new.key"'))
    # 3. The emit side drops the old key.
    _reload(relay, "emit", relay.emit_toml(auth_key_files='["keys/new.key"]'))
    # 4. Force a reconnect: it must authenticate with the new key, and resend what the cut
    # kept from the emit side.
    relay.path.set_up(False)
    time.sleep(3.0)  # longer than idle_timeout (2 s): both sides give the connection up
    relay.path.set_up(True)
    result = stream.result(timeout=90)
    emit_text, capture_text = relay.metrics("emit"), relay.metrics("capture")
    accepted = metric(emit_text, "connections_accepted_total")
    refused = metric(emit_text, "connections_rejected_total", reason="auth")
    _, doc, _ = relay.health("capture")
    report(
        "key rotation during the stream",
        stream=result,
        emit_connections_accepted=accepted,
        emit_rejected_auth=refused,
        capture_connects_ok=metric(capture_text, "capture_connects", result="ok"),
        capture_resent=metric(capture_text, "capture_resent_datagrams"),
        emit_restarts=metric(emit_text, "feed_restarts_total"),
    )
    assert result["lost"] == 0, result
    assert result["dup"] == 0
    assert accepted >= 2  # the first connection, and the reconnect on the new key
    assert refused == 0
    assert doc["feeds"]["chaos"]["state"] == "streaming"


def test_wrong_key_flood(relay: Relay) -> None:
    relay.start()
    seconds = scaled(8.0, 60.0)
    stream = relay.stream(RATE, seconds + 4)
    flood = relay.agent(
        relay.edge, "authflood",
        "--target", f"{relay.attack.b_addr.ip}:{EMIT_PORT}",
        "--feed", "chaos", "--duration", str(seconds),
    )  # fmt: skip
    statuses = [relay.health("emit")[0] for _ in every(0.5, seconds)]
    out, _ = flood.communicate(timeout=seconds + 30)
    attack = json.loads(out.decode().splitlines()[-1])
    result = stream.result(timeout=60)
    text = relay.metrics("emit")
    refused = metric(text, "connections_rejected_total", reason="auth")
    log_lines = [
        line for line in relay.log_text("emit.log").splitlines() if "authentication failed" in line
    ]
    report(
        "wrong-key flood",
        seconds=seconds,
        attack=attack,
        rejected_auth=refused,
        auth_log_lines=len(log_lines),
        health_non_200=sum(1 for s in statuses if s != 200),
        stream=result,
    )
    assert result["lost"] == 0, result
    assert attack["auth_failed"] > seconds * 20, attack
    assert refused == attack["auth_failed"]  # every one counted
    assert len(log_lines) <= seconds / 10 + 2  # and logged once per 10 s
    assert all(s == 200 for s in statuses)
