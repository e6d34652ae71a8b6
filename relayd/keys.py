"""Authentication keys: reading key files, and what can go wrong with them.

Both feed kinds read their keys here (emit: every ``auth_key_files``, capture: its
``auth_key_file``), at start and when a reload rotates them, so both refuse the same files with
the same messages. A key file that does not exist yet is its own error: the supervisor retries
that feed with backoff instead of failing the start (a secrets agent may write it later).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from relayd.config import (
    MAX_KEY_FILE_BYTES,
    MIN_KEY_BYTES,
    MissingKeyFileError,
    read_regular_file,
)

__all__ = ["MIN_KEY_BYTES", "KeyFileError", "KeyFileMissingError", "load_auth_keys"]


class KeyFileError(Exception):
    """An authentication key file that cannot be used."""


class KeyFileMissingError(KeyFileError, MissingKeyFileError):
    """A key file that does not exist (yet): the supervisor retries the feed with backoff."""


def load_auth_keys(paths: Iterable[Path]) -> tuple[bytes, ...]:
    """The keys in ``paths``: each file's bytes with surrounding whitespace removed.

    A key must be at least ``MIN_KEY_BYTES`` bytes (e.g. 32 random bytes, or their hex or
    base64 text: the text itself is the key, as the capture side reads it the same way).
    Only a regular file of at most ``MAX_KEY_FILE_BYTES`` is read, without ever blocking: a
    FIFO in its place is refused at once instead of hanging a start or a reload.
    """
    keys = []
    for path in paths:
        try:
            data = read_regular_file(Path(path), MAX_KEY_FILE_BYTES).strip()
        except FileNotFoundError:
            raise KeyFileMissingError(f"key file {path} does not exist (yet)") from None
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from None
        if len(data) < MIN_KEY_BYTES:
            raise KeyFileError(f"key file {path} holds fewer than {MIN_KEY_BYTES} bytes")
        keys.append(data)
    return tuple(keys)
