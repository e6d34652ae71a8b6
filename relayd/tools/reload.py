"""``relayd reload``: SIGHUP a running relayd and wait for that reload's outcome.

What systemd's ExecReload runs, so that ``systemctl reload relayd`` fails when the reload did:
it notes the time, sends SIGHUP to ``--pid``, then asks the health endpoint (``/healthz``,
its ``reload`` field) until a reload that began after the signal has finished. Exit status 0
when it applied, 1 when it was invalid or failed (each reason on stderr) or when no outcome
came within ``--timeout`` (systemd gives ExecReload ``TimeoutStartSec``).

The health address comes from ``--url`` or else from the configuration file's ``[health]
listen`` (a wildcard address is asked on loopback); a reload that moves the health server is
followed to its new address, where it answers only if the move succeeded.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, TextIO

from relayd.config import DEFAULT_CONFIG_PATH
from relayd.tools.status import StatusConfigError, StatusError, fetch, health_url, url_from_config

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_CONFIG: Final = 2

POLL_INTERVAL: Final = 0.1  # seconds between two questions to the health endpoint


def outcome_after(doc: Mapping[str, Any], since: float) -> Mapping[str, Any] | None:
    """The ``reload`` field of a ``/healthz`` body when that reload began at or after
    ``since`` (wall clock), else None (no reload yet, or an older one)."""
    reload = doc.get("reload")
    if not isinstance(reload, dict):
        return None
    started = reload.get("started_at")
    if not isinstance(started, int | float) or started < since:
        return None
    return reload


def wait_for_outcome(
    url: str, since: float, timeout: float
) -> tuple[Mapping[str, Any] | None, str]:
    """Ask ``url`` until a reload that began at or after ``since`` is reported; (its
    outcome, "") or (None, the last problem) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    problem = "no reload reported yet"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None, problem
        try:
            _status, doc = fetch(url, timeout=max(0.1, min(2.0, left)))
        except StatusError as exc:
            problem = str(exc)
        else:
            outcome = outcome_after(doc, since)
            if outcome is not None:
                return outcome, ""
        time.sleep(min(POLL_INTERVAL, max(0.0, deadline - time.monotonic())))


def main(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    stdout = out or sys.stdout
    stderr = err or sys.stderr
    path: Path = args.config or args.config_file or DEFAULT_CONFIG_PATH
    try:
        url = health_url(args.url) if args.url is not None else url_from_config(path)
    except (StatusError, StatusConfigError) as exc:
        print(f"relayd reload: {exc}", file=stderr)
        return EXIT_CONFIG
    since = time.time()
    try:
        os.kill(args.pid, signal.SIGHUP)
    except OSError as exc:
        print(f"relayd reload: cannot signal process {args.pid}: {exc.strerror}", file=stderr)
        return EXIT_FAILED
    outcome, problem = wait_for_outcome(url, since, args.timeout)
    if outcome is None:
        print(
            f"relayd reload: no outcome within {args.timeout:g} s ({problem})",
            file=stderr,
        )
        return EXIT_FAILED
    result = outcome.get("result")
    generation = outcome.get("generation")
    if result == "ok":
        print(f"reload {generation}: ok", file=stdout)
        return EXIT_OK
    print(
        f"relayd reload: reload {generation} {result}; the running configuration stays:",
        file=stderr,
    )
    for error in outcome.get("errors") or ():
        print(f"  {error}", file=stderr)
    return EXIT_FAILED
