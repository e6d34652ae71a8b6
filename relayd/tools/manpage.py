"""Man pages generated from the command line's argparse definitions (``relayd.cli``).

``python -m relayd.tools.manpage DIR`` writes ``relayd.1`` and one ``relayd-COMMAND.1`` per
sub-command into DIR; the image build (packer/scripts/install.sh) runs it, so the pages always
say what ``--help`` says. No date in the pages: the same source gives the same bytes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from relayd import __version__
from relayd.cli import build_parser
from relayd.config import DEFAULT_CONFIG_PATH

__all__ = ["main", "pages", "roff_escape"]

DOC_DIR = "/usr/share/doc/relayd"


def roff_escape(text: str) -> str:
    """Text as roff shows it literally: backslashes, hyphens, and a leading dot or quote."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    lines = [("\\&" + line) if line.startswith((".", "'")) else line for line in out.split("\n")]
    return "\n".join(lines)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    # argparse keeps its sub-commands in a private action; every man-page generator reads it
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {choice.dest: choice.help or "" for choice in action._choices_actions}
    return {}


def _option_label(action: argparse.Action) -> str:
    """``\\fB\\-\\-count\\fR, \\fB\\-n\\fR \\fIN\\fR`` or ``\\fIGROUP:PORT\\fR``."""
    metavar = action.metavar if isinstance(action.metavar, str) else None
    if not action.option_strings:
        return f"\\fI{roff_escape(metavar or action.dest)}\\fR"
    names = ", ".join(f"\\fB{roff_escape(name)}\\fR" for name in action.option_strings)
    if action.nargs == 0:
        return names
    value = metavar or action.dest.upper()
    return f"{names} \\fI{roff_escape(value)}\\fR"


def _expand(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        params = {**vars(action), "prog": parser.prog}
        params = {k: v.__name__ if hasattr(v, "__name__") else v for k, v in params.items()}
        text = text % params
    return text


def _options(parser: argparse.ArgumentParser) -> Iterator[str]:
    for group in parser._action_groups:
        actions = [
            a
            for a in group._group_actions
            if a.help != argparse.SUPPRESS and not isinstance(a, argparse._SubParsersAction)
        ]
        if not actions:
            continue
        title = group.title or "options"
        yield f".SS {roff_escape(title[0].upper() + title[1:])}"
        for action in actions:
            yield ".TP"
            yield _option_label(action)
            yield roff_escape(_expand(parser, action))


def _verbatim(text: str) -> Iterator[str]:
    yield ".nf"
    yield roff_escape(text.rstrip())
    yield ".fi"


def _page(
    name: str,
    summary: str,
    parser: argparse.ArgumentParser,
    body: Sequence[str],
    see_also: Sequence[str],
) -> str:
    usage = parser.format_usage().removeprefix("usage: ").strip()
    lines = [
        f'.TH {name.upper()} 1 "" "relayd {__version__}" "relayd manual"',
        ".SH NAME",
        f"{roff_escape(name)} \\- {roff_escape(summary)}",
        ".SH SYNOPSIS",
        *_verbatim(usage),
        ".SH DESCRIPTION",
        roff_escape(parser.description or summary),
        *body,
        *_options(parser),
    ]
    if parser.epilog:
        lines += [".SH NOTES", *_verbatim(parser.epilog)]
    lines += [
        ".SH FILES",
        ".TP",
        roff_escape(str(DEFAULT_CONFIG_PATH)),
        "the configuration relayd runs and the default of \\fB\\-\\-config\\fR",
        ".TP",
        roff_escape(DOC_DIR),
        "the documentation: README.md, CHANGELOG.md, CONFIG.md (every setting),"
        " OPERATIONS.md (health, metrics, tools)",
        ".SH SEE ALSO",
        ", ".join(f"\\fB{roff_escape(page)}\\fR(1)" for page in see_also),
    ]
    return "\n".join(lines) + "\n"


def pages(parser: argparse.ArgumentParser | None = None) -> dict[str, str]:
    """File name -> roff text: ``relayd.1`` and ``relayd-COMMAND.1`` for every sub-command."""
    top = parser or build_parser()
    commands = _subparsers(top)
    helps = _helps(top)
    names = [f"relayd-{command}" for command in commands]
    listing = [".SH COMMANDS"]
    for command in commands:
        listing += [".TP", f"\\fBrelayd {roff_escape(command)}\\fR", roff_escape(helps[command])]
    out = {"relayd.1": _page("relayd", top.description or "", top, listing, names)}
    for command, sub in commands.items():
        others = ["relayd", *(n for n in names if n != f"relayd-{command}")]
        out[f"relayd-{command}.1"] = _page(f"relayd-{command}", helps[command], sub, [], others)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m relayd.tools.manpage DIR", file=sys.stderr)
        return 2
    target = Path(args[0])
    target.mkdir(parents=True, exist_ok=True)
    for name, text in pages().items():
        (target / name).write_text(text, encoding="utf-8")
        print(target / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
