"""Which held connection makes room for a new one (sans-I/O): connection admission by source.

Used by the emit feeds' gate (connections pending their HELLO) and by the health server (its
HTTP connections), with the same rules. For an emit feed: a connection is *pending* from its
accept to its valid HELLO. An emit feed holds at most
``limit`` of them, and one source address at most ``per_source_limit`` (fewer). A new
connection from a source at its own cap takes the place of that source's oldest; when the
feed's cap is reached, the source holding the most pending connections gives up its oldest.
A source flooding silent connections therefore only ever evicts its own: a capture side
connecting from another address keeps its place until its HELLO arrives, whatever the flood's
rate times the round trip (behind a load balancer with client IP preservation, as an AWS NLB
with instance targets does, each capture host keeps its own source address).

A pending connection younger than ``protected_for`` is never evicted: while every candidate is
that young, the new connection is refused instead, before any handshake work. So a source
gets at most ``per_source_limit`` handshakes per ``protected_for``, a flood costs the accept
loop one ``accept`` and one ``close`` per connection, the listen queue stays short (a capture
side's SYN never waits behind thousands of a flood's), and a capture side sharing its address
with a flooder still has ``protected_for`` to say HELLO.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from typing import Final, Generic, TypeVar

__all__ = ["PROTECTED_FOR", "PendingTable", "Room", "per_source_default"]

T = TypeVar("T")

#: A pending connection is not evicted before this age (seconds): time for its HELLO to come
#: back over a slow path.
PROTECTED_FOR: Final = 0.5


class Room(enum.Enum):
    """What admitting one more connection from a source takes."""

    FREE = enum.auto()  # below both caps
    EVICT = enum.auto()  # the oldest of the source (or of the largest source) makes room
    REFUSED = enum.auto()  # every candidate is protected: refuse the newcomer


def per_source_default(limit: int) -> int:
    """A quarter of the feed's pending cap (at least 1): every other source keeps room for
    three quarters of it."""
    return max(1, limit // 4)


class PendingTable(Generic[T]):
    """Pending items by key, grouped by source, with the two caps and the age each was added
    at (on the caller's clock)."""

    def __init__(
        self, limit: int, per_source_limit: int, protected_for: float = PROTECTED_FOR
    ) -> None:
        if limit < 1 or per_source_limit < 1:
            raise ValueError(f"pending caps must be positive, not {limit}, {per_source_limit}")
        self.limit = limit
        self.per_source_limit = min(per_source_limit, limit)
        self.protected_for = protected_for
        self._items: dict[int, tuple[Hashable, T]] = {}
        self._by_source: dict[Hashable, dict[int, float]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def held_by(self, source: Hashable) -> int:
        """How many pending items ``source`` holds."""
        return len(self._by_source.get(source, ()))

    def room_for(self, source: Hashable, now: float) -> Room:
        """Whether a new item from ``source`` may be added at ``now``, and at what cost."""
        victim = self._victim_source(source)
        if victim is None:
            return Room.FREE
        oldest = next(iter(self._by_source[victim].values()))
        return Room.EVICT if now - oldest >= self.protected_for else Room.REFUSED

    def add(self, key: int, source: Hashable, item: T, now: float) -> T | None:
        """Hold ``item`` (after ``room_for`` said FREE or EVICT); returns the item evicted to
        make room for it (already removed), or None."""
        evicted = None
        victim = self._victim_source(source)
        if victim is not None:
            evicted = self.pop(next(iter(self._by_source[victim])))
        self._items[key] = (source, item)
        self._by_source.setdefault(source, {})[key] = now
        return evicted

    def pop(self, key: int, default: T | None = None) -> T | None:
        """Stop holding ``key`` (its HELLO arrived, or it closed); ``default`` when not held."""
        entry = self._items.pop(key, None)
        if entry is None:
            return default
        source, item = entry
        mine = self._by_source[source]
        del mine[key]
        if not mine:
            del self._by_source[source]
        return item

    def _victim_source(self, source: Hashable) -> Hashable | None:
        """The source that must give up its oldest for ``source`` to add one; None: room."""
        if self.held_by(source) >= self.per_source_limit:
            return source
        if len(self._items) >= self.limit:
            return max(self._by_source, key=self.held_by)
        return None
