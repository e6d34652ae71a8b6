"""Operator and customer tools: ``status``, ``listen``, ``send``, ``demo`` and the pcapng
reader they share.

The daemon (``relayd run``) never imports this package; the tools import the daemon's
building blocks (netif, the feeds for the demo) as any client would.
"""
