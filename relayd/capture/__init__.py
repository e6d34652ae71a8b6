"""The capture side: multicast groups in, framed and streamed to the emit side.

The feed (:class:`CaptureFeedRuntime`, relayd/capture/feed.py) is made of pieces that each own
their state and lock: the receive threads and the sequence (receive.py) and the TCP side with
the replay buffer (uplink.py).
"""

from relayd.capture.feed import BACKOFF_CAP, CaptureFeedRuntime, backoff_delay

__all__ = ["BACKOFF_CAP", "CaptureFeedRuntime", "backoff_delay"]
