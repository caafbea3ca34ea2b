"""Benchmarks that time p2pfed against a reference in the same run, so the ratio is fair.

allreduce.py: one averaging round (p2pfed's butterfly, libp2p or TCP) vs torch.distributed gloo all_reduce.
comm.py: bytes sent per trained token and eval loss, vs the same run with sync fp32 averaging.
wan.py: a swarm in network namespaces behind tbf rate-limited links (needs root; not run in CI).
link.py: the share of a rate-limited link's rate one averaging round gets (needs root; not run in CI).
all_to_all.py: one peer of raw TCP sending to every other at once across those links, link.py's reference.
hivemind_peer.py: a hivemind.Optimizer peer on p2pfed's model and data, the reference for `bench wan`.
"""
