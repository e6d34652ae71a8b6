"""The emit side: capture connections in, their datagrams out as multicast.

The feed (:class:`EmitFeedRuntime`, relayd/emit/feed.py) is made of pieces that each own their
state: the gate (listener.py), the sessions (sessions.py), the destinations
(destinations.py), one data-path thread per streaming connection (pump.py), the accounting
(stats.py), and the feed's role among the emit hosts: the rules (role.py) and the observer
that watches the feed's groups for other relays and drives the emit gate (observer.py).
"""

from relayd.emit.feed import EmitFeedRuntime
from relayd.emit.pump import ACK_INTERVAL
from relayd.emit.sessions import SESSION_LIMIT
from relayd.emit.stats import FAILING_HOLD

__all__ = ["ACK_INTERVAL", "FAILING_HOLD", "SESSION_LIMIT", "EmitFeedRuntime"]
