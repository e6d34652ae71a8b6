"""The places one capture feed streams to (``[[capture.site]]``: London and Tokyo), each with
its own targets, replay buffer, ACK state and key, and the fan-out the receive threads hand
every batch to when there is more than one.

Sequence numbering stays one per feed (relayd/capture/receive.py): every site receives the
same numbered frames, and every site's replay buffer holds the same chunk objects (one copy
of the data). A site is an ``Uplink`` (its replay buffer and connection send state) and a
``Link`` (its connection loop); nothing is shared between two sites but the chunks, so a site
that is blocked, slow or disconnected never holds back another: its batches wait in its own
replay buffer, whose overflow is counted for that site alone.

With one site the receive threads talk to its ``Uplink`` directly (no fan-out). With several,
``Fanout`` offers the same two calls (``claim_word``, ``append``): the data plane claims the
first site's socket and writes each batch to it as it receives it, as with one site, and the
fan-out claims every other caught-up site's socket and writes the same bytes to it
(non-blocking; what does not fit waits in that site's buffer for its sender task).
"""

from __future__ import annotations

import random
import socket
from collections.abc import Sequence

import attrs

from relayd.capture.link import Link
from relayd.capture.uplink import Uplink
from relayd.config import CaptureFeed, CaptureSite
from relayd.datapath import ClaimWord, DataPlane
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
    """Several sites behind the two calls a receive thread makes per batch (under the receive
    side's numbering: one batch at a time)."""

    def __init__(self, uplinks: Sequence[Uplink]) -> None:
        self._uplinks = tuple(uplinks)

    def claim_word(self, plane: DataPlane) -> ClaimWord:
        """The first site's: the data plane writes each batch to it."""
        return self._uplinks[0].claim_word(plane)

    def append(self, chunk: Chunk | None, claimed: bool, sent: int, err: int) -> bool:
        """The batch to every site: written at once to each caught-up site's socket (the
        first site's by the data plane: ``claimed``, ``sent``, ``err``), into each site's
        replay buffer. True when a sender task must be woken."""
        first, *others = self._uplinks
        wake = first.append(chunk, claimed, sent, err)
        if chunk is None:
            return wake
        for uplink in others:
            sock = uplink.claim()
            if sock is None:
                wake |= uplink.append(chunk, False, 0, 0)
            else:
                written, error = _send(sock, chunk.data)
                wake |= uplink.append(chunk, True, written, error)
        return wake
