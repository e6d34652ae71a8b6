"""The places one capture feed streams to (``[[capture.site]]``: London and Tokyo), each with
its own targets, replay buffer, ACK state and key, and the fan-out the receive threads hand
every batch to when there is more than one.

Sequence numbering stays one per feed (relayd/capture/receive.py): every site receives the
same numbered frames, and every site's replay buffer holds the same chunk objects (one copy
of the data). A site is an ``Uplink`` (its replay buffer and connection send state) and a
``Link`` (its connection loop); nothing is shared between two sites but the chunks, so a site
that is blocked, slow or disconnected never holds back another: its batches wait in its own
replay buffer, whose overflow is counted for that site alone.

With one site the receive threads talk to its ``Uplink`` directly (no fan-out: the path is
what it was). With several, ``Fanout`` offers the same two calls (``claim``, ``append``): the
data plane writes the batch straight to the first caught-up site's socket, as with one site,
and the fan-out writes the same bytes to every other caught-up site's socket (non-blocking;
what does not fit waits in that site's buffer for its sender task).
"""

from __future__ import annotations

import random
import socket
from collections.abc import Sequence

import attrs

from relayd.capture.link import Link
from relayd.capture.uplink import Uplink
from relayd.config import CaptureFeed, CaptureSite
from relayd.logs import RateLimitedLogger
from relayd.replay import Chunk, ReplayBuffer

__all__ = ["Fanout", "Site", "site_config"]


def site_config(feed: CaptureFeed, site: CaptureSite) -> CaptureFeed:
    """The feed's configuration as one site's link and uplink see it: the site's targets,
    bounds and key (``CaptureFeed.sites`` has filled in the feed's where a site has none)."""
    assert site.replay_max_bytes is not None
    assert site.replay_max_age is not None
    return attrs.evolve(
        feed,
        targets=site.targets,
        replay_max_bytes=site.replay_max_bytes,
        replay_max_age=site.replay_max_age,
        auth_key_file=site.auth_key_file,
        site=(),
    )


class Site:
    """One place the feed streams to: its replay buffer, uplink and connection loop."""

    def __init__(
        self,
        feed: CaptureFeed,
        site: CaptureSite,
        limited: RateLimitedLogger,
        rng: random.Random,
        session_id: bytes | None = None,
    ) -> None:
        config = site_config(feed, site)
        self.name = site.name  # "" for the one site of a feed with ``targets``
        label = feed.name if not site.name else f"{feed.name} (site {site.name})"
        self.replay = ReplayBuffer(config.replay_max_bytes, config.replay_max_age)
        self.uplink = Uplink(label, self.replay, limited)
        self.link = Link(config, self.uplink, limited, rng, label=label)
        if session_id is not None:  # one session per feed, whichever site
            self.link.session_id = session_id

    @property
    def labels(self) -> tuple[tuple[str, str], ...]:
        """The ``site`` label of this site's samples (none for the unnamed site)."""
        return (("site", self.name),) if self.name else ()


def _send(sock: socket.socket, data: bytes) -> tuple[int, int]:
    """Write what a non-blocking socket takes now: (bytes written, errno or 0)."""
    try:
        return sock.send(data), 0
    except (BlockingIOError, InterruptedError):
        return 0, 0
    except OSError as exc:
        return 0, exc.errno or 0


class Fanout:
    """Several sites behind the two calls a receive thread makes per batch. Only ever called
    under the receive side's sequencing lock (one batch at a time), which guards ``_claimed``."""

    def __init__(self, uplinks: Sequence[Uplink]) -> None:
        self._uplinks = tuple(uplinks)
        self._claimed: dict[Uplink, socket.socket] = {}
        self._first: Uplink | None = None  # whose socket the data plane writes the batch to

    def claim(self) -> socket.socket | None:
        """Claim the socket of every caught-up site; the first one is the data plane's."""
        claimed = {}
        for uplink in self._uplinks:
            sock = uplink.claim()
            if sock is not None:
                claimed[uplink] = sock
        self._claimed = claimed
        self._first = next(iter(claimed), None)
        return None if self._first is None else claimed[self._first]

    def append(self, chunk: Chunk | None, claimed: bool, sent: int, err: int) -> bool:
        """The batch to every site: written at once to each claimed socket (the first by the
        data plane: ``sent``, ``err``), into each site's replay buffer. True when a sender
        task must be woken."""
        wake = False
        first = self._first if claimed else None
        for uplink in self._uplinks:
            sock = self._claimed.get(uplink)
            if sock is None:
                wake |= uplink.append(chunk, False, 0, 0)
            elif uplink is first:
                wake |= uplink.append(chunk, True, sent, err)
            elif chunk is None:
                wake |= uplink.append(None, True, 0, 0)
            else:
                written, error = _send(sock, chunk.data)
                wake |= uplink.append(chunk, True, written, error)
        self._claimed = {}
        self._first = None
        return wake
