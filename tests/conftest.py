"""Shared fixtures: the repository root, the Deribit sample captures, the namespace harness."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import NetnsHarness, unavailable_reason

REPO_ROOT = Path(__file__).resolve().parent.parent
#: the shared Deribit captures, relative to the repository root
DERIBIT_DIR = REPO_ROOT.parent / "shared" / "testdata" / "deribit"
DERIBIT_SAMPLE = "sample_capture_v1_6.pcapng"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def deribit_dir() -> Path:
    """The folder of Deribit sample captures; skips the test when it is missing."""
    if not (DERIBIT_DIR / DERIBIT_SAMPLE).is_file():
        pytest.skip("Deribit sample captures not found at ../shared/testdata/deribit/")
    return DERIBIT_DIR


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
