"""Reading a file relayd is given (the configuration, a key file) without being hung by it.

Only regular files, opened without blocking, read in bounded chunks up to a cap.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Final

from relayd.units import format_size

#: Shortest key accepted from a key file (bytes, surrounding whitespace removed).
MIN_KEY_BYTES: Final = 16
#: Largest key file read.
MAX_KEY_FILE_BYTES: Final = 64 * 1024


class UnsafeFileError(OSError):
    """A file relayd refuses to read: not a regular file, or larger than its cap."""


def read_regular_file(path: Path, limit: int) -> bytes:
    """The contents of ``path``, which must be a regular file of at most ``limit`` bytes.

    The open never blocks (``O_NONBLOCK``: a FIFO without a writer would otherwise hang a
    reload, and stop behind it) and ``fstat`` on the open descriptor decides, so a FIFO, a
    device or a directory is refused without a read. Raises ``OSError`` (``UnsafeFileError``
    for a refused file) whose ``strerror`` says why."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):  # the kernel's own words, as reading one used to say
            raise UnsafeFileError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(mode):
            what = _FILE_KINDS.get(stat.S_IFMT(mode), "another kind of file")
            raise UnsafeFileError(errno.EINVAL, f"not a regular file ({what})")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, min(limit + 1 - size, 1 << 16) or 1):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise UnsafeFileError(errno.EFBIG, f"larger than {format_size(limit)}")
        return b"".join(chunks)
    finally:
        os.close(fd)


_FILE_KINDS: Final = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}
