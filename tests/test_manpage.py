"""Man pages and bash completion, both generated from the argparse definitions."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest

from relayd.cli import build_parser
from relayd.tools.completion import script
from relayd.tools.manpage import main, pages, roff_escape


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no sub-commands")


def test_one_page_per_command_naming_every_option() -> None:
    generated = pages()
    commands = _commands()
    assert set(generated) == {"relayd.1", *(f"relayd-{c}.1" for c in commands)}
    for command, parser in commands.items():
        page = generated[f"relayd-{command}.1"]
        assert page.startswith(f'.TH RELAYD-{command.upper()} 1 ""')
        for action in parser._actions:
            for option in action.option_strings:
                assert f"\\fB{roff_escape(option)}\\fR" in page, (command, option)
        assert f"\\fBrelayd {roff_escape(command)}\\fR" in generated["relayd.1"]
    listen = generated["relayd-listen.1"]
    assert "no datagram arrived" in listen  # the exit status table of --help
    assert "/usr/share/doc/relayd" in listen
    assert pages() == generated  # no date: the same source gives the same bytes


def test_roff_escape() -> None:
    assert roff_escape("--count") == "\\-\\-count"
    assert roff_escape("a\\b") == "a\\eb"
    assert roff_escape(".not a request\n'nor this") == "\\&.not a request\n\\&'nor this"


@pytest.mark.skipif(shutil.which("groff") is None, reason="needs groff")
def test_pages_render_without_warnings(tmp_path: Path) -> None:
    assert main([str(tmp_path)]) == 0
    for page in sorted(tmp_path.glob("*.1")):
        result = subprocess.run(
            ["groff", "-man", "-Tutf8", "-ww", "-z", str(page)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert (result.returncode, result.stderr) == (0, ""), page.name
    text = subprocess.run(
        ["groff", "-man", "-Tascii", "-P-cbou", str(tmp_path / "relayd-status.1")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "relayd-status - show the health of a running relayd" in text
    assert "--url URL" in text


def _complete(words: list[str], tmp_path: Path) -> list[str]:
    path = tmp_path / "relayd.bash"
    path.write_text(script())
    line = " ".join(f"'{w}'" for w in words)
    code = (
        f'source "{path}"; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _relayd;'
        ' printf "%s\\n" "${COMPREPLY[@]}"'
    )
    result = subprocess.run(
        ["bash", "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    return [word for word in result.stdout.splitlines() if word]


def test_completion(tmp_path: Path) -> None:
    (tmp_path / "feeds.toml").write_text("")
    assert _complete(["relayd", "li"], tmp_path) == ["listen"]
    assert _complete(["relayd", "listen", "--ex"], tmp_path) == ["--expect", "--expect-all"]
    assert _complete(["relayd", "status", "--config", "fee"], tmp_path) == ["feeds.toml"]
    assert _complete(["relayd", "check-config", "fe"], tmp_path) == ["feeds.toml"]
    assert "lo" in _complete(["relayd", "listen", "-i", ""], tmp_path)
    assert _complete(["relayd", "nosuch", "--"], tmp_path) == []


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="needs shellcheck")
def test_completion_is_shellcheck_clean(tmp_path: Path) -> None:
    path = tmp_path / "relayd.bash"
    path.write_text(script())
    subprocess.run(["shellcheck", "-s", "bash", str(path)], check=True)
