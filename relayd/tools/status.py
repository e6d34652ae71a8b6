"""``relayd status``: ask a running relayd's health endpoint and print one row per feed.

Exit status: 0 when every feed is healthy, 1 when one is not (or relayd is stopping), 3 when
the health endpoint cannot be reached or does not answer as relayd does.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
EXIT_UNREACHABLE = 3

COLUMNS = ("FEED", "KIND", "STATE", "HEALTHY", "CONNECTIONS", "DATAGRAMS/S", "LAST DATAGRAM")


class StatusError(Exception):
    """The health endpoint could not be asked or did not answer with relayd's JSON."""


def fetch(url: str, timeout: float = 3.0) -> tuple[int, dict[str, Any]]:
    """GET ``<url>/healthz``: (HTTP status, JSON body). 503 is an answer, not an error."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise StatusError(f"not an http:// URL: {url!r}")
    target = url.rstrip("/") + "/healthz"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:  # noqa: S310 - checked above
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


def format_age(seconds: Any) -> str:
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms ago"
    if seconds < 120:
        return f"{seconds:.1f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def format_uptime(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
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


def rows(doc: Mapping[str, Any]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for name, feed in doc.get("feeds", {}).items():
        if not isinstance(feed, dict):
            continue
        out.append(
            (
                str(name),
                str(feed.get("kind", "?")),
                str(feed.get("state", "?")),
                "yes" if feed.get("healthy") else "NO",
                _connections(feed),
                _rate(feed),
                format_age(feed.get("last_datagram_age_seconds")),
            )
        )
    return out


def render_table(doc: Mapping[str, Any]) -> str:
    lines = [
        f"relayd {doc.get('version', '?')}: {doc.get('status', '?')}, "
        f"up {format_uptime(doc.get('uptime_seconds'))}"
    ]
    table: Sequence[tuple[str, ...]] = [COLUMNS, *rows(doc)]
    if len(table) == 1:
        lines.append("no feeds configured")
    else:
        widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
        for row in table:
            lines.append(
                "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            )
    for name, feed in doc.get("feeds", {}).items():
        if isinstance(feed, dict) and not feed.get("healthy") and feed.get("last_error"):
            lines.append(f"{name}: last error: {feed['last_error']}")
    errors = doc.get("config_errors") or []
    if errors:
        lines.append(f"the last reload failed ({len(errors)} problems); the old config serves:")
        lines.extend(f"  {error}" for error in errors)
    return "\n".join(lines)


def main(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    stdout = out or sys.stdout
    stderr = err or sys.stderr
    try:
        status, doc = fetch(args.url, float(getattr(args, "timeout", 3.0)))
    except StatusError as exc:
        print(f"relayd status: {exc}", file=stderr)
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=False), file=stdout)
    else:
        print(render_table(doc), file=stdout)
    return EXIT_HEALTHY if status == 200 else EXIT_UNHEALTHY
