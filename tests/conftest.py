"""Shared fixtures: the repository root, the Deribit sample captures, the namespace harness,
the data path (C or Python) a feed runs on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import NetnsHarness, unavailable_reason

from relayd import fastpath
from relayd.tools import samples

REPO_ROOT = Path(__file__).resolve().parent.parent
DERIBIT_SAMPLE = samples.DERIBIT_SAMPLE


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def deribit_dir() -> Path:
    """The folder of Deribit sample captures (../shared/testdata/deribit/ next to the checkout,
    or next to the main checkout of a worktree); skips the test when it is missing."""
    found = samples.deribit_dir(REPO_ROOT)
    if found is None:
        pytest.skip("Deribit sample captures not found at ../shared/testdata/deribit/")
    return found


@pytest.fixture(scope="session")
def deribit_sample(deribit_dir: Path) -> Path:
    """The main Deribit sample capture (5066 datagrams, 29 group:port pairs)."""
    return deribit_dir / DERIBIT_SAMPLE


@pytest.fixture
def netns() -> Iterator[NetnsHarness]:
    """A namespace harness; everything it made is removed after the test, pass or fail.

    Skips when namespaces are unavailable (not root, no ``ip``, no permission)."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with NetnsHarness() as harness:
        yield harness


#: The per-datagram data paths a feed can run on (``RELAYD_DATAPATH``, relayd/fastpath.py).
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


@pytest.fixture(params=DATAPATHS)
def datapath(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs the test once per data path, with ``RELAYD_DATAPATH`` set (read when a feed
    starts); the value is the data path's name."""
    choice: str = request.param
    use_datapath(monkeypatch, choice)
    return choice
