"""Fixtures of the chaos suite: the C generator and receiver, and a fresh relay per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.topology import Relay, build_tools, tools_missing
from tests.helpers.netns import NetnsHarness


@pytest.fixture(scope="session")
def stream_tools(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    reason = tools_missing()
    if reason is not None:
        pytest.skip(reason)
    return build_tools(tmp_path_factory.mktemp("chaos-tools"))


@pytest.fixture
def relay(netns: NetnsHarness, stream_tools: tuple[Path, Path], tmp_path: Path) -> Iterator[Relay]:
    """Five namespaces with links and a key; the test starts relayd with ``relay.start()``.
    Everything is killed and deleted afterwards, pass or fail."""
    built = Relay.build(netns, tmp_path, *stream_tools)
    try:
        yield built
    finally:
        built.close()
