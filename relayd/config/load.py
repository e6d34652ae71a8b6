"""Loading: TOML text or a file in, a validated ``Config`` out, or one ``ConfigError``.

``parse_config`` and ``load_config`` are what ``relayd check-config``, start-up and reload
use; key files are checked here too, the only I/O besides reading the file.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from relayd.config.checks import _cross_checks, _lenient, _tables, _try
from relayd.config.converter import _converter, _messages, _unknown_key
from relayd.config.errors import ConfigError
from relayd.config.files import MAX_KEY_FILE_BYTES, MIN_KEY_BYTES, read_regular_file
from relayd.config.model import CaptureFeed, Config, EmitFeed, HealthConfig, ProcessConfig
from relayd.config.parsers import T, _path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

DEFAULT_CONFIG_PATH: Final = Path("/etc/relayd/relayd.toml")

_SECTIONS: Final = ("process", "health", "emit", "capture")

#: Largest configuration file read; real ones are a few KiB.
MAX_CONFIG_BYTES: Final = 1024 * 1024
#: Deepest nesting of arrays and inline tables accepted. tomllib parses nesting by recursion:
#: 500 levels raised RecursionError, and 2,000 in a reload's worker thread killed the daemon.
MAX_NESTING: Final = 32

# What the nesting scan must step over: strings (which may hold brackets) and comments.
_TOML_TOKEN = re.compile(
    r'"""(?:[^\\]|\\.)*?"""'  # multi-line basic string
    r"|'{3}.*?'{3}"  # multi-line literal string
    r'|"(?:[^"\\\n]|\\.)*"'  # basic string
    r"|'[^'\n]*'"  # literal string
    r"|#[^\n]*"  # comment
    r"|[\[\]{}]",
    re.DOTALL,
)


def _nesting_error(text: str) -> str | None:
    """A message when arrays and inline tables in ``text`` nest deeper than ``MAX_NESTING``,
    found by a linear scan before any recursive parsing."""
    depth = 0
    for token in _TOML_TOKEN.finditer(text):
        bracket = token[0]
        if bracket in "[{":
            depth += 1
            if depth > MAX_NESTING:
                line = text.count("\n", 0, token.start()) + 1
                return f"invalid TOML: nested more than {MAX_NESTING} deep (at line {line})"
        elif bracket in "]}":
            depth = max(depth - 1, 0)
    return None


def parse_config(text: str, *, base_dir: Path | None = None, check_files: bool = False) -> Config:
    """Parse and validate a whole configuration from TOML text.

    Relative key-file paths are made relative to ``base_dir`` when it is given. With
    ``check_files`` every key file must exist and be readable. Raises :class:`ConfigError`
    with every problem found; nothing else escapes for any input text.
    """
    too_deep = _nesting_error(text)
    if too_deep is not None:
        raise ConfigError([too_deep])
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"invalid TOML: {exc}"]) from None
    except RecursionError:  # the scan above should have caught it; never a traceback
        raise ConfigError([f"invalid TOML: nested more than {MAX_NESTING} deep"]) from None
    errors: list[str] = []

    for key in sorted(set(raw) - set(_SECTIONS)):
        errors.append(f"{_unknown_key(key, _SECTIONS)} @ $")

    def table(name: str, cls: type[T], default: T) -> T | None:
        if name not in raw:
            return default
        try:
            return _converter.structure(raw[name], cls)
        except Exception as exc:  # every failure becomes a message
            errors.extend(_messages(exc, f"$.{name}"))
            return None

    def feeds(name: str, cls: type[T]) -> list[tuple[int, T]]:
        value = raw.get(name, [])
        if not isinstance(value, list):
            errors.append(f"expected an array of tables ([[{name}]]) @ $.{name}")
            return []
        good: list[tuple[int, T]] = []
        for index, item in enumerate(value):
            try:
                good.append((index, _converter.structure(item, cls)))
            except Exception as exc:  # every failure becomes a message
                errors.extend(_messages(exc, f"$.{name}[{index}]"))
        return good

    process = table("process", ProcessConfig, ProcessConfig())
    health = table("health", HealthConfig, HealthConfig())
    emit = feeds("emit", EmitFeed)
    capture = feeds("capture", CaptureFeed)
    # Rules across tables look at the raw values that parse on their own, so that they are
    # reported even when another key of the same table is broken.
    errors.extend(_cross_checks(raw))
    if check_files:
        errors.extend(_check_key_files(raw, base_dir or Path()))
    if not raw.get("emit") and not raw.get("capture"):
        # An empty or truncated file must not pass a reload and stop every feed.
        errors.append("no feeds: add at least one [[emit]] or [[capture]] table @ $")

    if errors or process is None or health is None:
        raise ConfigError(errors)
    if base_dir is not None:
        emit = [(i, _rebase_emit(feed, base_dir)) for i, feed in emit]
        capture = [(i, _rebase_capture(feed, base_dir)) for i, feed in capture]
    return Config(
        process=process,
        health=health,
        emit=tuple(feed for _, feed in emit),
        capture=tuple(feed for _, feed in capture),
    )


def load_config(path: Path | str) -> Config:
    """Read, parse and validate the file at ``path``, and check that its key files are
    readable. Raises :class:`ConfigError` with every problem (also for an unreadable file, a
    FIFO or device, or one larger than ``MAX_CONFIG_BYTES``).

    Relative key-file paths are taken relative to the file's directory."""
    path = Path(path)
    try:
        data = read_regular_file(path, MAX_CONFIG_BYTES)
    except OSError as exc:
        raise ConfigError([f"cannot read {path}: {exc.strerror or exc}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path} is not UTF-8 text (byte {exc.start})"]) from None
    return parse_config(text, base_dir=path.parent, check_files=True)


def _check_key_files(raw: Mapping[str, Any], base_dir: Path) -> Iterator[str]:
    files: list[tuple[str, Path | None]] = []
    for where, table in _tables(raw, "emit"):
        paths = table.get("auth_key_files")
        if isinstance(paths, list):
            files += [(f"{where}.auth_key_files[{i}]", _try(_path, p)) for i, p in enumerate(paths)]
    for where, table in _tables(raw, "capture"):
        files.append((f"{where}.auth_key_file", _lenient(table, "auth_key_file", _path)))
        sites = table.get("site")
        for index, site in enumerate(sites if isinstance(sites, list) else []):
            if isinstance(site, dict):
                path = _lenient(site, "auth_key_file", _path)
                files.append((f"{where}.site[{index}].auth_key_file", path))
    for where, relative in files:
        if relative is None:
            continue
        path = base_dir / relative
        try:
            key = read_regular_file(path, MAX_KEY_FILE_BYTES).strip()
        except FileNotFoundError:
            continue  # not provisioned yet: a warning (key_file_warnings), not an error
        except OSError as exc:
            yield f"cannot read key file {path}: {exc.strerror or exc} @ {where}"
            continue
        if len(key) < MIN_KEY_BYTES:
            yield f"key file {path} holds fewer than {MIN_KEY_BYTES} bytes @ {where}"


def key_file_warnings(config: Config) -> list[str]:
    """One line per key file that does not exist (yet), naming its TOML path.

    Not an error: the key may be provisioned after the configuration (user data, a secrets
    agent). Until it exists that feed does not start; the supervisor retries it with backoff.
    """
    found: list[tuple[str, str, Path]] = []
    for index, emit in enumerate(config.emit):
        for number, path in enumerate(emit.auth_key_files):
            found.append((f"$.emit[{index}].auth_key_files[{number}]", emit.name, path))
    for index, capture in enumerate(config.capture):
        if capture.auth_key_file is not None:
            found.append((f"$.capture[{index}].auth_key_file", capture.name, capture.auth_key_file))
        for number, site in enumerate(capture.site):
            if site.auth_key_file is not None:
                where = f"$.capture[{index}].site[{number}].auth_key_file"
                found.append((where, capture.name, site.auth_key_file))
    return [
        f"key file {path} does not exist yet; feed {name!r} will not start until it does @ {where}"
        for where, name, path in found
        if not path.exists() and not path.is_symlink()
    ]


def _rebase_emit(feed: EmitFeed, base_dir: Path) -> EmitFeed:
    return attrs.evolve(feed, auth_key_files=tuple(base_dir / p for p in feed.auth_key_files))


def _rebase_capture(feed: CaptureFeed, base_dir: Path) -> CaptureFeed:
    sites = tuple(
        site
        if site.auth_key_file is None
        else attrs.evolve(site, auth_key_file=base_dir / site.auth_key_file)
        for site in feed.site
    )
    if feed.auth_key_file is None:
        return attrs.evolve(feed, site=sites)
    return attrs.evolve(feed, auth_key_file=base_dir / feed.auth_key_file, site=sites)
