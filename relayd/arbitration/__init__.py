"""A/B arbitration of one feed's datagrams by the exchange's own sequence numbers (sans-I/O).

Several capture hosts stream the same multicast groups; the active emit host hands every
datagram of every copy to one ``Arbiter`` per feed, which says what to do with it: send it now,
drop it (another copy, or the previous emitter, already sent it), or hold it for a moment
because the copy that brought it lost the datagram before it and another copy may still bring
that one. Held datagrams come back out of ``Arbiter.released`` in sequence order as soon as the
hole is filled, or when ``expire`` gives up on the hole (an upstream gap, counted). The capture
side counts the exchange's own gaps and duplicates with an ``UpstreamMonitor`` over the same
sequence tracking, before anything is relayed.

Modes (``ArbitrationMode``): ``DERIBIT`` (group, port, channel and sequence from the Deribit
packet header, in one of two layouts, ``DeribitLayout``), ``CONTENT`` (a hash of group, port and
payload within a bounded window, for feeds without sequence numbers: two identical legitimate
datagrams within the window are merged into one), and ``NONE`` (every datagram is sent).

Modules: ``headers`` (the two Deribit layouts), ``sequence`` (channel tracking and the capture
side's ``UpstreamMonitor``), ``arbiter`` (the ``Arbiter``, its content window and verdicts).
docs/EXACTLY_ONCE.md has the rules and why they are what they are.
"""

from relayd.arbitration.arbiter import (
    Arbiter,
    ArbiterStats,
    ArbitrationConfig,
    ArbitrationMode,
    ContentWindow,
    Release,
    Verdict,
)
from relayd.arbitration.headers import (
    SBE_INCREMENTAL,
    SBE_RETRANSMIT,
    SBE_SNAPSHOT,
    ChannelKind,
    DeribitHeader,
    DeribitLayout,
    parse_deribit,
)
from relayd.arbitration.sequence import (
    ChannelCounters,
    ChannelPosition,
    SequenceEvent,
    UpstreamMonitor,
    UpstreamStats,
    split_channel_key,
)

__all__ = [
    "SBE_INCREMENTAL",
    "SBE_RETRANSMIT",
    "SBE_SNAPSHOT",
    "Arbiter",
    "ArbiterStats",
    "ArbitrationConfig",
    "ArbitrationMode",
    "ChannelCounters",
    "ChannelKind",
    "ChannelPosition",
    "ContentWindow",
    "DeribitHeader",
    "DeribitLayout",
    "Release",
    "SequenceEvent",
    "UpstreamMonitor",
    "UpstreamStats",
    "Verdict",
    "parse_deribit",
    "split_channel_key",
]
