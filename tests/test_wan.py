"""The emulated WAN of the benchmarks (p2pfed/bench/wan.py), as root: a raw TCP all-to-all across the tbf links moves
every byte and never beats the links' rate, so `bench link`'s raw TCP reference measures the link, not loopback.

.venv/bin/python -m pytest -q tests/test_wan.py
"""

from __future__ import annotations

import pytest

from p2pfed.bench.wan import WanNet
from p2pfed.errors import UserError
from tests.conftest import netns_works

RATE_MBIT = 40.0


@pytest.mark.skipif(not netns_works(), reason="network namespaces need root")
def test_a_raw_tcp_all_to_all_across_the_emulated_links_stays_under_their_rate() -> None:
    net = WanNet(3, RATE_MBIT)
    try:
        net.build()
    except UserError as e:  # a kernel without what the test needs
        net.destroy()
        pytest.skip(f"network namespaces unavailable: {e}")
    try:
        total = 4_000_000  # bytes each peer sends, half to each of the other two: 0.8 s at 40 Mbit/s
        seconds = net.all_to_all_s(total)
        assert seconds is not None  # every peer received every byte
        ideal = total * 8 / (RATE_MBIT * 1e6)
        assert ideal / seconds <= 1.05, (ideal, seconds)  # unshaped loopback would be ~100x faster
    finally:
        net.destroy()
        assert net.leftovers() == []
