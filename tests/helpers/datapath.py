"""The per-datagram data paths a feed can run on (``RELAYD_DATAPATH``, relayd/fastpath/),
and switching a test between them."""

from __future__ import annotations

import pytest

from relayd import fastpath

#: C first, then Python
DATAPATHS = ("c", "python")


def use_datapath(monkeypatch: pytest.MonkeyPatch, choice: str) -> None:
    """Make feeds started from now on run on ``choice``; skips the test when it is "c" and
    the C data plane cannot be loaded (not built: ``make relayd/_fastpath.so``)."""
    monkeypatch.setenv("RELAYD_DATAPATH", choice)
    if choice == "c":
        try:
            fastpath.load()
        except fastpath.DataPathError as exc:
            pytest.skip(f"C data path unavailable: {exc}")
    in_use = fastpath.describe()
    assert (in_use == "C") == (choice == "c"), in_use
