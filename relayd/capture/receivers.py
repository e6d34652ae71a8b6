"""A capture feed's group sockets and the receive thread of each, while the feed runs.

The set can change under a running feed (a reload applied live, relayd/capture/change.py):
sockets opened and joined beforehand are adopted and their threads started; groups removed
are left, and a socket left with no group is stopped (its thread first) and closed. The
sequence and the replay buffer are not touched: every socket's thread numbers into the same
``Receive``.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable, Iterator, Sequence
from ipaddress import IPv4Address

import trio

from relayd.capture.receive import Receive
from relayd.datapath import DataPlane, run_stoppable
from relayd.netif import GroupReceiver, leave_groups, set_receive_buffer

__all__ = ["Receivers"]

GroupKey = tuple[IPv4Address, int]


class Receivers:
    """The group sockets of one feed and their receive tasks (one thread each)."""

    def __init__(self, receive: Receive, busy_poll: float = 0.0) -> None:
        self._receive = receive
        self._busy_poll = busy_poll  # the feed's latency mode (Receive.drain)
        self.sockets: list[GroupReceiver] = []
        self._scopes: dict[socket.socket, trio.CancelScope] = {}
        self._retired: set[socket.socket] = set()  # stopping; closed once its thread is done
        # while running: the feed's nursery, its data plane and its sender's wake-up
        self._running: tuple[trio.Nursery, DataPlane, Callable[[], None]] | None = None

    def __len__(self) -> int:
        return len(self.sockets)

    def __iter__(self) -> Iterator[GroupReceiver]:
        return iter(list(self.sockets))

    @property
    def running(self) -> bool:
        return self._running is not None

    def groups(self) -> list[GroupKey]:
        return [(group, r.port) for r in self.sockets for group in r.groups]

    def start(self, nursery: trio.Nursery, plane: DataPlane, wake: Callable[[], None]) -> None:
        """Start a receive thread for every socket held, and for every one adopted later."""
        self._running = (nursery, plane, wake)
        for receiver in self.sockets:
            self._start(receiver)

    def adopt(self, receivers: Sequence[GroupReceiver]) -> None:
        """Take sockets already opened and joined; their threads start now if running."""
        self.sockets.extend(receivers)
        if self._running is not None:
            for receiver in receivers:
                self._start(receiver)

    def leave(self, groups: Sequence[GroupKey], sources: Sequence[IPv4Address]) -> None:
        """Leave ``groups``; a socket left with none stops and is closed. Raises
        InterfaceError when a membership cannot be dropped (the group stays joined)."""
        gone = set(groups)
        for receiver in list(self.sockets):
            leaving = [g for g in receiver.groups if (g, receiver.port) in gone]
            if not leaving:
                continue
            if len(leaving) == len(receiver.groups):
                self._retire(receiver)
                continue
            kept = leave_groups(receiver, leaving, sources)
            self.sockets[self.sockets.index(receiver)] = kept

    def set_buffer(self, size: int) -> list[GroupReceiver]:
        """A new receive buffer size on every socket; returns those the kernel capped."""
        self.sockets = [set_receive_buffer(r, size) for r in self.sockets]
        return [r for r in self.sockets if r.receive_buffer_capped]

    def close(self) -> None:
        for receiver in self.sockets:
            receiver.close()
        self.sockets = []
        self._running = None

    def _start(self, receiver: GroupReceiver) -> None:
        assert self._running is not None
        nursery, plane, wake = self._running
        scope = self._scopes[receiver.sock] = trio.CancelScope()
        nursery.start_soon(self._run, receiver, scope, plane, wake)

    async def _run(
        self,
        receiver: GroupReceiver,
        scope: trio.CancelScope,
        plane: DataPlane,
        wake: Callable[[], None],
    ) -> None:
        try:
            with scope:
                await run_stoppable(
                    functools.partial(
                        self._receive.drain, plane, receiver, wake, busy_poll=self._busy_poll
                    )
                )
        finally:
            del self._scopes[receiver.sock]
            if receiver.sock in self._retired:
                self._retired.discard(receiver.sock)
                receiver.close()

    def _retire(self, receiver: GroupReceiver) -> None:
        self.sockets.remove(receiver)
        scope = self._scopes.get(receiver.sock)
        if scope is None:
            receiver.close()
        else:
            self._retired.add(receiver.sock)
            scope.cancel()
