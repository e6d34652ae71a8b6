"""What several test modules (and bench/) share: the namespace harness, relayd child
processes and their peers, free ports, /metrics parsing, the loopback stand-ins."""
