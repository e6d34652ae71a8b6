"""Log lines: one line per event on stderr, as text or JSON, and rate-limited warnings.

Text (the default) is ``LEVEL logger: message key=value ...``, preceded by an ISO timestamp
unless stderr is the journal (``JOURNAL_STREAM`` names it), because journald stamps each line
itself. JSON (``log_format = "json"``) is one object per line with ``ts``, ``level``,
``logger``, ``msg`` and every ``extra=`` field, which CloudWatch Logs Insights indexes as is.
When stderr is the journal, every line of either format starts with its syslog priority as
sd-daemon(3) defines it (``<3>`` for an error); journald takes the prefix off and files the
line under that priority, so ``journalctl -p err`` finds the errors.

Expected conditions of the outside world (a port in use, a missing key file, an unknown
interface) are logged by ``log_failure`` as one line with no traceback, also when they arrive
wrapped in an ``ExceptionGroup``; anything else keeps its traceback.

A traceback never spans lines: in text it is appended as ``exc="..."`` with the newlines
escaped, in JSON as the ``exc`` field, so journald and log shippers keep one event whole.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Final, TextIO

from relayd.config import ConfigError, MissingKeyFileError

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FORMATS = ("text", "json")

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
    | {"message", "asctime", "taskName"}
)

_HANDLER_NAME = "relayd"


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra=`` fields of a record, in the order they were given."""
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and k[0] != "_"}


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if text and not any(c in text for c in ' "=\\\n\r\t'):
        return text
    return json.dumps(text, ensure_ascii=False)


def _timestamp(created: float) -> str:
    moment = datetime.datetime.fromtimestamp(created, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    """``[ts ]LEVEL logger: message key=value ...`` on one line."""

    def __init__(self, *, timestamps: bool) -> None:
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().replace("\n", "\\n")
        parts = [f"{record.levelname} {record.name}: {message}"]
        if self.timestamps:
            parts.insert(0, _timestamp(record.created))
        parts.extend(f"{k}={_text_value(v)}" for k, v in extra_fields(record).items())
        if record.exc_info:
            parts.append(f"exc={_text_value(self.formatException(record.exc_info))}")
        elif record.exc_text:
            parts.append(f"exc={_text_value(record.exc_text)}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            obj.setdefault(key, value)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False, default=str, separators=(",", ":"))


def syslog_priority(levelno: int) -> int:
    """The syslog priority (sd-daemon's ``<N>``) of a logging level: critical 2, error 3,
    warning 4, info 6, debug 7."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """Another formatter's line behind its ``<N>`` priority prefix, for stderr read by
    journald (``SyslogLevelPrefix=`` is on by default)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return f"<{syslog_priority(record.levelno)}>{self.inner.format(record)}"


def stderr_is_journal(environ: dict[str, str] | None = None, stream: TextIO | None = None) -> bool:
    """True when ``JOURNAL_STREAM`` (``dev:inode``) names the file stderr is connected to."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        dev, ino = (int(x) for x in value.split(":", 1))
        st = os.fstat((stream or sys.stderr).fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


#: The feed the running code works for: each feed's supervising task sets it, and the tasks
#: and data-path threads it starts inherit it (Trio copies the context into both), so every
#: line logged on a feed's behalf carries its ``feed`` field without each call naming it.
current_feed: ContextVar[str | None] = ContextVar("relayd_feed", default=None)


@contextmanager
def feed_context(name: str) -> Iterator[None]:
    """Log on behalf of feed ``name`` within the block (see ``current_feed``)."""
    token = current_feed.set(name)
    try:
        yield
    finally:
        current_feed.reset(token)


class FeedField(logging.Filter):
    """Adds ``feed`` (from ``current_feed``) to a record that does not name one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "feed" not in vars(record):
            feed = current_feed.get()
            if feed is not None:
                record.feed = feed
        return True


def setup_logging(level: str = "info", fmt: str = "text", *, stream: TextIO | None = None) -> None:
    """(Re)configure the root logger: called at start-up and again after each reload."""
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")
    out = stream if stream is not None else sys.stderr
    journal = stderr_is_journal(stream=out)
    formatter: logging.Formatter
    formatter = JsonFormatter() if fmt == "json" else TextFormatter(timestamps=not journal)
    if journal:
        formatter = JournalFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    handler.addFilter(FeedField())
    root.addHandler(handler)
    root.setLevel(LEVELS[level])


class RateLimitedLogger:
    """Logs the first occurrence of each key, then at most once per ``interval`` per key.

    A line logged after suppressed ones ends with ``(N suppressed)``. At most ``max_keys`` keys
    are remembered (the oldest are forgotten), so keys that include a peer address cannot grow
    memory without bound.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        *,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        # key -> [time of the last line logged, occurrences suppressed since]
        self._keys: OrderedDict[str, list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def log(self, level: int, key: str, msg: str, *args: Any, **kwargs: Any) -> bool:
        """Log unless rate-limited; returns whether a line was written."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        with self._lock:
            entry = self._keys.get(key)
            if entry is not None and now - entry[0] < self.interval:
                entry[1] += 1
                return False
            suppressed = int(entry[1]) if entry is not None else 0
            self._keys[key] = [now, 0]
            self._keys.move_to_end(key)
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
        if suppressed:
            msg = f"{msg} ({suppressed} suppressed)"
        kwargs.setdefault("stacklevel", 3)
        self.logger.log(level, msg, *args, **kwargs)
        return True

    def debug(self, key: str, msg: str, *args: Any, **kwargs: Any) -> bool:
        return self.log(logging.DEBUG, key, msg, *args, **kwargs)

    def info(self, key: str, msg: str, *args: Any, **kwargs: Any) -> bool:
        return self.log(logging.INFO, key, msg, *args, **kwargs)

    def warning(self, key: str, msg: str, *args: Any, **kwargs: Any) -> bool:
        return self.log(logging.WARNING, key, msg, *args, **kwargs)

    def error(self, key: str, msg: str, *args: Any, **kwargs: Any) -> bool:
        return self.log(logging.ERROR, key, msg, *args, **kwargs)


#: Conditions of the outside world that an operator fixes without reading code: logged as one
#: line, never with a traceback. Modules that import trio add their own (``InterfaceError``,
#: ``KeyFileError``) through ``log_failure``'s ``expected``.
EXPECTED_ERRORS: Final[tuple[type[BaseException], ...]] = (
    OSError,
    ConfigError,
    MissingKeyFileError,
)


def leaf_errors(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc`` and its nested groups (``exc`` itself if not a group)."""
    inner = getattr(exc, "exceptions", None)  # an ExceptionGroup (exceptiongroup on 3.10)
    if isinstance(inner, tuple):
        return [leaf for one in inner for leaf in leaf_errors(one)]
    return [exc]


def describe_error(exc: BaseException) -> str:
    """One line for an exception or a whole (nested) group: each distinct leaf as
    ``Type: message``, joined by ``"; "``."""
    lines: list[str] = []
    for leaf in leaf_errors(exc):
        text = str(leaf).replace("\n", "\\n")
        line = f"{type(leaf).__name__}: {text}" if text else type(leaf).__name__
        if line not in lines:
            lines.append(line)
    return "; ".join(lines)


def is_expected(
    exc: BaseException, expected: tuple[type[BaseException], ...] = EXPECTED_ERRORS
) -> bool:
    """Whether every leaf of ``exc`` is one of the ``expected`` kinds."""
    return all(isinstance(leaf, expected) for leaf in leaf_errors(exc))


def log_failure(
    logger: logging.Logger,
    level: int,
    msg: str,
    *args: Any,
    exc: BaseException,
    expected: tuple[type[BaseException], ...] = EXPECTED_ERRORS,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Log ``msg % args`` followed by ``": "`` and ``describe_error(exc)``: one line when every
    error in ``exc`` is ``expected``, with the traceback otherwise (a bug to report)."""
    logger.log(
        level,
        f"{msg}: %s",
        *args,
        describe_error(exc),
        exc_info=None if is_expected(exc, expected) else exc,
        extra=extra,
        stacklevel=2,
    )
