"""A capture-side stand-in for emit tests on loopback: a test client speaking the capture side
of the protocol with the wire encoders, multicast receivers joined on 127.0.0.1, and an emit
feed configuration and runner for them."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import attrs
import trio

from relayd.config import EmitFeed, Endpoint
from relayd.emit import EmitFeedRuntime
from relayd.metrics import render
from relayd.netif import GroupReceiver, drain, open_group_receivers
from relayd.wire import (
    FROM_EMIT,
    Ack,
    Challenge,
    Decoder,
    Error,
    Event,
    Heartbeat,
    encode_hello,
    hello_mac,
)
from tests.helpers.loopback import FEED, LOOPBACK, free_udp_port
from tests.helpers.metrics import value


def pick_groups(count: int) -> list[tuple[IPv4Address, int]]:
    """Distinct random groups in 239.255.0.0/16 on free ports (no clash with other tests)."""
    rng = random.Random()
    base = rng.randrange(1, 250)
    port = free_udp_port()
    return [(IPv4Address(f"239.255.{base}.{1 + i}"), port + (i % 3)) for i in range(count)]


def make_config(**changes: Any) -> EmitFeed:
    """An emit feed on 127.0.0.1 for loopback senders and 239.255.0.0/16, with ``changes``."""
    config = EmitFeed(
        name=FEED,
        listen=Endpoint("127.0.0.1", 0),
        interface="127.0.0.1",
        loop=True,
        ttl=1,
        allowed_sources=(IPv4Network("127.0.0.0/8"),),
        allowed_groups=(IPv4Network("239.255.0.0/16"),),
        hello_timeout=2.0,
        heartbeat_interval=1.0,
        idle_timeout=5.0,
        send_buffer=1024 * 1024,
    )
    return attrs.evolve(config, **changes)


@asynccontextmanager
async def running(config: EmitFeed, **kwargs: Any) -> AsyncIterator[EmitFeedRuntime]:
    """The feed started (listener bound) for the block, cancelled after it."""
    feed = EmitFeedRuntime(config, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(feed.run)
        try:
            yield feed
        finally:
            nursery.cancel_scope.cancel()


def metric(feed: EmitFeedRuntime, name: str, **labels: str) -> float:
    """A metric of the loopback feed, read from its rendered exposition."""
    return value(render(feed.samples()), name, feed=FEED, **labels)


_STREAMS: list[trio.SocketStream] = []


def track_stream(stream: trio.SocketStream) -> None:
    """Close ``stream`` when the test ends, whatever happens to the test."""
    _STREAMS.append(stream)


def close_streams() -> None:
    """Close every client connection a test opened (the conftest calls it after each test)."""
    while _STREAMS:
        fd = _STREAMS.pop().socket.detach()  # outside Trio: no notify_closing possible
        if fd >= 0:
            os.close(fd)


class Peer:
    """A test client speaking the capture side of the protocol."""

    def __init__(self, stream: trio.SocketStream, session: bytes, feed: str, key: bytes | None):
        self.stream = stream
        self.session = session
        self.feed = feed
        self.key = key
        self.decoder = Decoder(FROM_EMIT)
        self.events: list[Event] = []
        self.eof = False

    @classmethod
    async def connect(cls, port: int, source: str | None = None) -> trio.SocketStream:
        """A connection to the loopback feed, from ``source`` (any 127/8 address) if given."""
        stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
        _STREAMS.append(stream)
        return stream

    @classmethod
    async def start(
        cls,
        port: int,
        *,
        session: bytes | None = None,
        feed: str = FEED,
        key: bytes | None = None,
        source: str | None = None,
    ) -> Peer:
        """Connect and say HELLO; the welcome (or refusal) is the next event."""
        peer = cls(await cls.connect(port, source), session or os.urandom(16), feed, key)
        challenge = await peer.next_event()
        assert isinstance(challenge, Challenge)
        mac = hello_mac(key, challenge.nonce, feed, peer.session) if key else b""
        await peer.stream.send_all(encode_hello(feed, peer.session, mac))
        return peer

    async def next_event(self, timeout: float = 5.0) -> Event | None:
        """The next frame from the emit side; None at EOF."""
        with trio.fail_after(timeout):
            while not self.events:
                if self.eof:
                    return None
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    self.eof = True
                    continue
                self.events.extend(self.decoder.feed(data))
        return self.events.pop(0)

    async def welcome(self) -> int:
        event = await self.next_event()
        assert isinstance(event, Ack), event
        return event.seq

    async def wait_ack(self, seq: int, timeout: float = 5.0) -> None:
        with trio.fail_after(timeout):
            while True:
                event = await self.next_event()
                assert isinstance(event, (Ack, Heartbeat)), event
                if isinstance(event, Ack) and event.seq >= seq:
                    assert event.seq == seq
                    return

    async def closed_with(self, code: int, timeout: float = 5.0) -> Error:
        """The ERROR this connection is closed with (skipping ACKs and heartbeats), then EOF."""
        with trio.fail_after(timeout):
            while True:
                event = await self.next_event(timeout)
                if isinstance(event, Error):
                    break
                assert isinstance(event, (Ack, Heartbeat)), event
            assert event.code == code, event
            assert await self.next_event(timeout) is None
        return event

    async def aclose(self) -> None:
        await self.stream.aclose()


class Receivers:
    """Multicast receivers joined on loopback; collects (group, port, payload) in order."""

    def __init__(self, groups: Sequence[tuple[IPv4Address, int]]) -> None:
        self.sockets: list[GroupReceiver] = open_group_receivers(groups, LOOPBACK, 4 * 1024**2)
        self.got: list[tuple[IPv4Address, int, bytes]] = []

    def _drain(self) -> None:
        for receiver in self.sockets:
            for group, port, payload, drops in drain(receiver):
                assert drops is None, "the receiving socket dropped datagrams"
                self.got.append((group, port, payload))

    async def collect(
        self, count: int, timeout: float = 5.0
    ) -> list[tuple[IPv4Address, int, bytes]]:
        with trio.move_on_after(timeout):
            while len(self.got) < count:
                self._drain()
                await trio.sleep(0.005)
        return self.got

    async def settle(self, quiet: float = 0.2) -> list[tuple[IPv4Address, int, bytes]]:
        """Everything received until nothing more arrives for ``quiet`` seconds."""
        seen = -1
        while seen != len(self.got):
            seen = len(self.got)
            await trio.sleep(quiet)
            self._drain()
        return self.got

    def close(self) -> None:
        for receiver in self.sockets:
            receiver.close()
