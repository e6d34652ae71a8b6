"""The configuration model: example files, defaults, every refusal with its exact message,
agreement with docs/CONFIG.md, and a fuzz test that only ConfigError ever escapes."""

from __future__ import annotations

import ctypes
import math
import os
import re
import select
import textwrap
import threading
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.config import (
    MAX_CONFIG_BYTES,
    MAX_DURATION,
    MAX_NESTING,
    CaptureFeed,
    Config,
    ConfigError,
    EmitFeed,
    Endpoint,
    GroupPort,
    HealthConfig,
    PortRange,
    ProcessConfig,
    key_file_warnings,
    load_config,
    parse_config,
)
from relayd.units import parse_duration

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "etc" / "relayd"

EMIT = """
[[emit]]
name = "dev"
listen = "0.0.0.0:6666"
interface = "ens5"
allowed_sources = ["10.20.0.0/24"]
allowed_groups = ["239.111.111.0/27"]
"""

CAPTURE = """
[[capture]]
name = "dev"
interface = "eth1"
groups = ["239.111.111.1:6100"]
targets = ["relay.example.com:6666"]
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text))
    return list(info.value.errors)


def emit_with(**lines: str) -> str:
    """The minimal emit feed with keys replaced or added (values are TOML)."""
    base = dict(re.findall(r"^(\w+) = (.*)$", EMIT, re.MULTILINE))
    base.update(lines)
    return "[[emit]]\n" + "".join(f"{key} = {value}\n" for key, value in base.items())


def capture_with(**lines: str) -> str:
    base = dict(re.findall(r"^(\w+) = (.*)$", CAPTURE, re.MULTILINE))
    base.update(lines)
    return "[[capture]]\n" + "".join(f"{key} = {value}\n" for key, value in base.items())


# --------------------------------------------------------------------------------------------
# The example files


def test_cloud_example_loads() -> None:
    config = load_config(EXAMPLES / "relayd.toml")
    assert config.health.listen == Endpoint("0.0.0.0", 8080)
    assert [(f.name, f.listen.port) for f in config.emit] == [("prod", 6667), ("dev", 6666)]
    prod = config.emit_feed("prod")
    assert prod is not None
    assert prod.interface == "ens5"
    assert prod.ttl == 16
    assert prod.loop is False
    assert prod.allowed_groups == (IPv4Network("239.111.111.0/27"),)
    assert prod.allowed_ports == (PortRange(6100, 6101),)
    assert prod.max_datagram_size == 8500
    assert all(net.is_private for net in prod.allowed_sources)
    assert prod.auth_key_files == (Path("/etc/relayd/keys/prod.key"),)
    assert config.capture == ()


def test_capture_example_loads() -> None:
    config = load_config(EXAMPLES / "capture.example.toml")
    assert config.emit == ()
    prod = config.capture_feed("prod")
    assert prod is not None
    expected = {
        GroupPort(IPv4Address(f"239.111.111.{i}"), port) for i in range(22) for port in (6100, 6101)
    }
    assert set(prod.groups) == expected
    assert len(prod.groups) == 44  # more than one socket's 20 memberships
    assert prod.targets == (Endpoint("relay-nlb.example.com", 6667),)
    assert prod.receive_buffer == 16 * 1024**2
    assert prod.replay_max_bytes == 64 * 1024**2
    assert prod.replay_max_age == 30.0


def test_example_feeds_pair_up() -> None:
    """Every capture feed of the data-centre example targets the port of the cloud example's
    emit feed of the same name, and sends only groups and ports that feed allows."""
    cloud = load_config(EXAMPLES / "relayd.toml")
    dc = load_config(EXAMPLES / "capture.example.toml")
    for capture in dc.capture:
        emit = cloud.emit_feed(capture.name)
        assert emit is not None, capture.name
        assert {t.port for t in capture.targets} == {emit.listen.port}
        assert all(emit.allows(g.group, g.port) for g in capture.groups)


# --------------------------------------------------------------------------------------------
# Defaults


def test_empty_file_is_refused() -> None:
    # A truncated or empty file must not pass check-config and then stop every feed on reload.
    with pytest.raises(ConfigError) as info:
        parse_config("")
    assert info.value.errors == ("no feeds: add at least one [[emit]] or [[capture]] table @ $",)


def test_sections_default() -> None:
    config = parse_config(EMIT)
    assert config.process == ProcessConfig(log_level="info", log_format="text")
    assert config.health == HealthConfig(listen=Endpoint("0.0.0.0", 8080))


def test_emit_defaults() -> None:
    (feed,) = parse_config(EMIT).emit
    assert feed == EmitFeed(
        name="dev",
        listen=Endpoint("0.0.0.0", 6666),
        interface="ens5",
        allowed_sources=(IPv4Network("10.20.0.0/24"),),
        allowed_groups=(IPv4Network("239.111.111.0/27"),),
        ttl=16,
        loop=False,
        allowed_ports=(PortRange(1, 65535),),
        max_connections=4,
        hello_timeout=5.0,
        heartbeat_interval=1.0,
        idle_timeout=5.0,
        send_buffer=4 * 1024**2,
        max_datagram_size=8500,
        auth_key_files=(),
    )


def test_capture_defaults() -> None:
    (feed,) = parse_config(CAPTURE).capture
    assert feed == CaptureFeed(
        name="dev",
        interface="eth1",
        groups=(GroupPort(IPv4Address("239.111.111.1"), 6100),),
        targets=(Endpoint("relay.example.com", 6666),),
        receive_buffer=16 * 1024**2,
        replay_max_bytes=64 * 1024**2,
        replay_max_age=30.0,
        heartbeat_interval=1.0,
        idle_timeout=5.0,
        connect_timeout=3.0,
        reconnect_budget=10.0,
        auth_key_file=None,
    )


def test_max_datagram_size_bounds_are_inclusive() -> None:
    for size in (1, 1472, 65507):
        (feed,) = parse_config(emit_with(max_datagram_size=str(size))).emit
        assert feed.max_datagram_size == size


def test_arbitration_settings_and_bounds() -> None:
    (feed,) = parse_config(EMIT).emit
    assert (feed.arbitration, feed.deribit_layout) == ("none", "frame-v1")
    assert (feed.arbitration_hold_timeout, feed.arbitration_content_window) == (0.05, 2.0)
    (feed,) = parse_config(
        emit_with(
            arbitration='"deribit"',
            deribit_layout='"sbe"',
            arbitration_hold_timeout="0",
            arbitration_content_window='"60s"',
        )
    ).emit
    assert (feed.arbitration, feed.deribit_layout) == ("deribit", "sbe")
    assert (feed.arbitration_hold_timeout, feed.arbitration_content_window) == (0.0, 60.0)
    (feed,) = parse_config(
        emit_with(arbitration_hold_timeout='"1s"', arbitration_content_window='"10ms"')
    ).emit
    assert (feed.arbitration_hold_timeout, feed.arbitration_content_window) == (1.0, 0.01)
    with pytest.raises(ConfigError) as caught:
        parse_config(
            emit_with(
                arbitration='"sequence"',
                deribit_layout='"v2"',
                arbitration_hold_timeout='"1001ms"',
                arbitration_content_window='"9ms"',
            )
        )
    assert list(caught.value.errors) == [
        "invalid value 'sequence', expected one of: none, deribit, content @ $.emit[0].arbitration",
        "invalid value 'v2', expected one of: frame-v1, sbe @ $.emit[0].deribit_layout",
        "invalid duration '1001ms': must be between 0 and 1s @ $.emit[0].arbitration_hold_timeout",
        "invalid duration '9ms': must be between 10ms and 1m "
        "@ $.emit[0].arbitration_content_window",
    ]


def test_busy_poll_is_off_by_default_and_bounded() -> None:
    """The latency mode: 0 (off) up to 10ms on both feed kinds, microseconds allowed."""
    defaults = parse_config(emit_with() + capture_with())
    assert defaults.emit[0].busy_poll == defaults.capture[0].busy_poll == 0.0
    config = parse_config(emit_with(busy_poll='"50us"') + capture_with(busy_poll='"10ms"'))
    assert config.emit[0].busy_poll == pytest.approx(50e-6)
    assert config.capture[0].busy_poll == pytest.approx(0.01)
    assert parse_config(emit_with(busy_poll="0")).emit[0].busy_poll == 0.0
    assert errors_of(emit_with(busy_poll='"11ms"') + capture_with(busy_poll="true")) == [
        "invalid duration '11ms': must be between 0 (off) and 10ms @ $.emit[0].busy_poll",
        "invalid value for type, expected duration @ $.capture[0].busy_poll (got true)",
    ]


def test_values_in_units() -> None:
    text = emit_with(
        hello_timeout='"250ms"',
        heartbeat_interval="2",
        idle_timeout='"1m30s"',
        send_buffer='"64KiB"',
        ttl="255",
        loop="true",
        max_connections="1",
        allowed_ports='[6100, "6101", "7000-7010"]',
        interface='"10.0.1.5"',
        listen='"127.0.0.1:0"',
    )
    (feed,) = parse_config(text).emit
    assert (feed.hello_timeout, feed.heartbeat_interval, feed.idle_timeout) == (0.25, 2.0, 90.0)
    assert feed.send_buffer == 65536
    assert (feed.ttl, feed.loop, feed.max_connections) == (255, True, 1)
    assert feed.allowed_ports == (
        PortRange(6100, 6100),
        PortRange(6101, 6101),
        PortRange(7000, 7010),
    )
    assert feed.interface == "10.0.1.5"
    assert feed.listen == Endpoint("127.0.0.1", 0)


def test_config_is_frozen_and_hashable() -> None:
    first = parse_config(EMIT + CAPTURE)
    second = parse_config(EMIT + CAPTURE)
    assert first == second
    assert hash(first) == hash(second)
    assert isinstance(first.emit, tuple)
    assert isinstance(first.emit[0].allowed_groups, tuple)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        first.emit[0].ttl = 3  # type: ignore[misc]
    changed = parse_config(emit_with(ttl="17") + CAPTURE)
    assert changed.emit != first.emit
    assert changed.capture == first.capture


# --------------------------------------------------------------------------------------------
# Value types


def test_endpoint_parse_and_str() -> None:
    assert Endpoint.parse("0.0.0.0:6667") == Endpoint("0.0.0.0", 6667)
    assert Endpoint.parse("nlb.example.com:6667") == Endpoint("nlb.example.com", 6667)
    assert Endpoint.parse("[::1]:8080") == Endpoint("::1", 8080)
    assert str(Endpoint("::1", 8080)) == "[::1]:8080"
    assert str(Endpoint("10.0.0.1", 1)) == "10.0.0.1:1"
    assert Endpoint.parse("127.0.0.1:0", allow_port_zero=True).port == 0
    with pytest.raises(ValueError, match=r"port 0 out of range 1\.\.65535"):
        Endpoint.parse("127.0.0.1:0")


def test_group_port_and_port_range() -> None:
    group = GroupPort.parse("239.111.111.21:6101")
    assert group == GroupPort(IPv4Address("239.111.111.21"), 6101)
    assert str(group) == "239.111.111.21:6101"
    ports = PortRange.parse("6100-6101")
    assert 6100 in ports
    assert 6101 in ports
    assert 6099 not in ports
    assert 6102 not in ports
    assert "6100" not in ports
    assert str(ports) == "6100-6101"
    assert str(PortRange.parse(53)) == "53"


def test_allows() -> None:
    text = emit_with(
        allowed_groups='["239.111.111.0/27", "239.1.2.3/32"]',
        allowed_ports='["6100-6101", 7000]',
    )
    (feed,) = parse_config(text).emit
    cases = {
        ("239.111.111.0", 6100): True,
        ("239.111.111.31", 6101): True,
        ("239.111.111.32", 6100): False,
        ("239.111.110.255", 6100): False,
        ("239.1.2.3", 7000): True,
        ("239.1.2.4", 7000): False,
        ("239.111.111.5", 6102): False,
        ("239.111.111.5", 6099): False,
    }
    for (group, port), allowed in cases.items():
        assert feed.allows(IPv4Address(group), port) is allowed, (group, port)
        assert feed.allows(int(IPv4Address(group)), port) is allowed, (group, port)


# --------------------------------------------------------------------------------------------
# Each broken configuration, with its exact messages


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "tll = 3\n[process]\nlog_levle = 'info'\n" + EMIT,
            [
                "unknown key 'tll' @ $",
                "unknown key 'log_levle' (did you mean 'log_level'?) @ $.process",
            ],
            id="unknown-key-top-and-process",
        ),
        pytest.param(
            emit_with(tll="3", colour='"red"'),
            ["unknown key 'colour'; unknown key 'tll' (did you mean 'ttl'?) @ $.emit[0]"],
            id="unknown-keys-in-feed",
        ),
        pytest.param(
            EMIT + EMIT.replace("6666", "6667"),
            ["duplicate feed name 'dev' (also $.emit[0].name) @ $.emit[1].name"],
            id="duplicate-emit-name",
        ),
        pytest.param(
            CAPTURE + CAPTURE + CAPTURE,
            [
                "duplicate feed name 'dev' (also $.capture[0].name) @ $.capture[1].name",
                "duplicate feed name 'dev' (also $.capture[0].name) @ $.capture[2].name",
            ],
            id="duplicate-capture-name",
        ),
        pytest.param(
            EMIT + EMIT.replace('"dev"', '"prod"'),
            ["port 6666 is already used by $.emit[0].listen @ $.emit[1].listen"],
            id="two-emit-listeners-one-port",
        ),
        pytest.param(
            emit_with(listen='"10.0.0.5:8080"'),
            ["port 8080 is already used by $.health.listen @ $.emit[0].listen"],
            id="emit-on-default-health-port",
        ),
        pytest.param(
            "[health]\nlisten = '127.0.0.1:6666'\n" + EMIT,
            ["port 6666 is already used by $.health.listen @ $.emit[0].listen"],
            id="health-on-emit-port",
        ),
        pytest.param(
            capture_with(groups='["240.1.1.1:6100", "10.0.0.1:6100"]'),
            [
                "group 240.1.1.1 is not a multicast address (224.0.0.0/4) @ $.capture[0].groups[0]",
                "group 10.0.0.1 is not a multicast address (224.0.0.0/4) @ $.capture[0].groups[1]",
            ],
            id="group-outside-multicast",
        ),
        pytest.param(
            capture_with(groups='["224.0.0.251:5353"]'),
            ["group 224.0.0.251 is in the link-local range 224.0.0.0/24 @ $.capture[0].groups[0]"],
            id="group-link-local",
        ),
        pytest.param(
            emit_with(allowed_groups='["239.0.0.0/8", "10.0.0.0/8", "224.0.0.0/4"]'),
            [
                "group range 10.0.0.0/8 is not inside the multicast range 224.0.0.0/4"
                " @ $.emit[0].allowed_groups[1]",
                "group range 224.0.0.0/4 overlaps the link-local range 224.0.0.0/24"
                " @ $.emit[0].allowed_groups[2]",
            ],
            id="allowed-groups-outside-or-link-local",
        ),
        pytest.param(
            capture_with(
                groups='["239.1.1.1:0", "239.1.1.1:65536"]',
                targets='["relay.example.com:70000"]',
            ),
            [
                "invalid group '239.1.1.1:0': port 0 out of range 1..65535"
                " @ $.capture[0].groups[0]",
                "invalid group '239.1.1.1:65536': port 65536 out of range 1..65535"
                " @ $.capture[0].groups[1]",
                "invalid address 'relay.example.com:70000': port 70000 out of range 1..65535"
                " @ $.capture[0].targets[0]",
            ],
            id="ports-out-of-range",
        ),
        pytest.param(
            emit_with(allowed_ports='[0, "6101-6100", "1-65536", "x"]', listen='"0.0.0.0:-1"'),
            [
                "invalid address '0.0.0.0:-1': port '-1' is not a number @ $.emit[0].listen",
                "port 0 out of range 1..65535 @ $.emit[0].allowed_ports[0]",
                "invalid port range '6101-6100': 6101 > 6100 @ $.emit[0].allowed_ports[1]",
                "invalid port range '1-65536': port 65536 out of range 1..65535"
                " @ $.emit[0].allowed_ports[2]",
                "invalid port range 'x': port 'x' is not a number @ $.emit[0].allowed_ports[3]",
            ],
            id="allowed-ports-and-listen-port",
        ),
        pytest.param(
            emit_with(allowed_sources='["10.20.0.1/24", "10.20.0.0/33", "fd00::/8", "x"]'),
            [
                "invalid CIDR '10.20.0.1/24': host bits set (did you mean 10.20.0.0/24?)"
                " @ $.emit[0].allowed_sources[0]",
                "invalid CIDR '10.20.0.0/33': expected an IPv4 network like 10.0.0.0/8"
                " @ $.emit[0].allowed_sources[1]",
                "invalid CIDR 'fd00::/8': expected an IPv4 network like 10.0.0.0/8"
                " @ $.emit[0].allowed_sources[2]",
                "invalid CIDR 'x': expected an IPv4 network like 10.0.0.0/8"
                " @ $.emit[0].allowed_sources[3]",
            ],
            id="bad-cidrs",
        ),
        pytest.param(
            emit_with(
                hello_timeout='"5x"',
                heartbeat_interval='"-1s"',
                idle_timeout="0",
                send_buffer='"4MB2"',
            ),
            [
                "invalid duration '5x': unknown unit 'x' (use us, ms, s, m, h)"
                " @ $.emit[0].hello_timeout",
                "invalid duration '-1s': must not be negative @ $.emit[0].heartbeat_interval",
                "invalid duration 0: must be > 0 @ $.emit[0].idle_timeout",
                "invalid size '4MB2': expected a number with a unit"
                " (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB) @ $.emit[0].send_buffer",
            ],
            id="bad-durations-and-sizes",
        ),
        pytest.param(
            capture_with(
                receive_buffer='"2GiB"',
                replay_max_bytes='"64KiB"',
                replay_max_age="true",
                connect_timeout="[1]",
            ),
            [
                "invalid size '2GiB': must be at most 1GiB @ $.capture[0].receive_buffer",
                "invalid size '64KiB': must be at least 128KiB @ $.capture[0].replay_max_bytes",
                "invalid value for type, expected duration @ $.capture[0].replay_max_age"
                " (got true)",
                "invalid value for type, expected duration @ $.capture[0].connect_timeout"
                " (got an array)",
            ],
            id="size-bounds-and-duration-types",
        ),
        pytest.param(
            emit_with(ttl='"16"', loop="1", max_connections="true", name="6"),
            [
                "invalid value for type, expected str @ $.emit[0].name (got 6)",
                'invalid value for type, expected int @ $.emit[0].ttl (got "16")',
                "invalid value for type, expected bool @ $.emit[0].loop (got 1)",
                "invalid value for type, expected int @ $.emit[0].max_connections (got true)",
            ],
            id="strict-types",
        ),
        pytest.param(
            emit_with(ttl="0", max_connections="0"),
            [
                "0 out of range 1..255 @ $.emit[0].ttl",
                "0 out of range >= 1 @ $.emit[0].max_connections",
            ],
            id="int-ranges",
        ),
        pytest.param(
            emit_with(max_datagram_size="0"),
            ["0 out of range 1..65507 @ $.emit[0].max_datagram_size"],
            id="max-datagram-size-zero",
        ),
        pytest.param(
            emit_with(max_datagram_size="65508"),
            ["65508 out of range 1..65507 @ $.emit[0].max_datagram_size"],
            id="max-datagram-size-over-udp",
        ),
        pytest.param(
            emit_with(max_datagram_size='"8KiB"'),
            ['invalid value for type, expected int @ $.emit[0].max_datagram_size (got "8KiB")'],
            id="max-datagram-size-type",
        ),
        pytest.param(
            emit_with(idle_timeout='"9999999999h"', hello_timeout="1e300")
            + capture_with(
                heartbeat_interval='"600h"',
                idle_timeout='"601h"',
                connect_timeout='"500us"',
                replay_max_age='"25h"',
                replay_max_bytes='"1TiB"',
            ),
            [
                "invalid duration 1e+300: must be between 1ms and 24h @ $.emit[0].hello_timeout",
                "invalid duration '9999999999h': must be between 1ms and 24h"
                " @ $.emit[0].idle_timeout",
                "invalid size '1TiB': must be at most 4GiB @ $.capture[0].replay_max_bytes",
                "invalid duration '25h': must be between 1ms and 24h @ $.capture[0].replay_max_age",
                "invalid duration '600h': must be between 1ms and 24h"
                " @ $.capture[0].heartbeat_interval",
                "invalid duration '601h': must be between 1ms and 24h @ $.capture[0].idle_timeout",
                "invalid duration '500us': must be between 1ms and 24h"
                " @ $.capture[0].connect_timeout",
            ],
            id="durations-and-replay-bounded-to-what-the-daemon-honours",
        ),
        pytest.param(
            emit_with(listen='"[::]:6667"')
            + capture_with(targets='["relay.example.com:6666", "[2001:db8::1]:6666"]'),
            [
                "invalid address '[::]:6667': IPv6 is not supported here yet"
                " (use an IPv4 address or a host name) @ $.emit[0].listen",
                "invalid address '[2001:db8::1]:6666': IPv6 is not supported here yet"
                " (use an IPv4 address or a host name) @ $.capture[0].targets[1]",
            ],
            id="ipv6-feeds-refused",
        ),
        pytest.param(
            emit_with(interface='"255.255.255.255"')
            + emit_with(name='"b"', listen='"0.0.0.0:1"', interface='"0.0.0.0"')
            + capture_with(interface='"239.1.1.1"'),
            [
                "invalid interface '255.255.255.255': the limited broadcast address; expected"
                " an interface name or the unicast IPv4 address of an interface"
                " @ $.emit[0].interface",
                "invalid interface '0.0.0.0': not a host address (0.0.0.0/8 means this"
                " network); expected an interface name or the unicast IPv4 address of an"
                " interface @ $.emit[1].interface",
                "invalid interface '239.1.1.1': a multicast address; expected an interface"
                " name or the unicast IPv4 address of an interface @ $.capture[0].interface",
            ],
            id="interface-addresses-are-unicast-hosts",
        ),
        pytest.param(
            emit_with(heartbeat_interval='"5s"'),
            [
                "idle_timeout (5s) must be longer than heartbeat_interval (5s)"
                " @ $.emit[0].idle_timeout"
            ],
            id="idle-not-above-heartbeat",
        ),
        pytest.param(
            "[[emit]]\nname = 'dev'\n",
            [
                "required key missing @ $.emit[0].listen",
                "required key missing @ $.emit[0].interface",
                "required key missing @ $.emit[0].allowed_sources",
                "required key missing @ $.emit[0].allowed_groups",
            ],
            id="required-keys",
        ),
        pytest.param(
            "[emit]\nname = 'dev'\n",
            ["expected an array of tables ([[emit]]) @ $.emit"],
            id="table-instead-of-array",
        ),
        pytest.param(
            "emit = [1]\nprocess = 3\n",
            [
                "invalid value for type, expected table @ $.process (got 3)",
                "invalid value for type, expected table @ $.emit[0] (got 1)",
            ],
            id="not-tables",
        ),
        pytest.param(
            "[process]\nlog_level = 'verbose'\nlog_format = 'xml'\n" + EMIT,
            [
                "invalid value 'verbose', expected one of: debug, info, warning, error"
                " @ $.process.log_level",
                "invalid value 'xml', expected one of: text, json @ $.process.log_format",
            ],
            id="enumerations",
        ),
        pytest.param(
            emit_with(name='"Prod"', interface='"a-very-long-name0"')
            + capture_with(interface='"10.0.0"', name='""'),
            [
                "invalid feed name 'Prod': 1 to 63 of a-z, 0-9, '_' and '-',"
                " starting with a letter or digit @ $.emit[0].name",
                "invalid interface 'a-very-long-name0': expected an interface name or IPv4"
                " address @ $.emit[0].interface",
                "invalid feed name '': 1 to 63 of a-z, 0-9, '_' and '-',"
                " starting with a letter or digit @ $.capture[0].name",
                "invalid interface '10.0.0': bad IPv4 address @ $.capture[0].interface",
            ],
            id="names-and-interfaces",
        ),
        pytest.param(
            capture_with(
                groups='["239.1.1.1:6100", "239.1.1.1:6100"]',
                targets='["a.example:1", "::1:5", ":6666", "bad_host:1", "a.example:1"]',
            ),
            [
                "duplicate 239.1.1.1:6100 (also at [0]) @ $.capture[0].groups[1]",
                "invalid address '::1:5': write IPv6 addresses as [addr]:port"
                " @ $.capture[0].targets[1]",
                "invalid address ':6666': missing host (use 0.0.0.0 for all)"
                " @ $.capture[0].targets[2]",
                "invalid address 'bad_host:1': bad host name @ $.capture[0].targets[3]",
                "duplicate a.example:1 (also at [0]) @ $.capture[0].targets[4]",
            ],
            id="duplicates-and-addresses",
        ),
        pytest.param(
            emit_with(allowed_sources="[]", allowed_groups="[]", allowed_ports="[]"),
            [
                "must not be empty @ $.emit[0].allowed_sources",
                "must not be empty @ $.emit[0].allowed_groups",
                "must not be empty @ $.emit[0].allowed_ports",
            ],
            id="empty-lists",
        ),
        pytest.param(
            emit_with(auth_key_files='["", "a\\u0000b", 5]'),
            [
                "invalid path '' @ $.emit[0].auth_key_files[0]",
                "invalid path 'a\\x00b' @ $.emit[0].auth_key_files[1]",
                "invalid value for type, expected str @ $.emit[0].auth_key_files[2] (got 5)",
            ],
            id="bad-paths",
        ),
        pytest.param(
            "[[emit]]\nname = 'dev'\nlisten = \n",
            ["invalid TOML: Invalid value (at line 3, column 10)"],
            id="toml-syntax",
        ),
    ],
)
def test_refused_with_exact_messages(text: str, expected: list[str]) -> None:
    assert errors_of(text) == expected


def test_wrong_types_show_the_value_given() -> None:
    """The value as the file wrote it, after the path (so the prefix stays cattrs' wording),
    cut at 40 characters, and never confused by what it contains."""
    text = emit_with(
        ttl=r'"a @ b \u001f"',
        listen="6667",
        loop='"' + "y" * 60 + '"',
        max_connections="1979-05-27",
        idle_timeout="{ a = 1 }",
        send_buffer="1.5",
    )
    assert errors_of(text) == [
        "invalid value for type, expected str @ $.emit[0].listen (got 6667)",
        r'invalid value for type, expected int @ $.emit[0].ttl (got "a @ b \u001f")',
        'invalid value for type, expected bool @ $.emit[0].loop (got "' + "y" * 40 + '...")',
        "invalid value for type, expected int @ $.emit[0].max_connections (got 1979-05-27)",
        "invalid value for type, expected duration @ $.emit[0].idle_timeout (got a table)",
        "invalid value for type, expected size @ $.emit[0].send_buffer (got 1.5)",
    ]


def test_every_problem_is_reported_at_once() -> None:
    """Problems in several tables, and rules across tables, all come out together, even when
    the tables they concern have other errors."""
    text = (
        "[health]\nlisten = '0.0.0.0:6666'\n"
        + emit_with(ttl='"16"')
        + emit_with(idle_timeout='"1s"')
        + capture_with(groups='["10.0.0.1:1"]')
    )
    assert errors_of(text) == [
        'invalid value for type, expected int @ $.emit[0].ttl (got "16")',
        "idle_timeout (1s) must be longer than heartbeat_interval (1s) @ $.emit[1].idle_timeout",
        "group 10.0.0.1 is not a multicast address (224.0.0.0/4) @ $.capture[0].groups[0]",
        "duplicate feed name 'dev' (also $.emit[0].name) @ $.emit[1].name",
        "port 6666 is already used by $.health.listen @ $.emit[0].listen",
        "port 6666 is already used by $.health.listen @ $.emit[1].listen",
    ]


def test_duration_bounds_are_inclusive_and_health_may_use_ipv6() -> None:
    config = parse_config(
        emit_with(heartbeat_interval='"1ms"', idle_timeout='"24h"')
        + capture_with(replay_max_bytes='"4GiB"', replay_max_age="86400")
        + '[health]\nlisten = "[::1]:8080"\n'
    )
    assert (config.emit[0].heartbeat_interval, config.emit[0].idle_timeout) == (0.001, 86400)
    assert (config.capture[0].replay_max_bytes, config.capture[0].replay_max_age) == (
        4 * 1024**3,
        86400,
    )
    assert config.health.listen == Endpoint("::1", 8080)


def test_longest_duration_fits_both_data_paths() -> None:
    """The Python data path polls with milliseconds as a C int and the C one keeps int64
    nanosecond deadlines: the longest duration accepted must fit both, "600h" did not."""
    reader, writer = os.pipe()
    try:
        os.write(writer, b"x")
        poller = select.poll()
        poller.register(reader, select.POLLIN)
        assert poller.poll(math.ceil(MAX_DURATION * 1000)) == [(reader, select.POLLIN)]
        with pytest.raises(OverflowError):
            poller.poll(math.ceil(parse_duration("600h") * 1000))
    finally:
        os.close(reader)
        os.close(writer)
    uptime_ns = time.monotonic_ns() + 10 * 365 * 86400 * 10**9  # a box up for ten more years
    assert ctypes.c_int64(uptime_ns + int(MAX_DURATION * 1e9)).value > uptime_ns
    assert errors_of(capture_with(idle_timeout='"600h"')) == [
        "invalid duration '600h': must be between 1ms and 24h @ $.capture[0].idle_timeout"
    ]


def test_port_zero_listeners_never_conflict() -> None:
    text = "[health]\nlisten = '127.0.0.1:0'\n" + emit_with(listen='"127.0.0.1:0"')
    text += emit_with(name='"prod"', listen='"127.0.0.1:0"')
    assert [feed.listen.port for feed in parse_config(text).emit] == [0, 0]


def test_emit_and_capture_may_share_a_name() -> None:
    config = parse_config(EMIT + CAPTURE)
    assert [f.name for f in config.emit] == [f.name for f in config.capture] == ["dev"]


def test_config_error_str_joins_every_message() -> None:
    error = ConfigError(["a @ $.x", "b @ $.y"])
    assert error.errors == ("a @ $.x", "b @ $.y")
    assert str(error) == "a @ $.x; b @ $.y"


# --------------------------------------------------------------------------------------------
# Files


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == (f"cannot read {path}: No such file or directory",)


def _load_in_thread(path: Path) -> list[str]:
    """load_config's errors, from a thread, so that a read that blocks fails the test instead
    of hanging it (the regression this guards against)."""
    result: list[list[str]] = []

    def load() -> None:
        with pytest.raises(ConfigError) as info:
            load_config(path)
        result.append(list(info.value.errors))

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(10)
    assert result, "load_config blocked"
    return result[0]


def test_load_config_never_blocks_on_a_fifo_or_device(tmp_path: Path) -> None:
    fifo = tmp_path / "relayd.toml"
    os.mkfifo(fifo)
    assert _load_in_thread(fifo) == [f"cannot read {fifo}: not a regular file (a FIFO)"]
    assert _load_in_thread(Path("/dev/zero")) == [
        "cannot read /dev/zero: not a regular file (a character device)"
    ]
    assert _load_in_thread(tmp_path) == [f"cannot read {tmp_path}: Is a directory"]


def test_load_config_size_cap(tmp_path: Path) -> None:
    path = tmp_path / "relayd.toml"
    text = EMIT + "#" * (MAX_CONFIG_BYTES - len(EMIT) - 1) + "\n"
    path.write_text(text)
    assert len(load_config(path).emit) == 1  # exactly the cap is fine
    path.write_text(text + "\n")
    assert _load_in_thread(path) == [f"cannot read {path}: larger than 1MiB"]


def test_key_file_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "a.key")
    (tmp_path / "relayd.toml").write_text(emit_with(auth_key_files='["a.key"]'))
    assert _load_in_thread(tmp_path / "relayd.toml") == [
        f"cannot read key file {tmp_path / 'a.key'}: not a regular file (a FIFO)"
        " @ $.emit[0].auth_key_files[0]"
    ]


@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 500, 2000, 100_000])
def test_deep_nesting_is_one_error_before_parsing(depth: int) -> None:
    arrays = "a = " + "[" * depth + "]" * depth
    tables = "a = " + "{b = " * depth + "1" + "}" * depth
    for text in (arrays, tables):
        assert errors_of(EMIT + text) == [
            f"invalid TOML: nested more than {MAX_NESTING} deep (at line 8)"
        ]


def test_nesting_scan_skips_strings_and_comments() -> None:
    brackets = "[" * 100
    quote3 = "'" * 3
    text = (
        f'[process]\nlog_level = "info" # {brackets}\n'
        + emit_with(name=f"'dev' # {brackets}")
        + f'x = "{brackets}"\ny = """\n{brackets}\\"""\n"""\n'
        + f"z = {quote3}{brackets}{quote3}\nw = '{brackets}'\n"
        + "v = "
        + "[" * MAX_NESTING
        + "]" * MAX_NESTING
        + "\n"
    )
    # Only the keys are wrong: nothing in a string or comment counted as nesting.
    assert errors_of(text) == [
        "unknown key 'v'; unknown key 'w'; unknown key 'x'; unknown key 'y'; unknown key 'z'"
        " @ $.emit[0]"
    ]


def test_load_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == (f"{path} is not UTF-8 text (byte 5)",)


def test_key_files_are_checked_and_rebased(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "dev.key").write_bytes(b"k" * 32)
    good = tmp_path / "good.toml"
    good.write_text(
        emit_with(auth_key_files='["keys/dev.key"]')
        + capture_with(auth_key_file=f'"{tmp_path / "keys" / "dev.key"}"')
    )
    config = load_config(good)
    assert config.emit[0].auth_key_files == (tmp_path / "keys" / "dev.key",)
    assert config.capture[0].auth_key_file == tmp_path / "keys" / "dev.key"

    (tmp_path / "keys" / "short.key").write_bytes(b"k" * 15 + b"\n")
    bad = tmp_path / "bad.toml"
    bad.write_text(
        emit_with(
            auth_key_files='["keys/dev.key", "keys/new.key", "keys", "keys/short.key"]',
            ttl='"x"',
        )
        + capture_with(auth_key_file='"/nonexistent/relayd.key"')
    )
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    # A key file that does not exist yet is not an error (key_file_warnings names it).
    assert info.value.errors == (
        'invalid value for type, expected int @ $.emit[0].ttl (got "x")',
        f"cannot read key file {tmp_path / 'keys'}: Is a directory @ $.emit[0].auth_key_files[2]",
        f"key file {tmp_path / 'keys' / 'short.key'} holds fewer than 16 bytes"
        " @ $.emit[0].auth_key_files[3]",
    )
    later = tmp_path / "later.toml"
    later.write_text(emit_with(auth_key_files='["keys/new.key"]'))
    assert key_file_warnings(load_config(later)) == [
        f"key file {tmp_path / 'keys' / 'new.key'} does not exist yet; feed 'dev' will not"
        " start until it does @ $.emit[0].auth_key_files[0]"
    ]
    # parse_config alone does not touch the file system.
    assert parse_config(bad.read_text().replace('ttl = "x"', "ttl = 3")).emit[0].ttl == 3


# --------------------------------------------------------------------------------------------
# Agreement with docs/CONFIG.md


def _documented() -> dict[str, dict[str, str]]:
    """``{section: {key: default cell}}`` from the tables of docs/CONFIG.md."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in (ROOT / "docs" / "CONFIG.md").read_text().splitlines():
        heading = re.match(r"## `\[+(\w+)\]+`", line)
        if heading:
            current = sections.setdefault(heading[1], {})
        elif line.startswith("## "):
            current = None
        elif current is not None and (row := re.match(r"\| `(\w+)` \|(.*)\|(.*)\|(.*)\|", line)):
            current[row[1]] = row[3].strip()
    return sections


def test_doc_lists_exactly_the_model_keys() -> None:
    documented = _documented()
    model = {"process": ProcessConfig, "health": HealthConfig, "emit": EmitFeed}
    model["capture"] = CaptureFeed
    assert set(documented) == set(model)
    for section, cls in model.items():
        fields = {a.name for a in attrs.fields(cls) if a.init}
        assert set(documented[section]) == fields, section


def test_doc_defaults_are_the_model_defaults() -> None:
    """Writing a key with the value its doc row gives as default changes nothing."""
    tables = {
        "process": (EMIT + "[process]\n", ""),
        "health": (EMIT + "[health]\n", ""),
        "emit": (EMIT, ""),
        "capture": (CAPTURE, ""),
    }
    checked = 0
    for section, keys in _documented().items():
        head, _ = tables[section]
        baseline = parse_config(head)
        for key, default in keys.items():
            if default in ("required", "none"):
                continue
            value = default.strip("`")
            assert parse_config(f"{head}{key} = {value}\n") == baseline, (section, key)
            checked += 1
    assert checked >= 20


def test_doc_error_example_is_real() -> None:
    text = (ROOT / "docs" / "CONFIG.md").read_text()
    block = re.search(r"\$ relayd check-config --config bad\.toml\n(.*?)\n\$ echo", text, re.S)
    assert block is not None
    shown = [line.removeprefix("bad.toml: ") for line in block[1].splitlines()]
    config = emit_with(ttl='"16"', tll="3") + emit_with(listen='"0.0.0.0:8080"')
    assert errors_of(config) == shown


# --------------------------------------------------------------------------------------------
# Fuzz: any text gives a Config or a ConfigError, nothing else

# `make fuzz` raises this; the default keeps `make test` quick.
FUZZ_EXAMPLES = int(os.environ.get("RELAYD_FUZZ_EXAMPLES", "150"))

_GOOD = {
    "log_level": ['"debug"', '"error"'],
    "log_format": ['"json"'],
    "name": ['"dev"', '"prod"', '"a_b-1"'],
    "listen": ['"0.0.0.0:6666"', '"127.0.0.1:0"', '"0.0.0.0:8080"', '"[::]:6667"'],
    "interface": ['"ens5"', '"10.0.0.1"', '"lo"'],
    "ttl": ["1", "255"],
    "loop": ["true"],
    "allowed_sources": ['["10.0.0.0/8"]', '["10.20.0.0/24", "192.0.2.1"]'],
    "allowed_groups": ['["239.0.0.0/8"]', '["239.111.111.0/27", "224.0.1.0/24"]'],
    "allowed_ports": ['["6100-6101"]', "[1, 65535]"],
    "max_connections": ["1", "1000"],
    "groups": ['["239.1.1.1:6100"]', '["239.1.1.1:6100", "239.1.1.2:6100"]'],
    "targets": ['["relay.example.com:6666"]', '["10.0.0.1:1", "[::1]:2"]'],
    "sources": ['["10.0.0.1"]', "[]"],
    "auth_key_files": ["[]", '["test_config.py"]'],
    "auth_key_file": ['"test_config.py"', '"absent.key"'],
}
_DURATIONS = ['"250ms"', '"1m30s"', "0.5", "30", '"1h"']
_SIZES = ['"4MiB"', '"1GiB"', "1048576", '"200KB"']
_SECTIONS = {
    "process": ProcessConfig,
    "health": HealthConfig,
    "emit": EmitFeed,
    "capture": CaptureFeed,
}
_SCALARS = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(str),
    st.floats().map(str),  # "nan", "inf", "-inf" and "1e+300" are TOML floats too
    st.booleans().map(lambda b: "true" if b else "false"),
    st.sampled_from(
        [
            '"2s"',
            '"0"',
            '"-1s"',
            '"1e9"',
            '"0.0.0.0:8080"',
            '"[::1]:0"',
            '"224.0.0.1:1"',
            '"10.0.0.0/8"',
            '"6100-6101"',
            '"65535-1"',
            '""',
            '"a:b:c"',
            '"/dev/null"',
            "1979-05-27T07:32:00Z",
            "{a = 1}",
        ]
    ),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=12).map(
        lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    ),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
    max_leaves=8,
)


def _value_for(key: str) -> st.SearchStrategy[str]:
    good = _GOOD.get(key) or (_DURATIONS if "time" in key or "interval" in key else _SIZES)
    if key.endswith(("_age", "_budget")):
        good = _DURATIONS
    return st.one_of(st.sampled_from(good), st.sampled_from(good), _VALUES)


@st.composite
def _tables(draw: st.DrawFn) -> str:
    """A TOML table of a known section, mostly with plausible values for its keys."""
    section = draw(st.sampled_from(sorted(_SECTIONS)))
    many = section in ("emit", "capture")
    header = f"[[{section}]]" if many and draw(st.integers(0, 9)) else f"[{section}]"
    fields = [a.name for a in attrs.fields(_SECTIONS[section]) if a.init]
    keys = draw(st.lists(st.sampled_from([*fields, "tll", "x"]), unique=True))
    return "\n".join([header, *(f"{key} = {draw(_value_for(key))}" for key in keys)])


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.lists(_tables(), max_size=6))
def test_plausible_tables_give_config_or_config_error(tables: list[str]) -> None:
    _config_or_config_error("\n".join(tables))


_LINES = st.one_of(
    st.sampled_from(["[process]", "[health]", "[[emit]]", "[[capture]]", "[emit]", "[x]", ""]),
    st.tuples(st.sampled_from(["name", "ttl", "listen", "groups", "x"]), _VALUES).map(
        lambda kv: f"{kv[0]} = {kv[1]}"
    ),
    st.text(max_size=20),
)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.lists(_LINES, max_size=25))
def test_any_lines_give_config_or_config_error(lines: list[str]) -> None:
    _config_or_config_error("\n".join(lines))


def _config_or_config_error(text: str) -> None:
    for check_files in (False, True):
        _one_config_or_config_error(text, check_files=check_files)


def _one_config_or_config_error(text: str, *, check_files: bool) -> None:
    try:
        config = parse_config(text, base_dir=Path(__file__).parent, check_files=check_files)
    except ConfigError as exc:
        errors = exc.errors
    else:
        assert isinstance(config, Config)
        return
    assert errors
    assert all(isinstance(e, str) and e for e in errors)
    # A crash inside a parser would surface as cattrs' catch-all wording.
    assert not any("unknown error" in e or "invalid type (" in e for e in errors)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.text(max_size=200))
def test_any_unicode_gives_config_or_config_error(text: str) -> None:
    _config_or_config_error(text)


# --------------------------------------------------------------------------------------------
# Several sites per capture feed ([[capture.site]], issue 14 item 5)

SITES = """
[[capture]]
name = "deribit"
interface = "eth1"
groups = ["239.111.111.1:6100"]
replay_max_age = "20s"
auth_key_file = "/etc/relayd/feed.key"

[[capture.site]]
name = "london"
targets = ["relay.london.example:6667"]

[[capture.site]]
name = "tokyo"
targets = ["relay.tokyo.example:6667", "relay-b.tokyo.example:6667"]
replay_max_bytes = "256MiB"
auth_key_file = "/etc/relayd/tokyo.key"
"""


def test_capture_sites_each_with_their_targets_bounds_and_key() -> None:
    feed = parse_config(SITES).capture[0]
    london, tokyo = feed.sites
    assert (london.name, tokyo.name) == ("london", "tokyo")
    assert tokyo.targets == (
        Endpoint("relay.tokyo.example", 6667),
        Endpoint("relay-b.tokyo.example", 6667),
    )
    # unset bounds and key are the feed's
    assert (london.replay_max_bytes, london.replay_max_age) == (64 * 1024**2, 20.0)
    assert (tokyo.replay_max_bytes, tokyo.replay_max_age) == (256 * 1024**2, 20.0)
    assert london.auth_key_file == Path("/etc/relayd/feed.key")
    assert tokyo.auth_key_file == Path("/etc/relayd/tokyo.key")


def test_targets_alone_are_one_unnamed_site() -> None:
    (site,) = parse_config(CAPTURE).capture[0].sites
    assert (site.name, site.targets) == ("", (Endpoint("relay.example.com", 6666),))


def test_capture_site_errors_are_explained() -> None:
    both = CAPTURE + '[[capture.site]]\nname = "tokyo"\ntargets = ["t.example:1"]\n'
    assert errors_of(both) == [
        "give targets or [[capture.site]] tables, not both (targets is the one site of a feed "
        "without [[capture.site]]) @ $.capture[0].targets"
    ]
    neither = capture_with().replace('targets = ["relay.example.com:6666"]\n', "")
    assert errors_of(neither) == [
        "required: targets, or one or more [[capture.site]] tables @ $.capture[0].targets"
    ]
    twice = SITES.replace('name = "tokyo"', 'name = "london"')
    assert errors_of(twice) == ["duplicate site name 'london' (also site[0]) @ $.capture[0].site"]
    bad = SITES.replace('name = "tokyo"', 'name = "Tokyo"').replace(
        'replay_max_bytes = "256MiB"', 'replay_max_bytes = "1KiB"\nttl = 3'
    )
    assert errors_of(bad) == [
        "invalid site name 'Tokyo': 1 to 63 of a-z, 0-9, '_' and '-', starting with a letter "
        "or digit @ $.capture[0].site[1].name",
        "invalid size '1KiB': must be at least 128KiB @ $.capture[0].site[1].replay_max_bytes",
        "unknown key 'ttl' @ $.capture[0].site[1]",
    ]
    many = SITES + "".join(
        f'[[capture.site]]\nname = "s{i}"\ntargets = ["s{i}.example:1"]\n' for i in range(7)
    )
    assert errors_of(many) == ["9 sites, at most 8 @ $.capture[0].site"]
