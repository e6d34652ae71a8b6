from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from relayd.config import ConfigError, MissingKeyFileError
from relayd.logs import (
    RateLimitedLogger,
    describe_error,
    is_expected,
    log_failure,
    setup_logging,
    stderr_is_journal,
    syslog_priority,
)
from tests.helpers.relayd_process import emit_toml, process_toml


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def test_text_line_with_extra_fields(restore_root: None) -> None:
    out = io.StringIO()
    setup_logging("info", "text", stream=out)
    logging.getLogger("relayd.test").info(
        "feed %s started", "prod", extra={"feed": "prod", "listen": "0.0.0.0:6667", "why": "a b"}
    )
    line = out.getvalue()
    assert line.count("\n") == 1
    # A timestamp first (this stream is not the journal), then the fixed layout.
    stamp, rest = line.rstrip("\n").split(" ", 1)
    assert stamp.endswith("Z")
    assert "T" in stamp
    assert rest == 'INFO relayd.test: feed prod started feed=prod listen=0.0.0.0:6667 why="a b"'


def test_level_filters_and_reconfigure_replaces_handler(restore_root: None) -> None:
    out = io.StringIO()
    setup_logging("warning", "text", stream=out)
    log = logging.getLogger("relayd.test")
    log.info("hidden")
    log.warning("shown")
    assert "hidden" not in out.getvalue()
    assert "shown" in out.getvalue()
    out2 = io.StringIO()
    setup_logging("debug", "json", stream=out2)
    log.debug("now json")
    assert "now json" not in out.getvalue()
    assert json.loads(out2.getvalue())["msg"] == "now json"
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "relayd"]
    assert len(ours) == 1


def test_json_line_and_traceback_on_one_line(restore_root: None) -> None:
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    log = logging.getLogger("relayd.test")
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        log.exception("feed crashed", extra={"feed": "prod", "restarts": 3})
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert obj["level"] == "ERROR"
    assert obj["logger"] == "relayd.test"
    assert obj["msg"] == "feed crashed"
    assert obj["feed"] == "prod"
    assert obj["restarts"] == 3
    assert "RuntimeError: boom" in obj["exc"]
    assert "Traceback" in obj["exc"]
    assert obj["ts"].endswith("Z")


def test_text_traceback_stays_on_one_line(restore_root: None) -> None:
    out = io.StringIO()
    setup_logging("info", "text", stream=out)
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("relayd.test").exception("multi\nline")
    text = out.getvalue()
    assert text.count("\n") == 1
    assert "multi\\nline" in text
    assert 'exc="Traceback' in text
    assert "ValueError: bad" in text


def test_bad_level_or_format_is_refused(restore_root: None) -> None:
    with pytest.raises(ValueError, match="log level"):
        setup_logging("verbose", "text")
    with pytest.raises(ValueError, match="log format"):
        setup_logging("info", "xml")


def test_journal_stream_detection_drops_timestamps(restore_root: None) -> None:
    with tempfile.TemporaryFile("w+") as f:
        st = os.fstat(f.fileno())
        assert stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, f)
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, f)
        assert not stderr_is_journal({}, f)
        assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"}, f)
        os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        try:
            setup_logging("info", "text", stream=f)
            logging.getLogger("relayd.test").info("hello")
        finally:
            del os.environ["JOURNAL_STREAM"]
        f.seek(0)
        assert f.read() == "<6>INFO relayd.test: hello\n"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_journal_lines_carry_their_syslog_priority(
    restore_root: None, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """Under journald each line starts with sd-daemon's <N>, so `journalctl -p err` finds
    errors; before, every line was filed at the unit's default priority (info)."""
    with tempfile.TemporaryFile("w+") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        setup_logging("debug", fmt, stream=f)
        log = logging.getLogger("relayd.test")
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
        try:
            raise ValueError("x\ny")
        except ValueError:
            log.exception("boom")
        log.critical("c")
        f.seek(0)
        lines = f.read().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<3>", "<2>"]
    if fmt == "json":
        assert [json.loads(line[3:])["msg"] for line in lines] == ["d", "i", "w", "e", "boom", "c"]
    else:
        assert lines[0] == "<7>DEBUG relayd.test: d"  # no timestamp: journald stamps lines
        assert lines[4].startswith("<3>ERROR relayd.test: boom exc=")


def test_no_priority_prefix_off_the_journal(restore_root: None) -> None:
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    logging.getLogger("relayd.test").error("e")
    assert out.getvalue().startswith("{")


def test_syslog_priorities() -> None:
    assert [syslog_priority(level) for level in (5, 10, 20, 25, 30, 40, 50, 60)] == [
        7,
        7,
        6,
        6,
        4,
        3,
        2,
        2,
    ]


def _raised_by_trio(*errors: Exception | tuple[Exception, ...]) -> BaseException:
    """What a nursery raises when its tasks fail with ``errors`` (a tuple: a nested nursery)."""

    async def fail(error: Exception | tuple[Exception, ...]) -> None:
        if isinstance(error, tuple):
            async with trio.open_nursery() as inner:
                for one in error:
                    inner.start_soon(fail, one)
        else:
            raise error

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for error in errors:
                nursery.start_soon(fail, error)

    try:
        trio.run(main)
    except BaseException as exc:  # the group under test
        return exc
    raise AssertionError("no error raised")


def _group_of_expected() -> BaseException:
    in_use = OSError(errno.EADDRINUSE, "Address already in use")
    missing = MissingKeyFileError("key file /etc/relayd/prod.key does not exist (yet)")
    bad = ConfigError(["invalid TOML: nested more than 32 deep (at line 1)"])
    again = OSError(errno.EADDRINUSE, "Address already in use")
    return _raised_by_trio((in_use, missing), bad, again)


def test_log_failure_expected_group_is_one_line(restore_root: None) -> None:
    """A port in use, a missing key, a bad file, wrapped in (nested) groups as Trio raises
    them: one line, no traceback (before: the whole ExceptionGroup traceback)."""
    out = io.StringIO()
    setup_logging("info", "text", stream=out)
    log = logging.getLogger("relayd.test")
    log_failure(log, logging.ERROR, "emit feed %s failed", "prod", exc=_group_of_expected(),
                extra={"feed": "prod"})  # fmt: skip
    line = out.getvalue()
    assert line.count("\n") == 1
    assert "exc=" not in line
    head, sep, tail = line.split(" ", 1)[1].partition("emit feed prod failed: ")
    assert (head, sep) == ("ERROR relayd.test: ", "emit feed prod failed: ")
    assert tail.endswith(" feed=prod\n")
    # Each distinct error once, in the order Trio collected them.
    assert sorted(tail.removesuffix(" feed=prod\n").split("; ")) == [
        "ConfigError: invalid TOML: nested more than 32 deep (at line 1)",
        "MissingKeyFileError: key file /etc/relayd/prod.key does not exist (yet)",
        "OSError: [Errno 98] Address already in use",
    ]


def test_log_failure_keeps_the_traceback_of_a_bug(restore_root: None) -> None:
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    log = logging.getLogger("relayd.test")
    bug = _raised_by_trio(OSError(errno.ENOENT, "gone"), KeyError("x"))
    log_failure(log, logging.ERROR, "feed failed", exc=bug)
    record = json.loads(out.getvalue())
    assert sorted(record["msg"].removeprefix("feed failed: ").split("; ")) == [
        "FileNotFoundError: [Errno 2] gone",
        "KeyError: 'x'",
    ]
    assert "Traceback" in record["exc"]
    # ... unless the caller names it expected (emit's KeyFileError, netif's InterfaceError).
    assert is_expected(bug, (OSError, KeyError))
    assert not is_expected(bug)
    assert describe_error(OSError(errno.EADDRINUSE, "a\nb")) == "OSError: [Errno 98] a\\nb"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limited_logger_counts_suppressed(
    restore_root: None, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    rl = RateLimitedLogger(logging.getLogger("relayd.rl"), interval=10.0, clock=clock)
    caplog.set_level(logging.INFO)
    assert rl.warning("src:10.0.0.1", "refused %s", "10.0.0.1")
    for _ in range(5):
        clock.now += 1
        assert not rl.warning("src:10.0.0.1", "refused %s", "10.0.0.1")
    # Another key is independent.
    assert rl.warning("src:10.0.0.2", "refused %s", "10.0.0.2")
    clock.now += 5.0  # 10 s after the first line
    assert rl.warning("src:10.0.0.1", "refused %s", "10.0.0.1")
    clock.now += 10.0
    assert rl.warning("src:10.0.0.1", "refused %s", "10.0.0.1")
    messages = [r.getMessage() for r in caplog.records if r.name == "relayd.rl"]
    assert messages == [
        "refused 10.0.0.1",
        "refused 10.0.0.2",
        "refused 10.0.0.1 (5 suppressed)",
        "refused 10.0.0.1",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "relayd.rl")


def test_rate_limited_logger_bounds_keys(restore_root: None) -> None:
    clock = FakeClock()
    rl = RateLimitedLogger(logging.getLogger("relayd.rl"), interval=10.0, max_keys=3, clock=clock)
    for i in range(10):
        rl.warning(f"k{i}", "x")
    assert len(rl._keys) == 3
    # k0 was forgotten, so it logs again at once.
    assert rl.warning("k0", "x")


def test_daemon_lines_carry_priorities_under_journald(tmp_path: Path) -> None:
    """`relayd run` with stderr on a file that JOURNAL_STREAM names, as systemd sets it up: the
    failing feed's line is an error (<3>), start-up lines are info (<6>)."""
    config = tmp_path / "relayd.toml"
    config.write_text(process_toml(emit_toml("alpha", interface="nosuchif0")))
    log_path = tmp_path / "stderr"
    with log_path.open("wb") as err:
        st = os.fstat(err.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "relayd", "run", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
        try:
            deadline = time.monotonic() + 20
            while "nosuchif0" not in log_path.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
    lines = log_path.read_text().splitlines()
    assert lines
    assert all(re.match(r"<[2-7]>[A-Z]+ ", line) for line in lines), lines
    assert any(line.startswith("<3>ERROR ") and "nosuchif0" in line for line in lines), lines
    assert any(line.startswith("<6>INFO ") for line in lines), lines


async def test_every_line_about_a_feed_carries_its_feed_field(restore_root: None) -> None:
    """Lines a real emit feed logs from its own tasks (listening, a refused source, its
    stop), and a data-path thread's line, name the feed in JSON without each call saying so."""
    from ipaddress import IPv4Network  # noqa: PLC0415

    from relayd.feedslot import FeedSlot, default_factory  # noqa: PLC0415
    from relayd.logs import feed_context  # noqa: PLC0415
    from relayd.wire import ErrorCode  # noqa: PLC0415
    from tests.helpers.capture_standin import make_config  # noqa: PLC0415

    out = io.StringIO()
    setup_logging("debug", "json", stream=out)
    cfg = make_config(name="prod", allowed_sources=(IPv4Network("10.0.0.0/8"),))
    slot = FeedSlot("emit", "prod", cfg)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: slot.supervise(
                default_factory, fail_fast=True, task_status=task_status))  # fmt: skip
            runtime = slot.runtime
            assert runtime is not None
            port = runtime.health().detail["listen"].rsplit(":", 1)[1]
            stream = await trio.open_tcp_stream("127.0.0.1", int(port))
            assert await stream.receive_some(10) == b""  # refused: not an allowed source
            await stream.aclose()
            with feed_context("prod"):
                await trio.to_thread.run_sync(
                    lambda: logging.getLogger("relayd.capture").warning("from a thread")
                )
            slot.stop(ErrorCode.SHUTTING_DOWN, "test over")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    about_prod = [ln for ln in lines if ln["logger"].startswith(("relayd.emit", "relayd.capture"))]
    messages = [ln["msg"] for ln in about_prod]
    assert any("listening on" in m for m in messages), messages
    assert any("not in allowed_sources" in m for m in messages), messages
    assert "from a thread" in messages
    assert [ln for ln in about_prod if ln.get("feed") != "prod"] == []
