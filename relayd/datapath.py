"""Data-path threads: a blocking per-datagram loop in a worker thread, stopped from Trio.

The hot loops of both feeds run in threads with blocking sockets (Trio re-arms epoll on every
wait, which doubled the CPU per datagram at low rates; docs/PERFORMANCE.md). Supervision stays
structured: the loop blocks only in ``poll`` on its sockets and a stop pipe, and when the Trio
task that started it is cancelled, the pipe becomes readable and the loop returns.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Callable
from typing import TypeVar, cast

import trio

T = TypeVar("T")


async def run_stoppable(
    loop: Callable[[int, trio.lowlevel.TrioToken], T],
    *,
    limiter: trio.CapacityLimiter | None = None,
) -> T:
    """Run ``loop(stop_fd, trio_token)`` in a worker thread and return its result (or raise
    its exception, as it is).

    ``loop`` must return soon after ``stop_fd`` becomes readable; that happens when this task is
    cancelled, and the cancellation is then raised here once the thread has returned.
    """

    def call(stop_fd: int, token: trio.lowlevel.TrioToken) -> tuple[bool, T | Exception]:
        try:
            return True, loop(stop_fd, token)
        except Exception as exc:  # raised below, outside the nursery: not in an ExceptionGroup
            return False, exc

    stop_r, stop_w = os.pipe()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_when_cancelled, stop_w)
            ok, result = await trio.to_thread.run_sync(
                call, stop_r, trio.lowlevel.current_trio_token(), limiter=limiter
            )
            nursery.cancel_scope.cancel()
        if not ok:
            assert isinstance(result, Exception)
            raise result
        return cast(T, result)
    finally:
        os.close(stop_r)
        os.close(stop_w)


async def _stop_when_cancelled(stop_fd: int) -> None:
    try:
        await trio.sleep_forever()
    finally:
        os.write(stop_fd, b"x")


def wait_writable(sock: socket.socket, stop_fd: int) -> bool:
    """Block until ``sock`` is writable (True) or ``stop_fd`` readable (False)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    poller.register(stop_fd, select.POLLIN)
    while True:
        ready = poller.poll()
        if any(fd == stop_fd for fd, _ in ready):
            return False
        if ready:
            return True
