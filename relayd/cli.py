"""The ``relayd`` command line: ``run``, ``check-config``, ``status``, ``reload``, ``listen``,
``send``, ``demo``.

``run`` hands over to the supervisor; the tools (``status``, ``reload``, ``listen``, ``send``,
``demo``) live
in :mod:`relayd.tools`, which the daemon never imports. Each command's module is imported only
when that command runs, so that ``check-config`` (what systemd runs before every start and
reload) stays fast and never imports Trio.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from relayd import __version__
from relayd.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    GroupPort,
    key_file_warnings,
    load_config,
)
from relayd.units import UnitError, parse_duration

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "ListenOutcome",
    "build_parser",
    "main",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2  # also what argparse uses for a bad command line
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

_EPILOG = """\
exit status:
  0    success (check-config: the file is valid; run: stopped by SIGTERM or SIGINT)
  1    runtime failure (an address could not be bound, a request failed, ...)
  2    invalid configuration or command line
  130  interrupted by Ctrl-C (SIGINT) where the command does not treat it as a normal stop

Default configuration file: {config}
Configuration reference: /usr/share/doc/relayd/CONFIG.md on the appliance (docs/CONFIG.md in the
source); man relayd and man relayd-COMMAND.
"""


class ListenOutcome(enum.IntEnum):
    """Exit status of ``relayd listen`` (defined here: ``--help`` shows it without importing
    the tool); when several checks fail, the lowest code wins."""

    OK = 0
    ERROR = 1  # a socket or file error while running
    USAGE = 2  # bad arguments: not a multicast group, unknown interface
    NO_DATA = 3  # nothing arrived at all
    GROUP_SILENT = 4  # an expected group (--expect, --expect-all) got nothing
    GAPS = 5  # --fail-on-gaps: a Deribit channel skipped sequence numbers
    STALL = 6  # --stall: no datagram for longer than the limit after the first one
    TOO_FEW = 7  # below --min-rate, or fewer than --count before --duration ended


_LISTEN_EXIT = {
    ListenOutcome.OK: "every check passed",
    ListenOutcome.ERROR: "a socket or file error while running",
    ListenOutcome.USAGE: "invalid command line (not a multicast group, unknown interface, ...)",
    ListenOutcome.NO_DATA: "no datagram arrived",
    ListenOutcome.GROUP_SILENT: "an expected group (--expect, --expect-all) got no datagram",
    ListenOutcome.GAPS: "--fail-on-gaps: a Deribit channel skipped sequence numbers",
    ListenOutcome.STALL: "--stall: silence longer than the limit after the first datagram",
    ListenOutcome.TOO_FEW: "below --min-rate, or fewer than --count when --duration ended",
}

_LISTEN_EPILOG = """\
The run ends at --duration, after --count datagrams, or on Ctrl-C or SIGTERM; each way it
prints the summary and exits with the verdict of the checks.

exit status (when several checks fail, the lowest code):
{codes}

On a terminal the per-group table is redrawn in place; --json prints one object per line.
""".format(codes="\n".join(f"  {code.value}    {text}" for code, text in _LISTEN_EXIT.items()))


def _duration(text: str) -> float:
    """argparse type: a duration > 0 such as ``10``, ``2.5s`` or ``1m``."""
    try:
        seconds = parse_duration(text)
    except UnitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be > 0")
    return seconds


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: must be > 0")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: must be >= 0")
    return value


def _ttl(text: str) -> int:
    value = _positive_int(text)
    if value > 255:
        raise argparse.ArgumentTypeError(f"invalid TTL {text!r}: must be 1-255")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}: must be > 0")
    return value


def _group_port(text: str) -> GroupPort:
    try:
        return GroupPort.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--config",
        "-c",
        type=Path,
        metavar="PATH",
        help=f"configuration file (default: {DEFAULT_CONFIG_PATH})",
    )
    group.add_argument(
        "config_file",
        nargs="?",
        type=Path,
        metavar="PATH",
        help="the configuration file, as a positional argument",
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole command line. Each sub-command sets ``args.command``; the fields each one
    sets are listed in its help."""
    parser = argparse.ArgumentParser(
        prog="relayd",
        description="Carry UDP multicast market data over TCP and re-emit it as multicast.",
        epilog=_EPILOG.format(config=DEFAULT_CONFIG_PATH),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"relayd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            epilog=_EPILOG.format(config=DEFAULT_CONFIG_PATH),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    run = command("run", "run the capture and emit feeds of a configuration (systemd starts this)")
    _add_config_arguments(run)

    check = command("check-config", "validate a configuration file exactly as run and reload do")
    _add_config_arguments(check)

    status = command("status", "show the health of a running relayd, one row per feed")
    status.add_argument(
        "--url",
        default=None,
        help="health server as http://HOST:PORT, HOST:PORT or a full /healthz[/FEED] URL "
        "(default: the [health] listen address of --config)",
    )
    status.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"read the health address from this configuration (default: {DEFAULT_CONFIG_PATH}"
        " when it exists, else 127.0.0.1:8080)",
    )
    status.add_argument("--json", action="store_true", help="print the raw JSON instead")
    status.add_argument(
        "--timeout",
        type=_duration,
        default=3.0,
        metavar="DURATION",
        help="give up after this long (default: 3s)",
    )

    reload = command(
        "reload",
        "send SIGHUP to a running relayd and wait for the reload's outcome (systemd's "
        "ExecReload): exit 1 when it failed",
    )
    _add_config_arguments(reload)
    reload.add_argument(
        "--pid", type=_positive_int, required=True, help="the relayd process ($MAINPID)"
    )
    reload.add_argument(
        "--url",
        default=None,
        help="base URL of the health server (default: from the configuration's [health] listen)",
    )
    reload.add_argument(
        "--timeout",
        type=_duration,
        default=25.0,
        metavar="DURATION",
        help="give up after this long (default: 25s, under systemd's TimeoutStartSec)",
    )

    listen = commands.add_parser(
        "listen",
        help="join multicast groups, show what arrives, and pass or fail as a check",
        description="Join multicast groups and show per-group rates, senders and totals; the "
        "exit status says whether the checks passed, so a script or CI job can rely on it.",
        epilog=_LISTEN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    listen.add_argument(
        "groups",
        nargs="+",
        type=_group_port,
        metavar="GROUP:PORT",
        help="multicast group and UDP port, e.g. 239.111.111.1:6100",
    )
    listen.add_argument(
        "--interface",
        "-i",
        default="0.0.0.0",
        metavar="IF",
        help="interface name or IPv4 address to join on (default: %(default)s, any)",
    )
    listen.add_argument(
        "--duration",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="stop after this long, e.g. 30s (default: until Ctrl-C or --count)",
    )
    listen.add_argument(
        "--count",
        "-n",
        type=_positive_int,
        default=None,
        metavar="N",
        help="stop after N datagrams; with --duration, fewer by then fails (exit 7)",
    )
    listen.add_argument(
        "--interval",
        type=_duration,
        default=1.0,
        metavar="DURATION",
        help="report every this long (default: 1s)",
    )
    listen.add_argument("--json", action="store_true", help="one JSON object per report")
    listen.add_argument(
        "--deribit",
        action="store_true",
        help="decode Deribit's packet header and report gaps and duplicates per channel",
    )
    listen.add_argument(
        "--deribit-layout",
        choices=("frame-v1", "sbe"),
        default=None,
        help="the Deribit packet header: frame-v1 (8 bytes, the sample captures; the default) "
        "or sbe (the 24-byte SBE market data packet header); implies --deribit",
    )
    checks = listen.add_argument_group("checks (each failure has its own exit status)")
    checks.add_argument(
        "--expect",
        action="append",
        type=_group_port,
        default=[],
        metavar="GROUP:PORT",
        help="this group must get at least one datagram (repeatable; exit 4)",
    )
    checks.add_argument(
        "--expect-all",
        action="store_true",
        help="every group listened to must get at least one datagram (exit 4)",
    )
    checks.add_argument(
        "--min-rate",
        type=_positive_float,
        default=None,
        metavar="R",
        help="fail when the average rate over the run is below R datagrams/s (exit 7)",
    )
    checks.add_argument(
        "--fail-on-gaps",
        action="store_true",
        help="fail when a Deribit channel skips sequence numbers (implies --deribit; exit 5)",
    )
    checks.add_argument(
        "--stall",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="fail when no datagram arrives for longer than this after the first (exit 6)",
    )
    listen.add_argument(
        "--write",
        "-w",
        default=None,
        metavar="FILE.pcapng",
        help="write every datagram received to this pcapng file (replays with relayd send)",
    )

    send = command(
        "send",
        "send test multicast (a pcapng capture or synthetic Deribit-shaped traffic) to the "
        "groups of a configuration, to check an install end to end",
    )
    send.add_argument(
        "capture",
        nargs="?",
        default=None,
        metavar="FILE.pcapng",
        help="replay this capture (default: synthetic Deribit-shaped traffic)",
    )
    send.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None,
        metavar="PATH",
        help="send to the groups of a feed of this configuration (default for synthetic "
        f"traffic: {DEFAULT_CONFIG_PATH}; a capture goes to its own groups)",
    )
    send.add_argument(
        "--feed",
        default=None,
        metavar="NAME",
        help="the feed of --config: a capture feed's groups, or groups an emit feed allows "
        "(default: the first capture feed, else the first emit feed)",
    )
    send.add_argument(
        "--group",
        "-g",
        action="append",
        type=_group_port,
        default=[],
        metavar="GROUP:PORT",
        help="send to this group instead of a configuration's (repeatable)",
    )
    send.add_argument(
        "--interface",
        "-i",
        default=None,
        metavar="IF",
        help="egress interface name or IPv4 address (default: the feed's interface, else any)",
    )
    send.add_argument(
        "--rate",
        type=_positive_float,
        default=63.0,
        metavar="N",
        help="synthetic datagrams per second (default: %(default)s, Deribit's average)",
    )
    send.add_argument(
        "--speed",
        type=_non_negative_float,
        default=1.0,
        metavar="X",
        help="replay a capture X times faster than recorded; 0: as fast as possible "
        "(default: %(default)s)",
    )
    send.add_argument(
        "--count",
        "-n",
        type=_positive_int,
        default=None,
        metavar="N",
        help="stop after N datagrams (default: the whole capture; synthetic: until stopped)",
    )
    send.add_argument(
        "--duration",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="stop after this long (default: until done or Ctrl-C)",
    )
    send.add_argument(
        "--ttl",
        type=_ttl,
        default=1,
        metavar="N",
        help="multicast TTL, 1-255 (default: %(default)s, this subnet only)",
    )
    send.add_argument(
        "--no-loop",
        action="store_true",
        help="do not deliver to listeners on this host (default: delivered, so a capture feed "
        "here sees the traffic)",
    )
    send.add_argument(
        "--skip",
        action="append",
        type=int,
        default=[],
        metavar="INDEX",
        help="leave out the datagram with this 0-based index, to make a gap on purpose "
        "(repeatable)",
    )

    demo = command("demo", "relay a Deribit sample capture on loopback, no root or setup needed")
    demo.add_argument(
        "--duration",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="stop after this long (default: until Ctrl-C)",
    )
    demo.add_argument(
        "--speed",
        type=_positive_float,
        default=1.0,
        metavar="X",
        help="replay the capture X times faster than recorded (default: %(default)s)",
    )
    demo.add_argument(
        "--rate",
        type=_positive_int,
        default=None,
        metavar="N",
        help="send N datagrams per second instead of the capture's own pacing",
    )
    demo.add_argument(
        "--pcap",
        default=None,
        metavar="PATH",
        help="replay this pcapng capture (default: the Deribit sample when present, else "
        "synthetic Deribit-like traffic)",
    )
    return parser


def _config_path(args: argparse.Namespace) -> Path:
    path: Path | None = args.config or args.config_file
    return path if path is not None else DEFAULT_CONFIG_PATH


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def check_config(args: argparse.Namespace) -> int:
    """``relayd check-config``: one summary line on stdout and exit 0, or one line per problem
    on stderr, each prefixed by the file name, and exit 2."""
    path = _config_path(args)
    try:
        config = load_config(path)
    except ConfigError as exc:
        for error in exc.errors:
            print(f"{path}: {error}", file=sys.stderr)
        return EXIT_CONFIG
    for warning in key_file_warnings(config):
        print(f"{path}: warning: {warning}", file=sys.stderr)
    parts = []
    for feeds, noun in ((config.emit, "emit feed"), (config.capture, "capture feed")):
        names = f" ({', '.join(feed.name for feed in feeds)})" if feeds else ""
        parts.append(_plural(len(feeds), noun) + names)
    print(f"ok: {', '.join(parts)}")
    return EXIT_OK


_COMMAND_MODULES = frozenset(
    {
        "relayd.supervisor",
        "relayd.tools.status",
        "relayd.tools.reload",
        "relayd.tools.listen",
        "relayd.tools.send",
        "relayd.tools.demo",
    }
)


def _command_module(name: str) -> Any:
    """``relayd.<name>`` (``tools.status``, ...), imported on first use."""
    return importlib.import_module(f"relayd.{name}")


def run(args: argparse.Namespace) -> int:
    """``relayd run``: hand over to the supervisor (after checking ``RELAYD_DATAPATH``)."""
    from relayd import fastpath  # noqa: PLC0415 - only the run command needs it

    try:
        fastpath.load()
    except fastpath.DataPathError as exc:
        print(f"relayd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    run_main = cast(Callable[[Path], int], _command_module("supervisor").run_main)
    return run_main(_config_path(args))


def _delegate(module: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        entry = cast(Callable[[argparse.Namespace], int], _command_module(module).main)
        return entry(args)

    return handler


_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": run,
    "check-config": check_config,
    "status": _delegate("tools.status"),
    "reload": _delegate("tools.reload"),
    "listen": _delegate("tools.listen"),
    "send": _delegate("tools.send"),
    "demo": _delegate("tools.demo"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command and return its exit status.

    ``--help``, ``--version`` and command-line errors return 0 or 2 as argparse prints them."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        if exc.code is None:
            return EXIT_OK
        return exc.code if isinstance(exc.code, int) else EXIT_CONFIG
    try:
        return _HANDLERS[args.command](args)
    except ModuleNotFoundError as exc:
        if exc.name not in _COMMAND_MODULES:
            raise
        print(f"relayd: {args.command}: not available ({exc.name} is missing)", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("relayd: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
