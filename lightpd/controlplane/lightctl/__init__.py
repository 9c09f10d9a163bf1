"""lightctl, the command line of a fleet (``cli``): `lightctl up` and the supervisor of
what it starts, the node commands, `lightctl bench` (``bench/``), the embedded Redis,
the node launcher (also used by tests and benchmarks), and the nodes' container
health check (``healthcheck``).

It reaches the control plane over HTTP, or starts it as a process; the core never
imports it.
"""
