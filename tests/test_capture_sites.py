"""One capture feed streaming to two sites (London and Tokyo, issue 14 item 5) on loopback:
real multicast from a sender thread at a steady rate (a per-group sequence in every payload)
into one capture feed, two emit-side stand-ins that record every DATA frame. One site goes
away for a while; the other must lose nothing, and the one that comes back must catch up
from its own replay buffer."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import trio

from relayd.capture import CaptureFeedRuntime
from relayd.config import CaptureFeed, CaptureSite, Endpoint
from tests.helpers.emit_standin import Peer, Server, feed_config, serve, stop
from tests.helpers.loopback import FEED, wait_for
from tests.helpers.steady import SteadySender, fresh_groups, lost_and_duplicated, received

#: how long one site is down
OUTAGE = 10.0


def two_sites(
    groups: list[tuple[str, int]], london: int, tokyo: int, **tokyo_site: object
) -> CaptureFeed:
    config = feed_config(groups, [london])
    sites = (
        CaptureSite(name="london", targets=(Endpoint("127.0.0.1", london),)),
        CaptureSite(name="tokyo", targets=(Endpoint("127.0.0.1", tokyo),), **tokyo_site),  # type: ignore[arg-type]
    )
    return attrs.evolve(config, targets=(), site=sites)


def site_samples(feed: CaptureFeedRuntime, site: str) -> dict[str, float]:
    labels = (("feed", FEED), ("site", site))
    return {s.name: s.value for s in feed.samples() if s.labels == labels}


@pytest.mark.usefixtures("datapath")
async def test_one_site_down_loses_nothing_at_the_other_and_catches_up() -> None:
    """Tokyo's emit host is gone for 10 s: London receives every datagram, in order, once,
    on its first connection; Tokyo's data waits in its own replay buffer, and when its host
    is back it resumes exactly: every datagram once, nothing dropped."""
    groups = fresh_groups(2)
    london, tokyo = Peer(), Peer()
    async with trio.open_nursery() as nursery:
        london_server = await serve(nursery, london)
        tokyo_server: Server = await serve(nursery, tokyo)
        feed = CaptureFeedRuntime(two_sites(groups, london_server.port, tokyo_server.port))
        await nursery.start(feed.run)
        await wait_for(lambda: feed.sites[0].uplink.connected and feed.sites[1].uplink.connected)
        with SteadySender(groups) as sender:
            await wait_for(lambda: len(tokyo.datagrams) > 500, timeout=20)
            stop(tokyo_server)
            await wait_for(lambda: not feed.sites[1].uplink.connected, timeout=20)
            health = feed.health()
            assert health.detail["sites"]["london"]["state"] == "streaming"
            assert health.detail["sites"]["tokyo"]["state"] == "reconnecting"
            assert health.state == "reconnecting"
            at_outage = len(london.datagrams)
            await trio.sleep(OUTAGE)
            during = len(london.datagrams) - at_outage
            tokyo_server = await serve(nursery, tokyo, port=tokyo_server.port)
            await wait_for(lambda: feed.sites[1].uplink.connected, timeout=20)
            await trio.sleep(0.5)
        total = sum(sender.sent.values())
        await wait_for(lambda: len(tokyo.datagrams) >= total, timeout=30)
        await wait_for(lambda: len(london.datagrams) >= total, timeout=30)
        await wait_for(lambda: feed.sites[1].replay.acked_seq == feed.receive.seq, timeout=30)
        london_counts = site_samples(feed, "london")
        tokyo_counts = site_samples(feed, "tokyo")
        assert feed.health().state == "streaming"
        nursery.cancel_scope.cancel()
    assert during > 0  # London went on during the outage
    assert lost_and_duplicated(received([london]), sender.sent) == (0, 0, True)
    assert lost_and_duplicated(received([tokyo]), sender.sent) == (0, 0, True)
    # one feed, one sequence: both sites got the same numbered frames
    assert [d.seq for d in london.datagrams] == [d.seq for d in tokyo.datagrams]
    assert (london.hellos, tokyo.hellos) == (1, 2)
    assert london_counts["capture_replay_dropped_datagrams"] == 0
    assert tokyo_counts["capture_replay_dropped_datagrams"] == 0
    assert london_counts["capture_resent_datagrams"] == 0
    assert tokyo_counts["capture_frames_sent"] >= total


@pytest.mark.usefixtures("datapath")
async def test_a_site_whose_buffer_overflows_counts_its_loss_alone() -> None:
    """Tokyo's replay buffer holds 1 s and its host is gone for 3 s: what it drops is counted
    for Tokyo only and covers what Tokyo misses; London loses nothing."""
    groups = fresh_groups(2)
    london, tokyo = Peer(), Peer()
    async with trio.open_nursery() as nursery:
        london_server = await serve(nursery, london)
        tokyo_server = await serve(nursery, tokyo)
        config = two_sites(groups, london_server.port, tokyo_server.port, replay_max_age=1.0)
        feed = CaptureFeedRuntime(config)
        await nursery.start(feed.run)
        await wait_for(lambda: feed.sites[0].uplink.connected and feed.sites[1].uplink.connected)
        with SteadySender(groups) as sender:
            await wait_for(lambda: len(tokyo.datagrams) > 500, timeout=20)
            stop(tokyo_server)
            await trio.sleep(3.0)
            await serve(nursery, tokyo, port=tokyo_server.port)
            await wait_for(lambda: feed.sites[1].uplink.connected, timeout=20)
            await trio.sleep(0.5)
        total = sum(sender.sent.values())
        await wait_for(lambda: len(london.datagrams) >= total, timeout=30)
        await wait_for(lambda: feed.sites[1].replay.acked_seq == feed.receive.seq, timeout=30)
        london_counts = site_samples(feed, "london")
        tokyo_counts = site_samples(feed, "tokyo")
        nursery.cancel_scope.cancel()
    assert lost_and_duplicated(received([london]), sender.sent) == (0, 0, True)
    lost, duplicated, ordered = lost_and_duplicated(received([tokyo]), sender.sent)
    assert lost > 0
    assert (duplicated, ordered) == (0, True)
    # what was in flight when the host went away may have arrived unacknowledged: the count is
    # what Tokyo may have missed, never less than what it did
    assert tokyo_counts["capture_replay_dropped_datagrams"] >= lost
    assert london_counts["capture_replay_dropped_datagrams"] == 0


@pytest.mark.usefixtures("datapath")
async def test_a_site_that_reads_nothing_never_holds_back_the_other() -> None:
    """Tokyo's host welcomes and then reads nothing (its socket fills, the receive thread's
    direct write to it comes up short): London still gets every datagram at once, and Tokyo's
    data waits in Tokyo's replay buffer."""
    groups = fresh_groups(2)
    london, tokyo = Peer(), Peer(read=False, heartbeat=0.1)
    async with trio.open_nursery() as nursery:
        london_server = await serve(nursery, london)
        tokyo_server = await serve(nursery, tokyo)
        config = two_sites(groups, london_server.port, tokyo_server.port)
        feed = CaptureFeedRuntime(attrs.evolve(config, ack_timeout=60.0, idle_timeout=30.0))
        await nursery.start(feed.run)
        await wait_for(lambda: feed.sites[0].uplink.connected and feed.sites[1].uplink.connected)
        with SteadySender(groups) as sender:
            await trio.sleep(3.0)
        total = sum(sender.sent.values())
        await wait_for(lambda: len(london.datagrams) >= total, timeout=30)
        # the last batch reaches London (written at once) a moment before the Python pass
        # puts it into Tokyo's replay buffer
        await wait_for(lambda: feed.sites[1].replay.unacked_datagrams >= total, timeout=10)
        tokyo_waiting = feed.sites[1].replay.unacked_datagrams
        nursery.cancel_scope.cancel()
    assert lost_and_duplicated(received([london]), sender.sent) == (0, 0, True)
    assert tokyo_waiting == total  # nothing acknowledged by Tokyo: all of it held for Tokyo


async def test_a_reload_moving_one_site_leaves_the_other_alone() -> None:
    """A reload gives Tokyo a new target: Tokyo's connection moves with exact resume (goodbye,
    final ACK), London's is never touched, one session throughout."""
    from relayd.config import Config, HealthConfig  # noqa: PLC0415
    from relayd.notify import Notifier  # noqa: PLC0415
    from relayd.supervisor import Supervisor  # noqa: PLC0415

    groups = fresh_groups(2)
    london, tokyo, tokyo_b = Peer(), Peer(final_ack=True), Peer()
    async with trio.open_nursery() as nursery:
        ports = [(await serve(nursery, p)).port for p in (london, tokyo, tokyo_b)]
        first = two_sites(groups, ports[0], ports[1])
        moved = attrs.evolve(
            first.site[1], targets=(Endpoint("127.0.0.1", ports[2]),), replay_max_age=60.0
        )
        second = attrs.evolve(first, site=(first.site[0], moved))
        base = Config(health=HealthConfig(listen=Endpoint("127.0.0.1", 0)), capture=(first,))
        sup = Supervisor(Path("x"), base, notifier=Notifier({}))
        sup.load = lambda _path: attrs.evolve(base, capture=(second,))
        nursery.start_soon(sup.run)
        await sup.ready.wait()
        with SteadySender(groups) as sender:
            await wait_for(lambda: len(tokyo.datagrams) > 500, timeout=20)
            await sup.reload()
            assert sup.reloader.reloads["ok"] == 1
            await wait_for(lambda: len(tokyo_b.datagrams) > 500, timeout=20)
        total = sum(sender.sent.values())
        await wait_for(lambda: len(london.datagrams) >= total, timeout=30)
        await wait_for(lambda: len(tokyo.datagrams) + len(tokyo_b.datagrams) >= total, timeout=30)
        feed = sup.slots["capture", FEED].runtime
        assert isinstance(feed, CaptureFeedRuntime)
        assert feed.sites[1].replay.max_age == 60.0
        restarts = [s.value for s in sup.samples() if s.name == "capture_session_restarts"]
        nursery.cancel_scope.cancel()
    assert lost_and_duplicated(received([london]), sender.sent) == (0, 0, True)
    assert lost_and_duplicated(received([tokyo, tokyo_b]), sender.sent) == (0, 0, True)
    assert (london.hellos, tokyo.hellos, tokyo_b.hellos) == (1, 1, 1)
    assert restarts == [0]


def test_site_keys_are_read_per_site_and_rotated_without_a_restart(tmp_path: Path) -> None:
    """Each site authenticates with its own key when it has one, else the feed's; a reload
    that changes only key files gives every site its new key in place."""
    feed_key, tokyo_key = tmp_path / "feed.key", tmp_path / "tokyo.key"
    feed_key.write_text("f" * 32)
    tokyo_key.write_text("t" * 32)
    config = attrs.evolve(
        two_sites(fresh_groups(1), 1, 2, auth_key_file=tokyo_key), auth_key_file=feed_key
    )
    feed = CaptureFeedRuntime(config)
    feed.open()
    try:
        assert [site.link.key for site in feed.sites] == [b"f" * 32, b"t" * 32]
        rotated = tmp_path / "tokyo2.key"
        rotated.write_text("u" * 32)
        tokyo = attrs.evolve(config.site[1], auth_key_file=rotated)
        assert feed.update_keys(attrs.evolve(config, site=(config.site[0], tokyo)))
        assert [site.link.key for site in feed.sites] == [b"f" * 32, b"u" * 32]
        moved = attrs.evolve(tokyo, targets=(Endpoint("127.0.0.1", 3),))
        assert not feed.update_keys(attrs.evolve(config, site=(config.site[0], moved)))
    finally:
        feed.close()


def test_two_sites_metrics_are_one_family_each_with_a_site_label() -> None:
    """/metrics of a feed with two sites: each per-site family has one sample per site
    (label ``site``), the feed's own families one sample; promtool accepts the text."""
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    from relayd.metrics import render  # noqa: PLC0415

    feed = CaptureFeedRuntime(two_sites(fresh_groups(1), 1, 2))
    text = render(feed.samples())
    lines = text.splitlines()
    assert 'relayd_capture_frames_sent_total{feed="test",site="london"} 0' in lines
    assert 'relayd_capture_frames_sent_total{feed="test",site="tokyo"} 0' in lines
    assert 'relayd_capture_datagrams_in_total{feed="test"} 0' in lines
    assert sum(line.startswith("# TYPE relayd_capture_frames_sent") for line in lines) == 1
    if shutil.which("promtool"):
        check = subprocess.run(
            ["promtool", "check", "metrics"],
            check=False,
            input=text,
            capture_output=True,
            text=True,
        )
        assert "error" not in (check.stdout + check.stderr).lower(), check.stdout + check.stderr
