"""A soak at 20k/s: 60 s in ``make test``, 10 minutes with RELAYD_SOAK=1 (``make soak``).

Memory and descriptor counts of both relayd processes are sampled once a second; after a
warm-up the least-squares slope of each must be flat. The slopes are reported (KiB per minute
and descriptors per minute) with the loss of the stream, which must be zero.
"""

from __future__ import annotations

import pytest

from chaos.topology import Relay, Sampler, every, metric, report, scaled

pytestmark = [pytest.mark.netns, pytest.mark.slow]

RATE = 20_000
WARM_UP = 15.0  # allocator, caches and socket buffers settle


def test_soak(relay: Relay) -> None:
    relay.start()
    seconds = scaled(60.0, 600.0)
    stream = relay.stream(RATE, seconds)
    sampler = Sampler({"capture": relay.pid("capture"), "emit": relay.pid("emit")})
    statuses = []
    for n, _ in enumerate(every(1.0, seconds)):
        sampler.sample()
        if n % 5 == 0:
            statuses.append(relay.health("emit")[0])
            statuses.append(relay.health("capture")[0])
    result = stream.result(timeout=120)
    figures = sampler.figures(after=WARM_UP)
    capture_text = relay.metrics("capture")
    report(
        "soak",
        seconds=seconds,
        stream=result,
        health_non_200=sum(1 for s in statuses if s != 200),
        kernel_drops=metric(capture_text, "capture_kernel_drops"),
        replay_dropped=metric(capture_text, "capture_replay_dropped_datagrams"),
        **figures,
    )
    assert result["lost"] == 0, result
    assert result["dup"] == 0
    assert all(s == 200 for s in statuses)
    for name, fig in figures.items():
        # Flat: no steady growth. A leak of one 160-byte datagram in a thousand would be
        # some 190 KiB a minute at this rate; allocator noise over a minute stays far below
        # the bounds below (which a real leak of a few bytes per datagram would exceed).
        assert abs(fig["fds_per_min"]) < 0.5, (name, fig)
        assert fig["fds_last"] == fig["fds_first"], (name, fig)
        assert fig["rss_kib_per_min"] < (2048 if seconds < 300 else 256), (name, fig)
        assert fig["rss_kib_max"] < 120 * 1024, (name, fig)
