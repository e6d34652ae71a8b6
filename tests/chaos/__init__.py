"""Fault, load and bad-input scenarios against real relayd processes in namespaces."""
