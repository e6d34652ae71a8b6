"""``relayd status``: ask a running relayd's health endpoint and print one row per feed.

The endpoint is ``--url`` (``http://host:port``, ``host:port`` or a full ``.../healthz[/feed]``
URL) or else the ``[health] listen`` address of ``--config`` (default
``/etc/relayd/relayd.toml``, ``0.0.0.0`` asked on ``127.0.0.1``); without either,
``127.0.0.1:8080``.

Exit status: 0 when every feed is healthy, 1 when one is not (or relayd is stopping), 2 when the
configuration cannot be read, 3 when the health endpoint cannot be reached or does not answer as
relayd does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from relayd.config import DEFAULT_CONFIG_PATH, ConfigError, load_config

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
EXIT_CONFIG = 2
EXIT_UNREACHABLE = 3

DEFAULT_URL = "http://127.0.0.1:8080/healthz"
COLUMNS = ("FEED", "KIND", "STATE", "HEALTHY", "CONNECTIONS", "DATAGRAMS/S", "LAST DATAGRAM")
#: shown when some feed reports it (emit feeds that count gaps upstream of the capture side)
UPSTREAM_GAPS = ("upstream_gaps", "UPSTREAM GAPS")
#: a wildcard listen address is asked on the loopback address of its family
_LOCAL = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


class StatusError(Exception):
    """The health endpoint could not be asked or did not answer with relayd's JSON."""


class StatusConfigError(Exception):
    """The configuration that should name the health port cannot be read."""


def health_url(text: str) -> str:
    """``--url`` to the URL to GET: a scheme added when missing (``host:port``), ``/healthz``
    appended unless the path already names it (``/healthz`` or ``/healthz/<feed>``)."""
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise StatusError(f"not an http:// URL: {text!r}")
    path = parts.path.rstrip("/")
    if not (path.endswith("/healthz") or "/healthz/" in path + "/"):
        path += "/healthz"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def url_from_config(path: Path) -> str:
    """The health URL of the relayd that runs ``path``."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        raise StatusConfigError(f"{path}: {exc.errors[0]}") from None
    listen = config.health.listen
    host = _LOCAL.get(listen.host, listen.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{listen.port}/healthz"


def choose_url(url: str | None, config: Path | None) -> str:
    """``--url`` when given, else the config's health address (``--config`` or the default
    file when it exists), else :data:`DEFAULT_URL`."""
    if url is not None:
        return health_url(url)
    if config is not None:
        return url_from_config(config)
    if DEFAULT_CONFIG_PATH.is_file():
        if not os.access(DEFAULT_CONFIG_PATH, os.R_OK):
            # root:relayd 0640 on the appliance: say what is asked instead of failing
            print(
                f"relayd status: cannot read {DEFAULT_CONFIG_PATH} (run as root or in group"
                f" relayd, or give --url); asking {DEFAULT_URL}",
                file=sys.stderr,
            )
            return DEFAULT_URL
        return url_from_config(DEFAULT_CONFIG_PATH)
    return DEFAULT_URL


def fetch(target: str, timeout: float = 3.0) -> tuple[int, dict[str, Any]]:
    """GET ``target`` (a health URL): (HTTP status, JSON body). 503 is an answer, not an
    error."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(target, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
        exc.close()
    except urllib.error.URLError as exc:
        raise StatusError(f"cannot reach {target}: {exc.reason}") from None
    except (OSError, TimeoutError) as exc:
        raise StatusError(f"cannot reach {target}: {exc}") from None
    if status not in (200, 503):
        raise StatusError(f"{target} answered HTTP {status}")
    try:
        doc = json.loads(body)
    except ValueError:
        raise StatusError(f"{target} did not answer with JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("feeds"), dict):
        raise StatusError(f"{target} did not answer like relayd")
    return status, doc


def _connections(feed: Mapping[str, Any]) -> str:
    value = feed.get("connections")
    if isinstance(value, list | tuple | dict):
        return str(len(value))
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if feed.get("kind") == "capture":
        return "1" if feed.get("state") == "streaming" else "0"
    return "-"


def _rate(feed: Mapping[str, Any]) -> str:
    value = feed.get("datagrams_per_second")
    return f"{value:.1f}" if isinstance(value, int | float) else "-"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def format_age(seconds: Any) -> str:
    """``12ms ago``; ``none`` when nothing arrived (None); ``-`` when not reported."""
    if seconds is None:
        return "none"
    if not _is_number(seconds):
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms ago"
    if seconds < 120:
        return f"{seconds:.1f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def format_uptime(seconds: Any) -> str:
    if not _is_number(seconds):
        return "?"
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{s:02d}s"


def unhealthy_reason(feed: Mapping[str, Any]) -> str:
    """Why a feed is not healthy, from what its health JSON says."""
    state = str(feed.get("state", "?"))
    parts = [state]
    if _is_number(feed.get("disconnected_for")):
        parts[0] = f"{state} for {feed['disconnected_for']:.0f}s"
    if _is_number(feed.get("retry_in_seconds")):
        parts.append(f"retry in {feed['retry_in_seconds']:.0f}s")
    if feed.get("sending_failed"):
        parts.append("multicast sends fail")
    role = feed.get("role")
    if isinstance(role, dict) and role.get("reason"):
        parts.append(str(role["reason"]))
    for key in ("error", "last_error"):
        if feed.get(key):
            parts.append(f"{key.replace('_', ' ')}: {feed[key]}")
    if len(parts) == 1 and state == "starting":
        parts.append("not ready yet")
    return "; ".join(parts)


def arbitration_line(arbitration: Any) -> str:
    """What an emit feed's A/B arbitration did (its ``arbitration`` health entry), or "" when
    there is nothing to say (no arbitration and never two sessions at once)."""
    if not isinstance(arbitration, Mapping):
        return ""
    mode = arbitration.get("mode")
    concurrent = arbitration.get("concurrent_sessions")
    if mode == "none":
        if not _is_number(concurrent) or not concurrent:
            return ""
        return (
            f"{concurrent} capture sessions started while another streamed, without "
            "arbitration: each sent every datagram again"
        )

    def count(key: str) -> str:
        value = arbitration.get(key)
        return str(value) if _is_number(value) else "?"

    layout = arbitration.get("deribit_layout")
    text = (
        f"arbitration {mode}{f' ({layout})' if layout else ''}: "
        f"{count('duplicates')} duplicates suppressed, {count('gaps')} gaps "
        f"({count('missing')} missing), {count('overlaps')} overlaps, {count('resets')} "
        f"resets, {count('held_now')} held now"
    )
    shares = arbitration.get("sent_by_source")
    if isinstance(shares, Mapping) and shares:
        total = sum(v for v in shares.values() if _is_number(v)) or 1
        parts = [
            f"{source} {100 * value / total:.1f}%"
            for source, value in shares.items()
            if _is_number(value)
        ]
        text += "; sent by source: " + ", ".join(parts)
    return text


def upstream_line(feed: Mapping[str, Any]) -> str:
    """What a capture feed's upstream check counted, and the channel that lost most; empty
    without a check or when the exchange lost nothing."""
    check = feed.get("upstream")
    if not isinstance(check, dict):
        return ""
    counts = {key: check.get(key) for key in ("gaps", "missing", "duplicates", "resets")}
    if not any(_is_number(v) and v for v in counts.values()):
        return ""
    text = f"upstream ({check.get('layout', '?')}): " + ", ".join(
        f"{value} {key}" for key, value in counts.items() if _is_number(value)
    )
    top = check.get("top_channels")
    if isinstance(top, list) and top and isinstance(top[0], dict):
        worst = top[0]
        text += (
            f"; most on channel {worst.get('channel', '?')} ({worst.get('gaps', '?')} gaps, "
            f"{worst.get('missing', '?')} missing, {worst.get('duplicates', '?')} duplicates)"
        )
    return text


def gated_line(feed: Mapping[str, Any]) -> str:
    """How often and how long an emit feed's gate held emission back (empty when never)."""
    times, seconds = feed.get("emit_gated"), feed.get("emit_gated_seconds")
    if not _is_number(times) or not times:
        return ""
    waited = f", {seconds:.1f} s in all" if _is_number(seconds) else ""
    return (
        f"emit gate held datagrams back {times} times{waited} (a claim, a stale lease after a "
        "freeze or a starved observer, or standby)"
    )


def split_brain_line(feed: Mapping[str, Any]) -> str:
    """An emit feed's split-brain now, or how many it had (empty when none)."""
    role = feed.get("role")
    if not isinstance(role, dict) or not role.get("split_brains"):
        return ""
    events = int(role["split_brains"])
    if role.get("split_brain"):
        others = ", ".join(str(o.get("source")) for o in role.get("other_relays") or [])
        return f"SPLIT-BRAIN: this host and {others or 'another relay'} emit the feed ({events})"
    return f"split-brain events: {events} (resolved; role {role.get('role', '?')})"


def claim_line(feed: Mapping[str, Any]) -> str:
    """An emit feed claiming now (held streams, nothing emitted yet), or the claims it gave
    up (empty when neither)."""
    role = feed.get("role")
    if not isinstance(role, dict):
        return ""
    claims = role.get("claims")
    yielded = claims.get("yielded", 0) if isinstance(claims, dict) else 0
    won = claims.get("won", 0) if isinstance(claims, dict) else 0
    if role.get("role") == "claiming":
        since = role.get("claiming_for_seconds")
        period = role.get("claim_seconds")
        held = (
            f" for {since:.2f} s of {period:g} s"
            if _is_number(since) and _is_number(period)
            else ""
        )
        return f"CLAIMING{held}: streams held, nothing emitted until no other relay objects"
    if yielded:
        return (
            f"claims: {won} won, {yielded} yielded to another relay (role {role.get('role', '?')})"
        )
    return ""


def _feeds(doc: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    return [
        (str(name), feed) for name, feed in doc.get("feeds", {}).items() if isinstance(feed, dict)
    ]


def rows(doc: Mapping[str, Any]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """(column titles, one row per feed)."""
    feeds = _feeds(doc)
    gaps = any(UPSTREAM_GAPS[0] in feed for _, feed in feeds)
    columns = (*COLUMNS, UPSTREAM_GAPS[1]) if gaps else COLUMNS
    out: list[tuple[str, ...]] = []
    for name, feed in feeds:
        row: tuple[str, ...] = (
            name,
            str(feed.get("kind", "?")),
            str(feed.get("state", "?")),
            "yes" if feed.get("healthy") else "NO",
            _connections(feed),
            _rate(feed),
            format_age(feed["last_datagram_age_seconds"])
            if "last_datagram_age_seconds" in feed
            else "-",
        )
        if gaps:
            value = feed.get(UPSTREAM_GAPS[0])
            row = (*row, str(value) if _is_number(value) else "-")
        out.append(row)
        out.extend(_site_rows(name, feed, len(columns)))
    return columns, out


def _sites(feed: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """The sites of a capture feed that streams to several (``[[capture.site]]``)."""
    sites = feed.get("sites")
    if not isinstance(sites, dict):
        return []
    return [(str(name), site) for name, site in sites.items() if isinstance(site, dict)]


def _site_rows(name: str, feed: Mapping[str, Any], width: int) -> list[tuple[str, ...]]:
    """One row per site under its feed: ``feed/site``, its state, health and connection."""
    out = []
    for site, detail in _sites(feed):
        state = str(detail.get("state", "?"))
        row = (
            f"{name}/{site}",
            "site",
            state,
            "yes" if detail.get("healthy") else "NO",
            "1" if state in ("streaming", "stalled") else "0",
        )
        out.append((*row, *("-",) * (width - len(row))))
    return out


def render_table(doc: Mapping[str, Any], url: str = "") -> str:
    where = f" at {url}" if url else ""
    data_path = doc.get("data_path")
    lines = [
        f"relayd {doc.get('version', '?')}{where}: {doc.get('status', '?')}, "
        f"up {format_uptime(doc.get('uptime_seconds'))}"
        + (f", data path {data_path}" if data_path else "")
    ]
    columns, body = rows(doc)
    table: Sequence[tuple[str, ...]] = [columns, *body]
    if not body:
        lines.append("no feeds configured")
    else:
        widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
        for row in table:
            lines.append(
                "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            )
    for name, feed in _feeds(doc):
        if not feed.get("healthy"):
            lines.append(f"{name}: not healthy: {unhealthy_reason(feed)}")
        elif feed.get("ready") is False:
            lines.append(f"{name}: not ready: {unhealthy_reason(feed)}")
        for line in (split_brain_line(feed), claim_line(feed)):
            if line:
                lines.append(f"{name}: {line}")
    for name, feed in _feeds(doc):
        lines_of_feed = (
            arbitration_line(feed.get("arbitration")),
            upstream_line(feed),
            gated_line(feed),
        )
        for line in lines_of_feed:
            if line:
                lines.append(f"{name}: {line}")
        for site, detail in _sites(feed):
            if not detail.get("healthy"):
                lines.append(f"{name}/{site}: not healthy: {unhealthy_reason(detail)}")
    errors = doc.get("config_errors") or []
    if errors:
        lines.append(f"the last reload failed ({len(errors)} problems); the old config serves:")
        lines.extend(f"  {error}" for error in errors)
    return "\n".join(lines)


def main(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    stdout = out or sys.stdout
    stderr = err or sys.stderr
    try:
        target = choose_url(getattr(args, "url", None), getattr(args, "config", None))
        status, doc = fetch(target, float(getattr(args, "timeout", 3.0)))
    except StatusConfigError as exc:
        print(f"relayd status: {exc} (or give --url)", file=stderr)
        return EXIT_CONFIG
    except StatusError as exc:
        print(f"relayd status: {exc}", file=stderr)
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=False), file=stdout)
    else:
        print(render_table(doc, target.removesuffix("/healthz")), file=stdout)
    return EXIT_HEALTHY if status == 200 else EXIT_UNHEALTHY
