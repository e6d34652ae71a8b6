"""An emit-side stand-in for capture tests on loopback: a TCP server speaking the emit side of
the protocol (CHALLENGE, HELLO check, welcome ACK, DATA in, ACK out) that a test can make
misbehave on purpose, and the capture feed configuration that points at it."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from ipaddress import IPv4Address

import attrs
import trio

from relayd import wire
from relayd.config import CaptureFeed, Endpoint, GroupPort
from tests.helpers.loopback import FEED


@attrs.define
class Peer:
    """An emit-side stand-in: CHALLENGE, HELLO check, welcome ACK, DATA in, ACK out.

    ``emitted`` is the highest sequence per session across connections, like a real emit host
    (a new Peer is a new host: it knows no session). ``datagrams`` keeps every DATA in arrival
    order, duplicates included; ``frames`` the raw bytes of each DATA frame.
    """

    refuse: int = 0  # answer HELLO with this ERROR code
    read: bool = True  # False: stop reading after the handshake
    heartbeat: float = 0.0  # with read False: still send a HEARTBEAT this often (0: never)
    ack: bool = True
    final_ack: bool = False  # answer the capture side's goodbye (ERROR) with an ACK
    keys: tuple[bytes, ...] = ()
    emitted: dict[bytes, int] = attrs.field(factory=dict)
    datagrams: list[wire.Datagram] = attrs.field(factory=list)
    frames: list[bytes] = attrs.field(factory=list)
    hellos: int = 0
    connections: int = 0
    errors: list[wire.Error] = attrs.field(factory=list)
    streams: list[trio.SocketStream] = attrs.field(factory=list)

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self.streams.append(stream)
        conn = wire.EmitConnection(FEED, self.keys, os.urandom(16))
        try:
            await stream.send_all(conn.challenge())
            raw = b""
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                if conn.state is not wire.State.STREAMING:
                    try:
                        events = conn.receive(data)
                    except wire.HandshakeError as exc:
                        await stream.send_all(wire.encode_error(exc.code, str(exc)))
                        return
                    if conn.hello is None:
                        continue
                    self.hellos += 1
                    if self.refuse:
                        await stream.send_all(wire.encode_error(self.refuse, "refused"))
                        return
                    session = conn.hello.session_id
                    await stream.send_all(wire.encode_ack(self.emitted.get(session, 0)))
                    if not self.read:
                        await self._deaf(stream)
                    continue
                raw += data
                events = conn.receive(data)
                highest = self.emitted.get(session, 0)
                for event in events:
                    if isinstance(event, wire.Datagram):
                        self.datagrams.append(event)
                        size = wire.DATA_HEADER_SIZE + len(event.payload)
                        self.frames.append(raw[:size])
                        raw = raw[size:]
                        highest = max(highest, event.seq)
                    elif isinstance(event, wire.Heartbeat):
                        raw = raw[11:]
                    elif isinstance(event, wire.Error):
                        self.errors.append(event)
                        self.emitted[session] = highest
                        if self.final_ack:
                            await stream.send_all(wire.encode_ack(highest))
                        return
                self.emitted[session] = highest
                if self.ack and events:
                    await stream.send_all(wire.encode_ack(highest))
        except (trio.BrokenResourceError, trio.ClosedResourceError, wire.ProtocolError):
            return
        finally:
            await stream.aclose()

    async def _deaf(self, stream: trio.SocketStream) -> None:
        """Read nothing ever again, but look alive: HEARTBEATs every ``heartbeat`` s."""
        if not self.heartbeat:
            await trio.sleep_forever()
        while True:
            await trio.sleep(self.heartbeat)
            await stream.send_all(wire.encode_heartbeat(time.time_ns()))


@attrs.define
class Server:
    peer: Peer
    port: int
    scope: trio.CancelScope


async def serve(nursery: trio.Nursery, peer: Peer, port: int = 0) -> Server:
    async def run(task_status: trio.TaskStatus[Server]) -> None:
        with trio.CancelScope() as scope:
            listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
            bound = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as handlers:
                task_status.started(Server(peer, bound, scope))
                await trio.serve_listeners(peer.handle, listeners, handler_nursery=handlers)

    server: Server = await nursery.start(run)
    return server


def stop(server: Server) -> None:
    """Close the listener and every connection (the emit host goes away)."""
    server.scope.cancel()


def feed_config(
    groups: Sequence[tuple[str, int]], ports: Sequence[int], **overrides: object
) -> CaptureFeed:
    """A capture feed from loopback groups to stand-ins on ``ports``, with short timers."""
    settings: dict[str, object] = {
        "name": FEED,
        "interface": "127.0.0.1",
        "groups": tuple(GroupPort(IPv4Address(g), p) for g, p in groups),
        "targets": tuple(Endpoint("127.0.0.1", p) for p in ports),
        "receive_buffer": 4 * 1024 * 1024,
        "heartbeat_interval": 0.2,
        "idle_timeout": 1.0,
        "connect_timeout": 1.0,
        "reconnect_budget": 2.0,
    }
    settings.update(overrides)
    return CaptureFeed(**settings)  # type: ignore[arg-type]


def groups_for(base: int, count: int, third: int = 11) -> list[tuple[str, int]]:
    """``count`` groups 239.255.<third>.1... on port ``base``."""
    return [(f"239.255.{third}.{i + 1}", base) for i in range(count)]
