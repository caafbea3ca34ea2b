"""Benchmarks that time p2pfed against a reference in the same run, so the ratio is fair.

allreduce.py: one averaging round (hivemind all-reduce over libp2p) vs torch.distributed gloo all_reduce.
wan.py: a swarm in network namespaces behind tbf rate-limited links (needs root; not run in CI).
"""
