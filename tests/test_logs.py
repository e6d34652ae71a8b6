from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator

import pytest

from relayd.logs import RateLimitedLogger, setup_logging, stderr_is_journal


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
        assert f.read() == "INFO relayd.test: hello\n"


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
