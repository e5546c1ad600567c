"""Benchmarks against diffusers; see common.py for the shared protocol and `p2p-engine bench`."""
