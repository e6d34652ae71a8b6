"""End-to-end relay benchmark in network namespaces (``python -m bench.relay [--quick]``).

A C generator (``bench/gen.c``) sends paced multicast to 4 groups, a C receiver
(``bench/recv.c``) counts loss, duplicates and reordering and measures one-way latency (all
namespaces share one clock). Two paths run in the same sweep:

* ``direct``: generator -> receiver over one veth, no relay (the baseline);
* ``relayd``: generator -> ``relayd run`` with a capture feed -> TCP over a veth ->
  ``relayd run`` with an emit feed -> receiver.

Two shapes: ``fixed`` (160-byte payloads at a fixed rate) and ``bursty`` (Deribit-like sizes in
bursts of 50 back-to-back datagrams). For every point the CPU time (utime + stime) and RSS of
both relay processes are sampled from ``/proc``, and the capture sockets' kernel drop counters
say where a loss happened.

``--quick`` runs one short sweep and prints the ratio of the relay to the direct path: a
regression guard, not a timed test. ``--docs`` writes the results into ``docs/PERFORMANCE.md``
and plots them to ``docs/performance.png`` (matplotlib, from the ``bench`` extra).
``--profile`` records both relay processes with py-spy (also the ``bench`` extra) under load
instead of sweeping (Python frames only); ``--perf`` counts syscalls and context switches per
thread with ``perf stat`` and samples kernel and user stacks with ``perf record -g``, for the C
data path; ``--hops`` splits the relay's latency per hop from tcpdump stamps.

Modules: ``harness`` (topology, relay processes, one measured point), ``sweep`` (rates, runs,
medians), ``report`` (tables, docs, plot), ``pyspy`` and ``perf`` (profiles), ``hops``.
Needs root; without it the benchmark says why and exits 0.
"""
