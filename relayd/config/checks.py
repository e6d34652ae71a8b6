"""The rules across fields and across tables, pure (no I/O).

Per table (yielding ``(field, message)``, run when cattrs structures the table) and across
the whole file (run on the raw values that parse on their own, so that a rule is reported
even when another key of the same table is broken).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from relayd.config.model import MAX_SITES, CaptureFeed, EmitFeed, HealthConfig
from relayd.config.parsers import Parser, T, _feed_name, _listen_endpoint
from relayd.config.values import Endpoint
from relayd.units import format_duration


def _check_timeouts(feed: EmitFeed | CaptureFeed) -> Iterator[tuple[str, str]]:
    if feed.idle_timeout <= feed.heartbeat_interval:
        yield (
            "idle_timeout",
            f"idle_timeout ({format_duration(feed.idle_timeout)}) must be longer than "
            f"heartbeat_interval ({format_duration(feed.heartbeat_interval)})",
        )


def _check_emit(feed: EmitFeed) -> Iterator[tuple[str, str]]:
    yield from _check_timeouts(feed)
    beacon = feed.beacon_destination()
    if beacon is not None and beacon.port in {g.port for g in feed.watch_groups}:
        yield (
            "beacon_port",
            f"the beacons would go to port {beacon.port}, a port of watch_groups (customers "
            "bound to it would receive them): set beacon_port to a port the feed does not use",
        )


def _check_sites(feed: CaptureFeed) -> Iterator[tuple[str, str]]:
    if feed.targets and feed.site:
        yield (
            "targets",
            "give targets or [[capture.site]] tables, not both (targets is the one site of a "
            "feed without [[capture.site]])",
        )
    elif not feed.targets and not feed.site:
        yield "targets", "required: targets, or one or more [[capture.site]] tables"
    if len(feed.site) > MAX_SITES:
        yield "site", f"{len(feed.site)} sites, at most {MAX_SITES}"
    first: dict[str, int] = {}
    for index, site in enumerate(feed.site):
        if site.name in first:
            yield "site", f"duplicate site name {site.name!r} (also site[{first[site.name]}])"
        first.setdefault(site.name, index)


def _check_capture(feed: CaptureFeed) -> Iterator[tuple[str, str]]:
    yield from _check_timeouts(feed)
    yield from _check_sites(feed)


def _tables(raw: Mapping[str, Any], kind: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """``(path, table)`` for each table of an array of tables that is one."""
    items = raw.get(kind)
    if isinstance(items, list):
        for index, item in enumerate(items):
            if isinstance(item, dict):
                yield f"$.{kind}[{index}]", item


def _try(parser: Parser[T], value: Any) -> T | None:
    """``parser(value)``, or None when the value is invalid (and so reported elsewhere)."""
    try:
        return parser(value)
    except (TypeError, ValueError):
        return None


def _lenient(table: Mapping[str, Any], key: str, parser: Parser[T]) -> T | None:
    """The parsed value of ``table[key]``, or None when it is absent or invalid."""
    return _try(parser, table[key]) if key in table else None


def _cross_checks(raw: Mapping[str, Any]) -> Iterator[str]:
    for kind in ("emit", "capture"):
        first_name: dict[str, str] = {}
        for where, table in _tables(raw, kind):
            name = _lenient(table, "name", _feed_name)
            if name is None:
                continue
            if name in first_name:
                yield f"duplicate feed name {name!r} (also {first_name[name]}) @ {where}.name"
            first_name.setdefault(name, f"{where}.name")

    listeners: list[tuple[str, Endpoint | None]] = []
    health = raw.get("health", {})
    if isinstance(health, dict):
        if "listen" in health:
            listeners.append(("$.health.listen", _lenient(health, "listen", _listen_endpoint)))
        else:
            listeners.append(("$.health.listen", HealthConfig().listen))
    for where, table in _tables(raw, "emit"):
        listeners.append((f"{where}.listen", _lenient(table, "listen", _listen_endpoint)))
    first_port: dict[int, str] = {}
    for where, endpoint in listeners:
        if endpoint is None or endpoint.port == 0:  # 0: any free port, never a conflict
            continue
        if endpoint.port in first_port:
            yield f"port {endpoint.port} is already used by {first_port[endpoint.port]} @ {where}"
        first_port.setdefault(endpoint.port, where)
