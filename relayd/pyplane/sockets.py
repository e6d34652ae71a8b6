"""What the Python plane's loops share: waiting on and receiving from a TCP socket (emit pump,
ACK reader), and a group address as text."""

from __future__ import annotations

import math
import select
import socket
from typing import Final

from relayd.datapath import Why

_READABLE: Final = select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL


class _TcpReceiver:
    """``wait_and_recv`` of relayd/_fastpath.c: both TCP loops wait and receive this way."""

    def __init__(self, tcp: socket.socket, stop_fd: int, size: int) -> None:
        self._tcp = tcp
        self._stop_fd = stop_fd
        self._buffer = bytearray(size)
        self.view = memoryview(self._buffer)
        self._poller = select.poll()
        self._poller.register(tcp.fileno(), select.POLLIN)
        self._poller.register(stop_fd, select.POLLIN)
        self._writable = False
        self.err = 0

    def wait_and_recv(self, timeout: float, *, writable: bool) -> int | Why:
        """Wait up to ``timeout`` seconds for the socket (readable, or writable too) or the
        stop pipe, then receive into ``view``: how many bytes came; 0 when there is nothing
        to receive yet (call again); or STOPPED, EOF, RESET (``err``)."""
        if writable != self._writable:
            self._writable = writable
            events = select.POLLIN | (select.POLLOUT if writable else 0)
            self._poller.modify(self._tcp.fileno(), events)
        ready = self._poller.poll(max(0, math.ceil(timeout * 1000)))
        if not ready:
            return 0
        if any(fd == self._stop_fd for fd, _ in ready):
            return Why.STOPPED
        if not any(ev & _READABLE for _, ev in ready):
            return 0  # only writable
        try:
            n = self._tcp.recv_into(self._buffer)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self.err = exc.errno or 0
            return Why.RESET
        return n if n else Why.EOF


def wire_group(group: int) -> str:
    """A host-order IPv4 address as text."""
    return socket.inet_ntoa(group.to_bytes(4, "big"))
