"""A/B capture hosts on real sockets: two capture sessions stream the same Deribit packets into
one emit feed at once, on both data planes (the ``datapath`` fixture).

With ``arbitration = "deribit"`` the customer's receiver gets every datagram once, in order per
channel, whichever copy brought it; a copy with holes is filled by the other; a hole no copy
fills is released when its hold expires even without further traffic (the pump's wait is
bounded by the arbiter's deadline). With ``"none"`` every datagram goes out once per session,
and the second concurrent session is counted.
"""

from __future__ import annotations

import random
import struct
import subprocess
import sys
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import trio

from relayd.emit import EmitFeedRuntime
from relayd.tools.pcapng import read_datagrams
from relayd.wire import Ack, encode_datagram
from tests.helpers import metrics
from tests.helpers.capture_standin import (
    Peer,
    Receivers,
    make_config,
    metric,
    pick_groups,
    running,
)
from tests.helpers.loopback import wait_for
from tests.helpers.relayd_process import (
    RelaydProcess,
    emit_toml,
    get_json,
    get_text,
    process_toml,
)

Datagram = tuple[IPv4Address, int, bytes]


@pytest.fixture
def groups() -> list[tuple[IPv4Address, int]]:
    return pick_groups(3)


def deribit_stream(groups: Sequence[tuple[IPv4Address, int]], count: int) -> list[Datagram]:
    """The exchange's traffic: 8-byte Deribit headers, 2 channels per group:port, in sequence."""
    rng = random.Random(7)
    seqs: dict[tuple[int, int], int] = {}
    out = []
    for i in range(count):
        index = rng.randrange(len(groups))
        group, port = groups[index]
        channel = rng.randrange(2)
        seq = seqs[index, channel] = seqs.get((index, channel), 1000) + 1
        body = b"%d" % i * rng.randrange(1, 20)
        out.append((group, port, struct.pack("<HHI", len(body), channel, seq) + body))
    return out


def hole_index(stream: Sequence[Datagram]) -> int:
    """The next datagram on the first one's channel: left out, it is a hole the arbiter holds
    what follows on that channel behind."""
    channel_of = [struct.unpack_from("<HH", p)[1] for _, _, p in stream]
    return next(i for i in range(1, len(stream)) if channel_of[i] == channel_of[0])


def frames(datagrams: Iterable[tuple[int, Datagram]]) -> bytes:
    return b"".join(
        encode_datagram(seq, int(group), port, 1_700_000_000_000_000_000, payload)
        for seq, (group, port, payload) in datagrams
    )


class Copy:
    """One capture host's session: its own sequence numbers over what it received."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.seq = 0
        self.acked = 0  # the highest ACK read so far

    async def send(self, datagrams: Sequence[Datagram], *, acked: bool = True) -> None:
        """Send ``datagrams`` as the session's next frames; ``acked``: then wait until all are
        ACKed (a datagram held behind a hole is ACKed only once it is sent or resolved)."""
        numbered = [(self.seq + 1 + i, d) for i, d in enumerate(datagrams)]
        self.seq += len(datagrams)
        await self.peer.stream.send_all(frames(numbered))
        if acked:
            await self.wait_acked()

    async def wait_acked(self) -> None:
        await self.peer.wait_ack(self.seq)
        self.acked = self.seq

    async def acks_until_quiet(self, quiet: float = 0.3) -> int:
        """The highest ACK that came before the emit side went quiet for ``quiet`` s."""
        while True:
            with trio.move_on_after(quiet):
                event = await self.peer.next_event()
                if isinstance(event, Ack):
                    self.acked = max(self.acked, event.seq)
                if event is not None:
                    continue
            return self.acked


async def two_copies(feed: EmitFeedRuntime) -> tuple[Copy, Copy]:
    assert feed.listen_port
    a = await Peer.start(feed.listen_port, source="127.0.0.1")
    assert await a.welcome() == 0
    b = await Peer.start(feed.listen_port, source="127.0.0.2")
    assert await b.welcome() == 0
    await wait_for(lambda: metric(feed, "active_connections") == 2)
    return Copy(a), Copy(b)


async def a_taken(feed: EmitFeedRuntime, a: Copy, b: Copy) -> None:
    """Until the feed has taken in all A sent (its ACK may wait for B's copies): the copies
    go in turn, as one ahead of the other, not both at once."""
    await wait_for(lambda: metric(feed, "datagrams_in") >= a.seq + b.seq, timeout=10)


def per_channel(datagrams: Iterable[Datagram]) -> dict[tuple[IPv4Address, int, int], list[bytes]]:
    out: dict[tuple[IPv4Address, int, int], list[bytes]] = {}
    for group, port, payload in datagrams:
        out.setdefault((group, port, struct.unpack_from("<H", payload, 2)[0]), []).append(payload)
    return out


def in_order_once(got: Sequence[Datagram], sent: Sequence[Datagram]) -> None:
    """The same datagrams, each once, in the same order per channel (a datagram held behind
    a hole goes out after later ones of other channels)."""
    assert len(got) == len(sent), f"{len(got)} received, {len(sent)} sent"
    assert per_channel(got) == per_channel(sent)


@pytest.mark.usefixtures("datapath")
async def test_two_capture_sessions_deliver_each_datagram_once(
    groups: list[tuple[IPv4Address, int]], receivers: Receivers
) -> None:
    stream = deribit_stream(groups, 600)
    rng = random.Random(3)
    lost_a = set(rng.sample(range(len(stream)), 60))
    lost_b = set(rng.sample(sorted(set(range(len(stream))) - lost_a), 60))
    config = make_config(arbitration="deribit", arbitration_hold_timeout=1.0)
    with trio.fail_after(30):
        async with running(config) as feed:
            a, b = await two_copies(feed)
            for start in range(0, len(stream), 25):  # A a little ahead of B, chunk by chunk
                chunk = range(start, min(start + 25, len(stream)))
                await a.send([stream[i] for i in chunk if i not in lost_a], acked=False)
                await a_taken(feed, a, b)
                await b.send([stream[i] for i in chunk if i not in lost_b])
                await a.wait_acked()  # A's holes held its ACK back until B filled them
            got = await receivers.settle()
            in_order_once(got, stream)
            assert metric(feed, "arbitration_duplicates") == len(stream) * 2 - 120 - len(stream)
            assert metric(feed, "arbitration_gaps") == 0
            assert metric(feed, "arbitration_held") > 0  # A's holes waited for B
            assert metric(feed, "arbitration_held_now") == 0
            share_a = metric(feed, "arbitration_sent", source="127.0.0.1")
            share_b = metric(feed, "arbitration_sent", source="127.0.0.2")
            assert share_a + share_b == len(stream)
            assert share_b >= len(lost_a)  # what A lost came from B
            assert metric(feed, "datagrams_out") == len(stream)
            assert metric(feed, "concurrent_sessions") == 0  # counted with "none" only
            detail = feed.health().detail["arbitration"]
            assert detail["mode"] == "deribit"
            assert detail["streaming_sessions"] == 2
            assert detail["sent_by_source"] == {"127.0.0.1": share_a, "127.0.0.2": share_b}


@pytest.mark.usefixtures("datapath")
async def test_a_hole_no_copy_fills_is_released_at_its_deadline_without_traffic(
    groups: list[tuple[IPv4Address, int]], receivers: Receivers
) -> None:
    stream = deribit_stream(groups[:1], 20)  # one group:port
    config = make_config(arbitration="deribit", arbitration_hold_timeout=0.2)
    with trio.fail_after(30):
        async with running(config) as feed:
            a, _idle_b = await two_copies(feed)
            hole = hole_index(stream)
            await a.send([d for i, d in enumerate(stream) if i != hole])
            # nothing else arrives: the pump wakes for the hold's deadline on its own
            await wait_for(lambda: metric(feed, "arbitration_held_now") == 0, timeout=10)
            got = await receivers.settle()
            in_order_once(got, [d for i, d in enumerate(stream) if i != hole])
            assert metric(feed, "arbitration_gaps") == 1
            assert metric(feed, "arbitration_missing") == 1
            # the family the emit hosts' CloudWatch alarm reads: the gaps customers see
            assert metric(feed, "upstream_gaps", side="emit") == 1
            assert metric(feed, "upstream_missing", side="emit") == 1


@pytest.mark.usefixtures("datapath")
async def test_a_held_datagram_is_acknowledged_only_once_it_is_sent(
    groups: list[tuple[IPv4Address, int]], receivers: Receivers
) -> None:
    """A's copy has a hole: what follows on that channel is held for B's copy, and A's ACK
    stays below the first held datagram (had this host died then, A would resend it to the
    next one) while the datagrams of the other channel are ACKed; once B fills the hole and
    the held ones go out, A's ACK covers everything."""
    stream = deribit_stream(groups[:1], 20)
    channel_of = [struct.unpack_from("<HH", p)[1] for _, _, p in stream]
    hole = hole_index(stream)
    # A's frame numbers skip the hole: stream[i] past it is A's frame i
    first_held = next(i for i in range(hole + 1, len(stream)) if channel_of[i] == channel_of[0])
    config = make_config(arbitration="deribit", arbitration_hold_timeout=10.0, idle_timeout=30.0)
    with trio.fail_after(40):
        async with running(config) as feed:
            a, b = await two_copies(feed)
            await a.send([d for i, d in enumerate(stream) if i != hole], acked=False)
            await wait_for(lambda: metric(feed, "arbitration_held_now") > 0)
            assert await a.acks_until_quiet() == first_held - 1 < a.seq
            await b.send([stream[hole]])  # B's copy of the datagram A lost
            await a.wait_acked()  # the held ones went out: all of A is ACKed
            got = await receivers.settle()
            in_order_once(got, stream)
            assert metric(feed, "arbitration_gaps") == 0
            assert metric(feed, "arbitration_held_now") == 0


@pytest.mark.usefixtures("datapath")
async def test_without_arbitration_a_second_session_is_counted_and_sends_again(
    groups: list[tuple[IPv4Address, int]], receivers: Receivers
) -> None:
    stream = deribit_stream(groups, 50)
    with trio.fail_after(30):
        async with running(make_config()) as feed:
            a, b = await two_copies(feed)
            await a.send(stream)
            await b.send(stream)
            got = await receivers.settle()
            assert len(got) == 2 * len(stream)  # today's behaviour, now warned about
            assert metric(feed, "concurrent_sessions") == 1
            detail = feed.health().detail["arbitration"]
            assert (detail["mode"], detail["concurrent_sessions"]) == ("none", 1)
            assert feed.arbitration is not None
            assert feed.arbitration.arbiter is None  # no per-datagram cost


@pytest.mark.usefixtures("datapath")
async def test_observed_datagrams_are_not_sent_again(
    groups: list[tuple[IPv4Address, int]], receivers: Receivers
) -> None:
    """What another relay was seen to emit (``EmitFeedRuntime.observe``) is skipped."""
    stream = deribit_stream(groups, 40)
    with trio.fail_after(30):
        async with running(make_config(arbitration="deribit")) as feed:
            for group, port, payload in stream[:30]:
                feed.observe(int(group), port, payload)
            a, _ = await two_copies(feed)
            await a.send(stream)
            got = await receivers.settle()
            in_order_once(got, stream[30:])
            assert metric(feed, "arbitration_observed") == 30
            assert metric(feed, "arbitration_duplicates") == 30


@pytest.mark.usefixtures("datapath")
async def test_two_copies_of_the_deribit_sample_merge_exactly_once(deribit_sample: Path) -> None:
    """The sample's 5,066 datagrams (29 group:port pairs, moved onto test groups), two
    capture sessions each missing a different 5 %: every datagram once, in order per channel."""
    sample = list(read_datagrams(deribit_sample))
    pairs = sorted({(d.group, d.port) for d in sample})
    moved = dict(zip(pairs, pick_groups(len(pairs)), strict=True))
    stream = [(*moved[d.group, d.port], d.payload) for d in sample]
    rng = random.Random(11)
    lost_a = set(rng.sample(range(len(stream)), len(stream) // 20))
    lost_b = set(rng.sample(sorted(set(range(len(stream))) - lost_a), len(stream) // 20))
    receivers = Receivers(list(moved.values()))
    config = make_config(
        arbitration="deribit", deribit_layout="frame-v1", arbitration_hold_timeout=1.0
    )
    try:
        with trio.fail_after(60):
            async with running(config) as feed:
                a, b = await two_copies(feed)
                for start in range(0, len(stream), 200):
                    chunk = range(start, min(start + 200, len(stream)))
                    await a.send([stream[i] for i in chunk if i not in lost_a], acked=False)
                    await a_taken(feed, a, b)
                    await b.send([stream[i] for i in chunk if i not in lost_b])
                    await a.wait_acked()
                got = await receivers.settle()
                in_order_once(got, stream)
                assert metric(feed, "arbitration_gaps") == 0
                assert metric(feed, "arbitration_resets") == 0
                assert metric(feed, "datagrams_out") == len(stream)
    finally:
        receivers.close()


@pytest.mark.usefixtures("datapath")
async def test_held_datagrams_go_out_when_the_last_session_ends(
    groups: list[tuple[IPv4Address, int]], receivers: Receivers
) -> None:
    """Both copies end while a hole is held (no pump is left to expire it): what is held goes
    out at once, as a gap, since no copy can fill the hole any more."""
    stream = deribit_stream(groups[:1], 20)
    config = make_config(arbitration="deribit", arbitration_hold_timeout=1.0)
    with trio.fail_after(30):
        async with running(config) as feed:
            a, b = await two_copies(feed)
            hole = hole_index(stream)
            await a.send([d for i, d in enumerate(stream) if i != hole], acked=False)
            await wait_for(lambda: metric(feed, "arbitration_held_now") > 0)
            await a.peer.aclose()
            await b.peer.aclose()
            await wait_for(lambda: metric(feed, "active_connections") == 0)
            await wait_for(lambda: metric(feed, "arbitration_held_now") == 0, timeout=10)
            got = await receivers.settle()
            in_order_once(got, [d for i, d in enumerate(stream) if i != hole])
            assert metric(feed, "arbitration_flushed") > 0
            assert metric(feed, "arbitration_gaps") == 1
            assert metric(feed, "datagrams_out") == len(stream) - 1


def test_relayd_run_reports_arbitration(tmp_path: Path) -> None:
    """``relayd run`` with ``arbitration = "deribit"`` in its TOML: the metrics are on
    ``/metrics`` (valid exposition), the detail on ``/healthz/<feed>``, a line in ``relayd
    status``."""
    config = tmp_path / "relayd.toml"
    feed = emit_toml("ab") + 'arbitration = "deribit"\nderibit_layout = "sbe"\n'
    config.write_text(process_toml(feed, emit_toml("plain")))
    relayd = RelaydProcess(config, {})
    try:
        health = relayd.health_port()
        relayd.wait_line("ready")
        families = metrics.parse(get_text(health, "/metrics"))
        assert metrics.value(families, "arbitration_duplicates", feed="ab") == 0
        assert metrics.value(families, "concurrent_sessions", feed="plain") == 0
        duplicates = families["relayd_arbitration_duplicates"].samples
        assert {sample.labels["feed"] for sample in duplicates} == {"ab"}  # "plain": none
        _, doc = get_json(health, "/healthz/ab")
        assert doc["feeds"]["ab"]["arbitration"]["deribit_layout"] == "sbe"
        status = subprocess.run(
            [sys.executable, "-m", "relayd", "status", "--url", f"127.0.0.1:{health}"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        assert "ab: arbitration deribit (sbe): 0 duplicates suppressed" in status.stdout
    finally:
        relayd.kill()


@pytest.mark.usefixtures("datapath")
def test_a_restarted_feed_keeps_its_arbiter_when_the_settings_stay() -> None:
    """A reload restarts a changed feed make-before-break (``open(previous)``): with the same
    arbitration settings the new runtime takes the arbiter over (what it knows of every
    channel), and it is freed only when neither runtime uses it any more."""
    old = EmitFeedRuntime(make_config(arbitration="deribit"), keys=())
    old.open()
    same = EmitFeedRuntime(make_config(arbitration="deribit", ttl=2), keys=())
    same.open(old)
    other = EmitFeedRuntime(make_config(arbitration="content"), keys=())
    other.open(same)
    try:
        assert old.arbitration is not None
        assert same.arbitration is old.arbitration
        assert other.arbitration is not old.arbitration
        arbiter = old.arbitration.arbiter
        assert arbiter is not None
        old.close()
        same.observe(0xEFFF0001, 6100, struct.pack("<HHI", 0, 1, 5))  # still in use: alive
        assert arbiter.counts()["observed"] == 1
        same.close()
        same.observe(0xEFFF0001, 6100, struct.pack("<HHI", 0, 1, 6))  # freed: ignored
        assert arbiter.counts()["observed"] == 1  # the counters outlive it
    finally:
        for feed in (old, same, other):
            feed.close()
