"""The command line: --version, --help, check-config end to end (also as a real process),
and the arguments every other sub-command receives."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from ipaddress import IPv4Address
from pathlib import Path

import pytest

import relayd
from relayd import cli
from relayd.config import DEFAULT_CONFIG_PATH, GroupPort
from tests.helpers.relayd_process import RelaydProcess, emit_toml, get_json, process_toml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "etc" / "relayd"

BROKEN = """\
[[emit]]
name = "dev"
listen = "0.0.0.0:8080"
interface = "ens5"
allowed_sources = ["10.20.0.1/24"]
allowed_groups = ["239.111.111.0/27"]
ttl = "16"
"""


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"relayd {relayd.__version__}\n"


def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("run", "check-config", "status", "listen", "demo"):
        assert command in out
    assert "exit status:" in out
    for code in ("0 ", "1 ", "2 ", "130 "):
        assert f"\n  {code}" in out


def test_run_refuses_an_unknown_data_path(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RELAYD_DATAPATH", "fast")
    assert cli.main(["run", "--config", "/nonexistent/relayd.toml"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "RELAYD_DATAPATH='fast': expected auto, c or python" in err


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "required: COMMAND" in capsys.readouterr().err


def test_unknown_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config", "--no-such-option"]) == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "summary"),
    [
        ("relayd.toml", "ok: 2 emit feeds (prod, dev), 0 capture feeds\n"),
        ("capture.example.toml", "ok: 0 emit feeds, 2 capture feeds (prod, dev)\n"),
    ],
)
def test_check_config_examples(name: str, summary: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(EXAMPLES / name)
    # Authentication is on in the examples; where the keys are not provisioned (a fresh
    # clone) each missing key file is one warning line, and the exit status stays 0.
    warnings = "".join(
        f"{path}: warning: key file /etc/relayd/keys/{feed}.key does not exist yet; feed"
        f" {feed!r} will not start until it does @ {where}\n"
        for feed, where in (
            [("prod", "$.emit[0].auth_key_files[0]"), ("dev", "$.emit[1].auth_key_files[0]")]
            if name == "relayd.toml"
            else [("prod", "$.capture[0].auth_key_file"), ("dev", "$.capture[1].auth_key_file")]
        )
        if not Path(f"/etc/relayd/keys/{feed}.key").exists()
    )
    assert cli.main(["check-config", "--config", path]) == 0
    assert capsys.readouterr() == (summary, warnings)
    assert cli.main(["check-config", path]) == 0
    assert capsys.readouterr() == (summary, warnings)


def test_check_config_one_feed_is_singular(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "one.toml"
    path.write_text(BROKEN.replace('"16"', "16").replace(".1/24", ".0/24").replace("8080", "0"))
    assert cli.main(["check-config", "-c", str(path)]) == 0
    assert capsys.readouterr().out == "ok: 1 emit feed (dev), 0 capture feeds\n"


def test_check_config_broken(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(BROKEN)
    assert cli.main(["check-config", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}: invalid CIDR '10.20.0.1/24': host bits set (did you mean 10.20.0.0/24?)"
        " @ $.emit[0].allowed_sources[0]",
        f'{path}: invalid value for type, expected int @ $.emit[0].ttl (got "16")',
        f"{path}: port 8080 is already used by $.health.listen @ $.emit[0].listen",
    ]


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.toml"
    assert cli.main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err == f"{path}: cannot read {path}: No such file or directory\n"


def test_config_given_twice_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config", "a.toml", "--config", "b.toml"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_interrupt_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setitem(cli._HANDLERS, "check-config", interrupted)
    assert cli.main(["check-config"]) == 130
    assert capsys.readouterr().err == "relayd: interrupted\n"


def _run_process(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env=env,
    )


def test_python_m_relayd_exit_codes(tmp_path: Path) -> None:
    good = _run_process("-m", "relayd", "check-config", str(EXAMPLES / "relayd.toml"))
    assert (good.returncode, good.stdout) == (0, "ok: 2 emit feeds (prod, dev), 0 capture feeds\n")
    path = tmp_path / "broken.toml"
    path.write_text(BROKEN)
    bad = _run_process("-m", "relayd", "check-config", "--config", str(path))
    assert bad.returncode == 2
    assert len(bad.stderr.splitlines()) == 3
    version = _run_process("-m", "relayd", "--version")
    assert (version.returncode, version.stdout) == (0, f"relayd {relayd.__version__}\n")


def test_check_config_does_not_import_trio() -> None:
    code = (
        "import sys\n"
        "from relayd.cli import main\n"
        f"code = main(['check-config', {str(EXAMPLES / 'relayd.toml')!r}])\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'hypercorn'))\n"
        "print(code, loaded)\n"
    )
    result = _run_process("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "0 []"


# --------------------------------------------------------------------------------------------
# What the other sub-commands receive


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(argv)


def test_run_arguments() -> None:
    args = parse("run")
    assert args.command == "run"
    assert cli._config_path(args) == DEFAULT_CONFIG_PATH
    assert cli._config_path(parse("run", "--config", "x.toml")) == Path("x.toml")
    assert cli._config_path(parse("run", "y.toml")) == Path("y.toml")


def test_status_arguments() -> None:
    args = parse("status")
    assert (args.command, args.url, args.config, args.json, args.timeout) == (
        "status",
        None,
        None,
        False,
        3.0,
    )
    assert parse("status", "-c", "/etc/x.toml").config == Path("/etc/x.toml")
    args = parse("status", "--url", "http://10.0.0.5:9090", "--json", "--timeout", "500ms")
    assert (args.url, args.json, args.timeout) == ("http://10.0.0.5:9090", True, 0.5)


def test_listen_arguments() -> None:
    args = parse("listen", "239.111.111.1:6100", "239.111.111.2:6101")
    assert args.command == "listen"
    assert args.groups == [
        GroupPort(IPv4Address("239.111.111.1"), 6100),
        GroupPort(IPv4Address("239.111.111.2"), 6101),
    ]
    assert (args.interface, args.duration, args.interval, args.json, args.deribit) == (
        "0.0.0.0",
        None,
        1.0,
        False,
        False,
    )
    args = parse(
        "listen", "239.1.1.1:1", "-i", "ens5", "--duration", "1m", "--interval", "250ms",
        "--json", "--deribit",
    )  # fmt: skip
    assert (args.interface, args.duration, args.interval, args.json, args.deribit) == (
        "ens5",
        60.0,
        0.25,
        True,
        True,
    )
    assert (args.count, args.expect, args.expect_all, args.min_rate) == (None, [], False, None)
    assert (args.fail_on_gaps, args.stall, args.write) == (False, None, None)
    args = parse(
        "listen", "239.1.1.1:1", "239.1.1.2:1", "-n", "100", "--expect", "239.1.1.2:1",
        "--expect-all", "--min-rate", "50", "--fail-on-gaps", "--stall", "5s", "-w", "x.pcapng",
    )  # fmt: skip
    assert (args.count, args.expect, args.expect_all, args.min_rate) == (
        100,
        [GroupPort(IPv4Address("239.1.1.2"), 1)],
        True,
        50.0,
    )
    assert (args.fail_on_gaps, args.stall, args.write) == (True, 5.0, "x.pcapng")


def test_listen_help_lists_every_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["listen", "--help"]) == 0
    out = capsys.readouterr().out
    for code in cli.ListenOutcome:
        assert f"\n  {code.value}    " in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["listen"], "the following arguments are required: GROUP:PORT"),
        (["listen", "10.0.0.1:5"], "group 10.0.0.1 is not a multicast address (224.0.0.0/4)"),
        (["listen", "239.1.1.1"], "invalid group '239.1.1.1': expected \"group:port\""),
        (["listen", "239.1.1.1:1", "--duration", "0"], "invalid duration '0': must be > 0"),
        (["demo", "--speed", "0"], "invalid number '0': must be > 0"),
        (["demo", "--rate", "x"], "invalid integer 'x'"),
        (["status", "--timeout", "5x"], "unknown unit 'x'"),
    ],
)
def test_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_demo_arguments() -> None:
    args = parse("demo")
    assert (args.command, args.duration, args.speed, args.rate, args.pcap) == (
        "demo",
        None,
        1.0,
        None,
        None,
    )
    args = parse(
        "demo", "--duration", "30", "--speed", "100", "--rate", "20000", "--pcap", "x.pcapng"
    )
    assert (args.duration, args.speed, args.rate, args.pcap) == (30.0, 100.0, 20000, "x.pcapng")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(
            "a = " + "[" * 500 + "]" * 500 + "\n",
            "invalid TOML: nested more than 32 deep (at line 1)",
            id="arrays-500-deep",
        ),
        pytest.param(
            "x = 1\na = " + "{b = " * 2000 + "1" + "}" * 2000 + "\n",
            "invalid TOML: nested more than 32 deep (at line 2)",
            id="inline-tables-2000-deep",
        ),
        pytest.param("# padding\n" * 110_000, "cannot read {path}: larger than 1MiB", id="2MiB"),
    ],
)
def test_check_config_refuses_hostile_files_in_one_line(
    tmp_path: Path, content: str, message: str
) -> None:
    """A hostile file is one line and exit 2 from the real command, never a traceback."""
    path = tmp_path / "hostile.toml"
    path.write_text(content)
    result = _run_process("-m", "relayd", "check-config", "--config", str(path))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"{path}: {message.format(path=path)}\n"


def test_check_config_does_not_block_on_a_fifo(tmp_path: Path) -> None:
    """A FIFO with no writer used to block the read (and a reload, and stop behind it)."""
    path = tmp_path / "relayd.toml"
    os.mkfifo(path)
    result = _run_process("-m", "relayd", "check-config", "--config", str(path))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"{path}: cannot read {path}: not a regular file (a FIFO)\n"


def test_run_survives_a_reload_of_hostile_files(tmp_path: Path) -> None:
    """SIGHUP with the file replaced by a FIFO, then by TOML nested 2,000 deep: each reload
    fails with one line, the daemon keeps serving, and stop is not held up. (The FIFO hung
    reload and stop; the deep file killed the daemon.)"""
    config_path = tmp_path / "relayd.toml"
    good = process_toml(emit_toml("alpha"))
    config_path.write_text(good)
    daemon = RelaydProcess(config_path, {})
    try:
        health = daemon.health_port()
        config_path.unlink()
        os.mkfifo(config_path)
        daemon.proc.send_signal(signal.SIGHUP)
        first = daemon.wait_line(r"reload: cannot read .*: not a regular file \(a FIFO\)")
        config_path.unlink()
        config_path.write_text(good + "x = " + "[" * 2000 + "]" * 2000 + "\n")
        daemon.proc.send_signal(signal.SIGHUP)
        mark = len(daemon.lines)
        daemon.wait_line(r"reload: invalid TOML: nested more than 32 deep", start=mark)
        daemon.wait_line(r"reload failed with 1 error", start=mark)
        assert daemon.proc.poll() is None
        assert get_json(health)[0] == 200
        assert first is not None
        assert not any("Traceback" in line or "RecursionError" in line for line in daemon.lines)
        code, _took = daemon.stop()
        assert code == 0
    finally:
        daemon.kill()


def test_the_daemon_does_not_import_the_tools(tmp_path: Path) -> None:
    """``relayd run`` (through the supervisor, to the point of reading its config) and every
    daemon module load without relayd.tools."""
    daemon = sorted(
        f"relayd.{path.stem}"
        for path in (Path(relayd.__file__).parent).glob("*.py")
        if path.stem not in ("__main__", "cli")
    )
    code = (
        "import importlib, sys\n"
        "from relayd.cli import main\n"
        f"for name in {daemon!r}: importlib.import_module(name)\n"
        f"code = main(['run', {str(tmp_path / 'missing.toml')!r}])\n"
        "print(code, sorted(m for m in sys.modules if m.startswith('relayd.tools')))\n"
    )
    result = _run_process("-c", code)
    assert result.returncode == 0, result.stderr
    assert "relayd.supervisor" in daemon
    assert result.stdout.splitlines()[-1] == "2 []"


def test_the_tools_are_one_package_of_their_own() -> None:
    tools = {path.stem for path in (Path(relayd.__file__).parent / "tools").glob("*.py")}
    assert {"demo", "listen", "player", "pcapng", "status"} <= tools
    top = {path.stem for path in Path(relayd.__file__).parent.glob("*.py")}
    assert not top & {"demo", "listen", "player", "pcapng", "status"}
