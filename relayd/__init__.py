"""relayd: carry UDP multicast market data over TCP and re-emit it as multicast."""

__version__ = "0.1.0"
