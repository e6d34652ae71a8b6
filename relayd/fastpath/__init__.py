"""The C leaf of the data plane (``relayd/_fastpath.c``), loaded with ctypes, and which leaf runs.

The per-datagram loops of the emit and capture feeds run in C when the shared library was
built (``make`` and the wheel build compile it) and in Python otherwise (relayd/pyplane/);
both implement relayd/datapath.py's interface and pass the same tests. Every entry point is
bound through ``ctypes.CDLL``, which releases the GIL for the call (the GIL rule is in
relayd/datapath.py). ``RELAYD_DATAPATH`` chooses: ``c`` (refuse to start without the library),
``python`` (never load it), or ``auto`` (the default: C when it loads).

One module per job: ``abi`` (the structs, constants and the check at load), ``plane`` (the
entry points, ``open_library``), ``emit``, ``capture``, ``arbitration`` and ``upstream`` (the
loops and objects built on them); this one chooses the leaf and keeps the one loaded library.
"""

from __future__ import annotations

import os

from relayd.fastpath.abi import (
    ABI,
    DEST_SLOTS,
    LIBRARY,
    CaptureReaderState,
    CaptureState,
    EmitState,
)
from relayd.fastpath.arbitration import CArbiter
from relayd.fastpath.plane import CPlane, DataPathError, open_library

__all__ = [
    "ABI",
    "DEST_SLOTS",
    "LIBRARY",
    "CArbiter",
    "CPlane",
    "CaptureReaderState",
    "CaptureState",
    "DataPathError",
    "EmitState",
    "active",
    "describe",
    "load",
    "open_library",
]


_cache: dict[str, tuple[CPlane | None, str]] = {}


def _choice() -> str:
    choice = os.environ.get("RELAYD_DATAPATH", "auto").strip().lower() or "auto"
    if choice not in ("auto", "c", "python"):
        raise DataPathError(f"RELAYD_DATAPATH={choice!r}: expected auto, c or python")
    return choice


def _open(choice: str) -> tuple[CPlane | None, str]:
    if choice == "python":
        return None, "RELAYD_DATAPATH=python"
    try:
        return open_library(LIBRARY), ""
    except DataPathError as exc:
        if choice == "c":
            raise DataPathError(f"RELAYD_DATAPATH=c but {exc}") from None
        return None, str(exc)


def load() -> CPlane | None:
    """The C data plane, or None when the Python data path is in use (``describe`` says why).
    Read when a feed starts. Raises DataPathError when ``RELAYD_DATAPATH`` is invalid or asks
    for C and the library cannot be loaded."""
    choice = _choice()
    if choice not in _cache:
        _cache[choice] = _open(choice)
    return _cache[choice][0]


def active() -> str:
    """``"c"`` or ``"python"``: the data path feeds started now would use (never raises)."""
    try:
        return "python" if load() is None else "c"
    except DataPathError:
        return "python"


def describe() -> str:
    """One line for the log: which data path runs, and why not C."""
    lib = load()
    return "C" if lib is not None else f"Python: {_cache[_choice()][1]}"
