"""The capture side: multicast groups in, framed and streamed to the emit side.

The feed (:class:`CaptureFeedRuntime`, relayd/capture/feed.py) is made of pieces that each own
their state and lock: the receive threads and the sequence (receive.py), the TCP side with
the replay buffer (uplink.py) and the connection loop (link.py).
"""

from relayd.capture.feed import CaptureFeedRuntime, LiveUpdate
from relayd.capture.link import BACKOFF_CAP, backoff_delay

__all__ = ["BACKOFF_CAP", "CaptureFeedRuntime", "LiveUpdate", "backoff_delay"]
