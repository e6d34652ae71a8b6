"""What several test modules, and the benchmarks, share; test modules import from here, never
from each other.

- ``netns``: the network-namespace harness (also under bench/topology.py)
- ``relayd_process``, ``run_peer``: ``relayd run`` as a child process and its far ends
- ``emit_standin``, ``capture_standin``: each side of the protocol played on loopback
- ``loopback``, ``datapath``, ``health_model``: shared constants, the C/Python switch, a
  fixed-answer health model
- ``metrics``: /metrics parsed with prometheus_client and one lookup of a value
- ``nlb``: HAProxy in a namespace standing in for the AWS Network Load Balancer
- ``trials``, ``trial_verdict``: failure trials of the whole deployment in namespaces, and
  the verdict on what the customer received
"""
