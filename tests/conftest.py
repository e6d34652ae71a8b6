"""Shared fixtures: the repository root, the Deribit sample captures, the namespace harness,
the data path (C or Python) a feed runs on, a notify socket, and closing the test's client
connections. Helpers that tests import live in tests/helpers/."""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from relayd.tools import samples
from tests.helpers.capture_standin import Receivers, close_streams
from tests.helpers.datapath import DATAPATHS, use_datapath
from tests.helpers.netns import NetnsHarness, unavailable_reason
from tests.helpers.relayd_process import NotifyListener

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


@pytest.fixture(params=DATAPATHS)
def datapath(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs the test once per data path, with ``RELAYD_DATAPATH`` set (read when a feed
    starts); the value is the data path's name."""
    choice: str = request.param
    use_datapath(monkeypatch, choice)
    return choice


@pytest.fixture(autouse=True)
def _close_streams() -> Iterator[None]:
    """Every client connection a test opened through the capture stand-in is closed when it
    ends."""
    yield
    close_streams()


@pytest.fixture
def notify() -> Iterator[NotifyListener]:
    """A systemd notify socket for a ``relayd run`` child. A path socket: unlike abstract ones,
    it is reachable from every network namespace."""
    listener = NotifyListener()
    try:
        yield listener
    finally:
        listener.close()


@pytest.fixture
def receivers(groups: list[tuple[IPv4Address, int]]) -> Iterator[Receivers]:
    """Loopback receivers joined to the test module's ``groups`` fixture, closed after."""
    rx = Receivers(groups)
    yield rx
    rx.close()
