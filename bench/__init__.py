"""Benchmarks: the daemon alone over its vhost-user socket, and (in ``vm/bench.py``) the guest."""
