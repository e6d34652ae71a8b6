"""systemd notification (``sd_notify``) without libsystemd: one datagram per message.

With ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace). Messages are ``KEY=value`` lines: ``READY=1``, ``RELOADING=1`` with
``MONOTONIC_USEC`` (systemd 253 and later want both), ``STOPPING=1``, ``STATUS=...`` and
``WATCHDOG=1``. Without ``NOTIFY_SOCKET`` every call does nothing at all.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

import trio

log = logging.getLogger(__name__)

STATE_WAIT = 1.0  # seconds a state change (READY, RELOADING, STOPPING) may wait for room
RETRY_INTERVAL = 0.01  # between two tries of a state change while systemd's queue is full


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def socket_address(value: str) -> str:
    """``NOTIFY_SOCKET`` as a ``sendto`` address; ``@name`` is the abstract ``\\0name``."""
    return "\0" + value[1:] if value.startswith("@") else value


class Notifier:
    """Sends notifications to systemd; a no-op when ``NOTIFY_SOCKET`` is unset or empty."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = socket_address(value) if value else None
        self._sock: socket.socket | None = None
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        self.watchdog_usec = _watchdog_usec(env)
        self.sent = 0

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not asked."""
        if not self.enabled or not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2e6

    def send(self, *lines: str) -> bool:
        """One datagram with the given ``KEY=value`` lines, never waiting; False when not
        sent (systemd gone, or its queue full: periodic messages are simply dropped then)."""
        return self._send(self._encode(lines)) is True

    async def send_state(self, *lines: str, wait: float = STATE_WAIT) -> bool:
        """Like ``send``, but when systemd's queue is full, retry for up to ``wait`` seconds:
        state changes (READY, RELOADING, STOPPING) must not be lost, as systemd would wait for
        them until its timeout. The event loop goes on meanwhile (``poll`` cannot say when an
        unconnected datagram socket's peer has room, so this retries on Trio's clock)."""
        data = self._encode(lines)
        with trio.move_on_after(wait):
            while True:
                sent = self._send(data)
                if sent is not None:
                    return sent
                await trio.sleep(RETRY_INTERVAL)
        return False

    @staticmethod
    def _encode(lines: tuple[str, ...]) -> bytes:
        return "\n".join(line.replace("\n", " ") for line in lines).encode("utf-8", "replace")

    def _send(self, data: bytes) -> bool | None:
        """True when sent, None when the queue is full, False on any other failure."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto(data, self.address)
        except BlockingIOError:
            return None
        except OSError as exc:
            # systemd gone: nothing to do but say so at debug level.
            log.debug("sd_notify failed: %s", exc)
            return False
        self.sent += 1
        return True

    async def ready(self, status: str | None = None) -> bool:
        lines = ("READY=1", *(() if status is None else (f"STATUS={status}",)))
        return await self.send_state(*lines)

    async def reloading(self, status: str | None = None) -> bool:
        lines = ["RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}"]
        if status is not None:
            lines.append(f"STATUS={status}")
        return await self.send_state(*lines)

    async def stopping(self, status: str | None = None) -> bool:
        lines = ("STOPPING=1", *(() if status is None else (f"STATUS={status}",)))
        return await self.send_state(*lines)

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    async def run_watchdog(self, alive: Callable[[], bool] = lambda: True) -> None:
        """Ping at half of WATCHDOG_USEC for as long as the event loop runs and ``alive()``
        says the rest of the process does (the data-path threads: ``datapath.
        data_threads_alive``).

        The ping comes from a Trio task, so an event loop that is stuck (a blocking call, a
        hot loop that never yields) stops pinging and systemd kills and restarts the process;
        so does a wedged data-path thread, through ``alive``.
        """
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            if alive():
                self.watchdog()
            await trio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (e.g. our parent)
    return usec if usec > 0 else None
