"""The configuration model: one frozen attrs class per TOML table.

The classes mirror ``docs/CONFIG.md`` field for field; how each field is parsed and checked
is in ``relayd.config.converter``.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Final, Literal

import attrs

from relayd.config.values import Endpoint, GroupPort, PortRange
from relayd.session import TGW_MULTICAST_MTU, Allowlist, Destination

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
#: A/B arbitration of an emit feed's concurrent capture sessions (relayd/arbitration/).
Arbitration = Literal["none", "deribit", "content"]
#: The Deribit packet header the ``deribit`` arbitration reads (relayd/arbitration/headers.py).
DeribitLayoutName = Literal["frame-v1", "sbe"]
#: A capture feed's count of the exchange's own gaps (``upstream_check``); it reads the
#: Deribit packet header in the feed's ``deribit_layout`` (``DeribitLayoutName``).
UpstreamCheck = Literal["none", "deribit"]


@attrs.frozen(kw_only=True)
class ProcessConfig:
    """``[process]``: logging."""

    log_level: LogLevel = "info"
    log_format: LogFormat = "text"


@attrs.frozen(kw_only=True)
class HealthConfig:
    """``[health]``: the HTTP server for ``/healthz``, ``/healthz/<feed>`` and ``/metrics``."""

    listen: Endpoint = Endpoint("0.0.0.0", 8080)  # noqa: RUF009 - frozen, so shared safely


_ALL_PORTS: Final = (PortRange(1, 65535),)


@attrs.frozen(kw_only=True)
class EmitFeed:
    """One ``[[emit]]`` table: a TCP listener whose datagrams are sent out as multicast."""

    name: str
    listen: Endpoint
    interface: str
    allowed_sources: tuple[IPv4Network, ...]
    allowed_groups: tuple[IPv4Network, ...]
    ttl: int = 16
    loop: bool = False
    allowed_ports: tuple[PortRange, ...] = _ALL_PORTS
    max_connections: int = 4
    hello_timeout: float = 5.0
    heartbeat_interval: float = 1.0
    idle_timeout: float = 5.0
    send_buffer: int = 4 * 1024**2
    max_datagram_size: int = TGW_MULTICAST_MTU
    auth_key_files: tuple[Path, ...] = ()
    arbitration: Arbitration = "none"
    deribit_layout: DeribitLayoutName = "frame-v1"
    arbitration_hold_timeout: float = 0.05
    arbitration_content_window: float = 2.0
    busy_poll: float = 0.0  # latency mode (C data plane): seconds; 0: off
    #: Groups the observer joins to see another relay emit the feed (relayd/emit/observer.py);
    #: empty: the destinations this host has emitted to.
    watch_groups: tuple[GroupPort, ...] = ()
    #: Another relay counts as emitting the feed this long after its latest datagram seen.
    emitter_grace: float = 1.0
    #: The claim (relayd/emit/role.py): a new stream is held this long, announced by beacons,
    #: before this host emits; 0: no claim and no beacons. Needs ``watch_groups``.
    emitter_claim: float = 0.3
    #: UDP port of the beacons, sent to the first of ``watch_groups`` (0: the listen port).
    beacon_port: int = 0

    def beacon_destination(self) -> GroupPort | None:
        """Where this feed's beacons go and are watched for (None: no beacons, no claim)."""
        if not self.watch_groups or self.emitter_claim <= 0:
            return None
        port = self.beacon_port or self.listen.port
        if port == 0:
            return None  # a listener on an ephemeral port: the hosts cannot agree on one
        return GroupPort(self.watch_groups[0].group, port)

    def allows(self, group: IPv4Address | int, port: int) -> bool:
        """Whether a datagram to ``group:port`` may be emitted (group as an address or the
        host-order int of one): ``relayd.session.Allowlist``, the rule the data planes use."""
        verdict = Allowlist(self.allowed_groups, self.allowed_ports).verdict(int(group), port)
        return verdict is Destination.ALLOWED


#: Sites one capture feed streams to at most (``[[capture.site]]``).
MAX_SITES: Final = 8


@attrs.frozen(kw_only=True)
class CaptureSite:
    """One ``[[capture.site]]`` table: a place a capture feed streams to (London, Tokyo),
    with its own targets (a failover list), replay buffer, ACK state and key. Unset bounds
    and key are the feed's."""

    name: str
    targets: tuple[Endpoint, ...]
    replay_max_bytes: int | None = None
    replay_max_age: float | None = None
    auth_key_file: Path | None = None


@attrs.frozen(kw_only=True)
class CaptureFeed:
    """One ``[[capture]]`` table: multicast groups joined and streamed to the emit side, at
    ``targets`` (one site) or at each ``[[capture.site]]`` (``site``)."""

    name: str
    interface: str
    groups: tuple[GroupPort, ...]
    targets: tuple[Endpoint, ...] = ()
    receive_buffer: int = 16 * 1024**2
    replay_max_bytes: int = 64 * 1024**2
    replay_max_age: float = 30.0
    heartbeat_interval: float = 1.0
    idle_timeout: float = 5.0
    connect_timeout: float = 3.0
    reconnect_budget: float = 10.0
    ack_timeout: float = 10.0
    auth_key_file: Path | None = None
    sources: tuple[IPv4Address, ...] = ()
    upstream_check: UpstreamCheck = "none"
    deribit_layout: DeribitLayoutName = "frame-v1"
    site: tuple[CaptureSite, ...] = ()

    @property
    def sites(self) -> tuple[CaptureSite, ...]:
        """Where the feed streams: its named sites, or one unnamed site (name "") with the
        feed's ``targets``; bounds and key filled in from the feed where a site has none."""
        sites = self.site or (CaptureSite(name="", targets=self.targets),)
        return tuple(
            attrs.evolve(
                site,
                replay_max_bytes=site.replay_max_bytes or self.replay_max_bytes,
                replay_max_age=site.replay_max_age or self.replay_max_age,
                auth_key_file=site.auth_key_file or self.auth_key_file,
            )
            for site in sites
        )

    busy_poll: float = 0.0  # latency mode (C data plane): seconds; 0: off


@attrs.frozen(kw_only=True)
class Config:
    """A whole file. Feeds keep the order of the file; names are unique per kind."""

    process: ProcessConfig = ProcessConfig()
    health: HealthConfig = HealthConfig()
    emit: tuple[EmitFeed, ...] = ()
    capture: tuple[CaptureFeed, ...] = ()

    def emit_feed(self, name: str) -> EmitFeed | None:
        """The emit feed called ``name``, if any."""
        return next((feed for feed in self.emit if feed.name == name), None)

    def capture_feed(self, name: str) -> CaptureFeed | None:
        """The capture feed called ``name``, if any."""
        return next((feed for feed in self.capture if feed.name == name), None)
