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
from collections.abc import Mapping

import trio

log = logging.getLogger(__name__)

STATE_WAIT = 1.0  # seconds a state change (READY, RELOADING, STOPPING) may wait for room


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

    def send(self, *lines: str, wait: float = 0.0) -> bool:
        """One datagram with the given ``KEY=value`` lines; False when not sent.

        The send never blocks, unless the receiving queue is full and ``wait`` > 0: then it
        waits up to ``wait`` seconds for room. Periodic messages (STATUS, WATCHDOG) are simply
        dropped when systemd lags; state changes (READY, RELOADING, STOPPING) wait, because
        systemd would otherwise wait for them until its timeout.
        """
        if self._sock is None or self.address is None:
            return False
        data = "\n".join(line.replace("\n", " ") for line in lines).encode("utf-8", "replace")
        try:
            try:
                self._sock.sendto(data, self.address)
            except BlockingIOError:
                if wait <= 0:
                    raise
                self._sock.settimeout(wait)
                try:
                    self._sock.sendto(data, self.address)
                finally:
                    self._sock.setblocking(False)
        except OSError as exc:
            # systemd gone or its queue full: nothing to do but say so at debug level.
            log.debug("sd_notify failed: %s", exc)
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        lines = ("READY=1", *(() if status is None else (f"STATUS={status}",)))
        return self.send(*lines, wait=STATE_WAIT)

    def reloading(self, status: str | None = None) -> bool:
        lines = ["RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}"]
        if status is not None:
            lines.append(f"STATUS={status}")
        return self.send(*lines, wait=STATE_WAIT)

    def stopping(self, status: str | None = None) -> bool:
        lines = ("STOPPING=1", *(() if status is None else (f"STATUS={status}",)))
        return self.send(*lines, wait=STATE_WAIT)

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    async def run_watchdog(self) -> None:
        """Ping at half of WATCHDOG_USEC for as long as the event loop runs.

        The ping comes from a Trio task, so an event loop that is stuck (a blocking call, a
        hot loop that never yields) stops pinging and systemd kills and restarts the process.
        """
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
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
