"""Which pending connection makes room for a new one (sans-I/O).

A connection is *pending* from its accept to its valid HELLO. An emit feed holds at most
``limit`` of them, and one source address at most ``per_source_limit`` (fewer). A new
connection from a source at its own cap takes the place of that source's oldest; when the
feed's cap is reached, the source holding the most pending connections gives up its oldest.
A source flooding silent connections therefore only ever evicts its own: a capture side
connecting from another address keeps its place until its HELLO arrives, whatever the flood's
rate times the round trip (behind a load balancer with client IP preservation, as an AWS NLB
with instance targets does, each capture host keeps its own source address).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["PendingTable", "per_source_default"]

T = TypeVar("T")


def per_source_default(limit: int) -> int:
    """A quarter of the feed's pending cap (at least 1, and below the cap when it can be):
    every other source keeps room for three quarters of it."""
    return max(1, min(limit - 1, limit // 4)) if limit > 1 else 1


class PendingTable(Generic[T]):
    """Pending items by key, grouped by source, with the two caps."""

    def __init__(self, limit: int, per_source_limit: int) -> None:
        if limit < 1 or per_source_limit < 1:
            raise ValueError(f"pending caps must be positive, not {limit}, {per_source_limit}")
        self.limit = limit
        self.per_source_limit = min(per_source_limit, limit)
        self._items: dict[int, tuple[Hashable, T]] = {}
        self._by_source: dict[Hashable, dict[int, T]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def held_by(self, source: Hashable) -> int:
        """How many pending items ``source`` holds."""
        return len(self._by_source.get(source, ()))

    def add(self, key: int, source: Hashable, item: T) -> T | None:
        """Hold ``item``; returns the item evicted to make room for it (already removed),
        or None."""
        evicted = None
        if self.held_by(source) >= self.per_source_limit:
            evicted = self._pop_oldest(source)
        elif len(self._items) >= self.limit:
            evicted = self._pop_oldest(max(self._by_source, key=self.held_by))
        self._items[key] = (source, item)
        self._by_source.setdefault(source, {})[key] = item
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

    def _pop_oldest(self, source: Hashable) -> T:
        key = next(iter(self._by_source[source]))
        item = self.pop(key)
        assert item is not None
        return item
