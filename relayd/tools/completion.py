"""Bash completion for ``relayd``, generated from the argparse definitions (``relayd.cli``).

``python -m relayd.tools.completion`` prints the script; the image build installs it as
``/usr/share/bash-completion/completions/relayd``. Sub-commands, their options, files for
options that take a path and interface names for ``--interface``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from relayd.cli import build_parser

__all__ = ["script"]

_FILE_METAVARS = ("PATH", "FILE.pcapng")
_INTERFACE_METAVARS = ("IF",)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    # argparse keeps its sub-commands in a private action
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _takes(action: argparse.Action, metavars: tuple[str, ...]) -> bool:
    return action.type is Path or action.metavar in metavars


def script(parser: argparse.ArgumentParser | None = None) -> str:
    top = parser or build_parser()
    commands = _subparsers(top)
    top_options = [o for a in top._actions for o in a.option_strings]
    cases = []
    files: set[str] = set()
    interfaces: set[str] = set()
    positional_files: list[str] = []
    for name, sub in commands.items():
        options = [o for a in sub._actions for o in a.option_strings]
        cases.append(f'    {name}) opts="{" ".join(options)}" ;;')
        for action in sub._actions:
            if action.option_strings and _takes(action, _FILE_METAVARS):
                files.update(action.option_strings)
            elif action.option_strings and _takes(action, _INTERFACE_METAVARS):
                interfaces.update(action.option_strings)
            elif not action.option_strings and _takes(action, _FILE_METAVARS):
                positional_files.append(name)
    return f"""\
# bash completion for relayd, generated from its command line by relayd.tools.completion
_relayd() {{
  local cur prev command opts
  cur=${{COMP_WORDS[COMP_CWORD]}}
  prev=""
  [ "$COMP_CWORD" -gt 0 ] && prev=${{COMP_WORDS[COMP_CWORD - 1]}}
  COMPREPLY=()
  if [ "$COMP_CWORD" -le 1 ]; then
    mapfile -t COMPREPLY < <(compgen -W "{" ".join([*commands, *top_options])}" -- "$cur")
    return 0
  fi
  case "$prev" in
    {"|".join(sorted(files))})
      mapfile -t COMPREPLY < <(compgen -f -- "$cur")
      return 0
      ;;
    {"|".join(sorted(interfaces))})
      mapfile -t COMPREPLY < <(compgen -W "$(ls /sys/class/net 2>/dev/null)" -- "$cur")
      return 0
      ;;
  esac
  command=${{COMP_WORDS[1]}}
  case "$command" in
{chr(10).join(cases)}
    *) return 0 ;;
  esac
  if [[ "$cur" == -* ]]; then
    mapfile -t COMPREPLY < <(compgen -W "$opts" -- "$cur")
  else
    case "$command" in
      {"|".join(positional_files) or "''"}) mapfile -t COMPREPLY < <(compgen -f -- "$cur") ;;
      *) mapfile -t COMPREPLY < <(compgen -W "$opts" -- "$cur") ;;
    esac
  fi
  return 0
}}
complete -o filenames -F _relayd relayd
"""


if __name__ == "__main__":
    sys.stdout.write(script())
