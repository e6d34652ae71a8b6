"""The NLB stand-in (tests/helpers/nlb.py) steers new connections by per-feed health the way
the AWS NLB does: only to healthy targets, resetting connections to a target that turns
unhealthy, and to every target (fail open) when none is healthy."""

from __future__ import annotations

import subprocess
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from tests.helpers.netns import Netns, NetnsHarness, read_line
from tests.helpers.nlb import NlbStandIn, Target, haproxy_unavailable, helper_argv, render_config

FEED = "deribit"
FEED_PORT = 7000
HEALTH_PORT = 8080


def test_config_checks_each_target_and_fails_open_to_unchecked_backups(tmp_path: Path) -> None:
    targets = [
        Target("emit1", IPv4Address("10.0.0.1"), FEED_PORT, HEALTH_PORT),
        Target("emit2", IPv4Address("10.0.0.2"), FEED_PORT, HEALTH_PORT),
    ]
    text = render_config(
        listen=IPv4Address("127.0.0.1"),
        port=FEED_PORT,
        feed=FEED,
        targets=targets,
        admin_socket=tmp_path / "admin.sock",
        interval=0.1,
        rise=2,
        fall=3,
        check_timeout=0.5,
    )
    assert f"option httpchk GET /healthz/{FEED}" in text
    assert "rise 2 fall 3" in text
    assert "server emit1 10.0.0.1:7000 check port 8080 on-marked-down shutdown-sessions" in text
    assert "server emit2-open 10.0.0.2:7000 backup" in text
    assert "option allbackups" in text
    if haproxy_unavailable() is None:
        config = tmp_path / "haproxy.cfg"
        config.write_text(text)
        check = subprocess.run(
            ["haproxy", "-c", "-f", str(config)], capture_output=True, text=True, check=False
        )
        assert check.returncode == 0, check.stderr
    with pytest.raises(ValueError, match="at least one target"):
        render_config(
            listen=IPv4Address("127.0.0.1"),
            port=FEED_PORT,
            feed=FEED,
            targets=[],
            admin_socket=tmp_path / "admin.sock",
            interval=0.1,
            rise=2,
            fall=2,
            check_timeout=0.5,
        )


def _backend(netns: Netns, name: str, flag: Path) -> None:
    proc = netns.popen(
        helper_argv(
            "backend", "--name", name, "--feed", FEED, "--port", str(FEED_PORT),
            "--health-port", str(HEALTH_PORT), "--unhealthy-flag", str(flag),
        ),
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert read_line(proc, timeout=10.0).strip() == "ready"


def _greetings(client: Netns, address: IPv4Address, count: int) -> list[str]:
    argv = helper_argv("connect", str(address), str(FEED_PORT))
    return [client.run(argv).stdout.strip() for _ in range(count)]


@pytest.mark.netns
def test_nlb_standin_steers_new_connections_by_feed_health(
    netns: NetnsHarness, tmp_path: Path
) -> None:
    reason = haproxy_unavailable()
    if reason is not None:
        pytest.skip(reason)
    client, balancer = netns.namespace("client"), netns.namespace("nlb")
    emit1, emit2 = netns.namespace("emit1"), netns.namespace("emit2")
    front = netns.link(client, balancer)
    link1 = netns.link(balancer, emit1)
    link2 = netns.link(balancer, emit2)
    for emit, link in ((emit1, link1), (emit2, link2)):
        emit.run(["ip", "route", "add", "default", "via", str(link.a_addr.ip)])
    client.run(["ip", "route", "add", "default", "via", str(front.b_addr.ip)])
    flags = {name: tmp_path / f"{name}.unhealthy" for name in ("emit1", "emit2")}
    _backend(emit1, "emit1", flags["emit1"])
    _backend(emit2, "emit2", flags["emit2"])
    address = front.b_addr.ip
    nlb = NlbStandIn(
        balancer,
        listen=address,
        port=FEED_PORT,
        feed=FEED,
        targets=[
            Target("emit1", link1.b_addr.ip, FEED_PORT, HEALTH_PORT),
            Target("emit2", link2.b_addr.ip, FEED_PORT, HEALTH_PORT),
        ],
    )
    try:
        nlb.start()
        nlb.wait_state("emit1", up=True)
        nlb.wait_state("emit2", up=True)
        assert set(_greetings(client, address, 6)) == {"emit1", "emit2"}

        # A connection held open on emit1 is reset when emit1 turns unhealthy.
        held = None
        for _ in range(4):
            proc = client.popen(
                helper_argv("connect", str(address), str(FEED_PORT), "--hold"),
                stdout=subprocess.PIPE,
            )
            if read_line(proc, timeout=10.0).strip() == "emit1":
                held = proc
                break
            proc.kill()
        assert held is not None, "round robin never gave emit1"

        flags["emit1"].touch()
        nlb.wait_state("emit1", up=False)
        assert read_line(held, timeout=10.0).strip() in {"closed", "error ConnectionResetError"}
        assert set(_greetings(client, address, 6)) == {"emit2"}

        # No healthy target: fail open, every target gets connections again.
        flags["emit2"].touch()
        nlb.wait_state("emit2", up=False)
        assert set(_greetings(client, address, 8)) == {"emit1", "emit2"}

        flags["emit1"].unlink()
        nlb.wait_state("emit1", up=True)
        assert set(_greetings(client, address, 6)) == {"emit1"}
    except Exception:
        print(nlb.log())
        raise
    finally:
        nlb.close()
