"""A capture feed changed by a reload keeps its session (issue 13): the supervisor in-process,
real multicast on loopback from a sender thread at a steady rate (a per-group sequence in
every payload), an emit-side stand-in that records every DATA frame. Whatever the reload
changes live, every datagram sent to a group joined throughout arrives exactly once, in
order, in one session."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import attrs
import pytest
import trio

from relayd.config import CaptureFeed, Config, Endpoint, HealthConfig
from relayd.notify import Notifier
from relayd.supervisor import Supervisor
from tests.helpers.emit_standin import Peer, Server, feed_config, serve
from tests.helpers.loopback import FEED, wait_for
from tests.helpers.steady import RATE, SteadySender, fresh_groups, lost_and_duplicated, received


async def _reload_mid_stream(
    first: CaptureFeed,
    second: CaptureFeed,
    sender: SteadySender,
    peers: list[Peer],
    before: Callable[[], None] = lambda: None,
    after: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Run ``first``, reload to ``second`` while ``sender`` streams; stop once every datagram
    sent reached the peers (or 20 s). Returns the feed's samples from just before the stop."""
    async with _supervising(first, second) as sup:
        with sender:
            await wait_for(lambda: sum(len(p.datagrams) for p in peers) > RATE // 4, timeout=20)
            before()
            await sup.reload()
            assert sup.reloader.reloads["ok"] == 1
            after()
            await trio.sleep(0.5)
        total = sender.total()
        with contextlib.suppress(trio.TooSlowError):  # the assertions say what is missing
            await wait_for(lambda: sum(len(p.datagrams) for p in peers) >= total, timeout=20)
        return _samples(sup)


@contextlib.asynccontextmanager
async def _supervising(first: CaptureFeed, second: CaptureFeed) -> AsyncIterator[Supervisor]:
    """A supervisor running ``first``, ready, whose reload loads ``second``; stopped after."""
    base = Config(health=HealthConfig(listen=Endpoint("127.0.0.1", 0)), capture=(first,))
    sup = Supervisor(Path("x"), base, notifier=Notifier({}))
    sup.load = lambda _path: attrs.evolve(base, capture=(second,))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sup.run)
        await sup.ready.wait()
        yield sup
        sup.request_stop()


def _samples(sup: Supervisor) -> dict[str, float]:
    return {s.name: s.value for s in sup.samples() if s.labels == (("feed", FEED),)}


@pytest.mark.usefixtures("datapath")
async def test_a_reload_adding_a_group_loses_nothing_and_keeps_the_session() -> None:
    """Issue 13 item 7: before, the feed restarted as a new session (14-90 datagrams lost, a
    session restart counted); now the new group's socket is joined before anything changes,
    the running sockets and threads go on, and nothing is lost or sent twice."""
    groups = fresh_groups(3)
    peer = Peer()
    async with trio.open_nursery() as servers:
        server: Server = await serve(servers, peer)
        first = feed_config(groups[:2], [server.port])
        second = feed_config(groups, [server.port])
        sender = SteadySender(groups[:2])
        samples = await _reload_mid_stream(
            first, second, sender, [peer], after=lambda: sender.add(groups[2])
        )
        servers.cancel_scope.cancel()
    assert lost_and_duplicated(received([peer]), sender.sent) == (0, 0, True)
    assert peer.hellos == 1
    assert [d.seq for d in peer.datagrams] == list(range(1, len(peer.datagrams) + 1))
    assert sender.sent[groups[2]] > 0
    assert samples["capture_session_restarts"] == 0


@pytest.mark.usefixtures("datapath")
async def test_a_reload_removing_a_group_closes_only_its_socket() -> None:
    """Two ports: removing the group alone on its port closes that socket; the others lose
    nothing and the session goes on."""
    kept = fresh_groups(2)
    gone = (kept[0][0].rsplit(".", 1)[0] + ".9", kept[0][1] + 1)
    peer = Peer()
    async with trio.open_nursery() as servers:
        server = await serve(servers, peer)
        first = feed_config([*kept, gone], [server.port])
        second = feed_config(kept, [server.port])
        sender = SteadySender([*kept, gone])
        samples = await _reload_mid_stream(
            first, second, sender, [peer], after=lambda: sender.drop(gone)
        )
        servers.cancel_scope.cancel()
    got = received([peer])
    assert lost_and_duplicated(got, {g: sender.sent[g] for g in kept}) == (0, 0, True)
    arrived = got.get(gone, [])
    assert arrived == list(range(1, len(arrived) + 1))  # what came before it was left
    assert peer.hellos == 1
    assert samples["capture_session_restarts"] == 0


async def test_a_reload_changing_the_targets_moves_with_exact_resume() -> None:
    """The running connection's target is no longer listed: the feed says goodbye, takes the
    final ACK and resumes on the new target from exactly there, in the same session."""
    groups = fresh_groups(2)
    old_host, new_host = Peer(final_ack=True), Peer()
    async with trio.open_nursery() as servers:
        old = await serve(servers, old_host)
        new = await serve(servers, new_host)
        first = feed_config(groups, [old.port])
        second = feed_config(groups, [new.port], heartbeat_interval=0.3)
        sender = SteadySender(groups)
        samples = await _reload_mid_stream(first, second, sender, [old_host, new_host])
        servers.cancel_scope.cancel()
    assert lost_and_duplicated(received([old_host, new_host]), sender.sent) == (0, 0, True)
    assert (old_host.hellos, new_host.hellos) == (1, 1)
    assert new_host.datagrams  # it moved
    assert samples["capture_session_restarts"] == 0
    assert [e.message for e in old_host.errors] == [
        f"127.0.0.1:{old.port} is no longer a target (reload)"
    ]


async def test_an_interface_change_still_restarts_counted() -> None:
    """What cannot be applied live (the interface) restarts the feed as a new session, and
    the restart is counted as before."""
    groups = fresh_groups(1)
    peer = Peer()
    async with trio.open_nursery() as servers:
        server = await serve(servers, peer)
        first = feed_config(groups, [server.port])
        second = attrs.evolve(first, interface="lo")
        sender = SteadySender(groups)
        sup_seen: list[dict[str, float]] = []
        async with _supervising(first, second) as sup:
            with sender:
                await wait_for(lambda: len(peer.datagrams) > 100, timeout=20)
                await sup.reload()
                await wait_for(lambda: peer.hellos == 2, timeout=20)
                sup_seen.append(_samples(sup))
        servers.cancel_scope.cancel()
    assert sup_seen[0]["capture_session_restarts"] == 1


def test_what_a_capture_change_keeps() -> None:
    """The pure plan (relayd/capture/change.py): groups, targets, bounds and keys apply to the
    running session; the interface, the source filter and the set of sites restart it."""
    from ipaddress import IPv4Address  # noqa: PLC0415

    from relayd.capture.change import Restart, plan_capture_change  # noqa: PLC0415
    from relayd.config import CaptureSite  # noqa: PLC0415

    groups = [("239.1.1.1", 5000), ("239.1.1.2", 5000)]
    old = feed_config(groups, [7000])
    new = feed_config([groups[1], ("239.1.1.3", 5001)], [7001], replay_max_age=5.0)
    change = plan_capture_change(old, new)
    assert change.live
    assert change.added == ((IPv4Address("239.1.1.3"), 5001),)
    assert change.removed == ((IPv4Address("239.1.1.1"), 5000),)
    assert not change.receive_buffer_changed
    assert plan_capture_change(old, attrs.evolve(old, receive_buffer=1 << 20)).live
    assert plan_capture_change(old, attrs.evolve(old, interface="lo")).restart is Restart.INTERFACE
    ssm = attrs.evolve(old, sources=(IPv4Address("10.0.0.1"),))
    assert plan_capture_change(old, ssm).restart is Restart.SOURCES
    checked = attrs.evolve(old, upstream_check="deribit")
    assert plan_capture_change(old, checked).restart is Restart.UPSTREAM_CHECK
    london = CaptureSite(name="london", targets=(Endpoint("127.0.0.1", 7000),))
    tokyo = CaptureSite(name="tokyo", targets=(Endpoint("127.0.0.1", 7001),))
    two = attrs.evolve(old, targets=(), site=(london, tokyo))
    assert plan_capture_change(old, two).restart is Restart.SITES
    moved = attrs.evolve(tokyo, targets=(Endpoint("127.0.0.1", 7002),), replay_max_age=60.0)
    assert plan_capture_change(two, attrs.evolve(two, site=(london, moved))).live


async def test_removing_a_group_closes_its_socket_and_keeps_the_others() -> None:
    """Applied in place: the socket whose only group is removed is stopped and closed; the
    other socket is the same one, its thread still running; adding a group opens a new
    socket and keeps both old ones."""
    from relayd.capture import CaptureFeedRuntime  # noqa: PLC0415

    kept = fresh_groups(1)[0]
    gone = (kept[0].rsplit(".", 1)[0] + ".9", kept[1] + 1)
    added = (kept[0].rsplit(".", 1)[0] + ".10", kept[1])
    peer = Peer()
    async with trio.open_nursery() as nursery:
        server = await serve(nursery, peer)
        first = feed_config([kept, gone], [server.port])
        feed = CaptureFeedRuntime(first)
        await nursery.start(feed.run)
        before = {r.port: r.sock for r in feed.receivers}
        update = feed.prepare_update(feed_config([kept], [server.port]))
        assert update is not None
        update.apply()
        await wait_for(lambda: before[gone[1]].fileno() < 0)
        assert [r.sock for r in feed.receivers] == [before[kept[1]]]
        assert before[kept[1]].fileno() >= 0
        update = feed.prepare_update(feed_config([kept, added], [server.port]))
        assert update is not None
        update.apply()
        assert len(feed.receivers) == 2
        assert next(iter(feed.receivers)).sock is before[kept[1]]
        nursery.cancel_scope.cancel()
