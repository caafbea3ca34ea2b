"""privacy.secure_aggregation on real peers: three peers train with masked rounds (8-bit fixed point in the ring
Z_2^9), the loss falls, the parameters agree, and each round sends b = 9 bits per element to the reducers and the
8-bit mean back. The rounds overlap the next inner steps (averaging.overlap) and travel over the direct TCP transport,
so this is also the DiLoCo test of those two (tests/test_diloco.py covers the blocking rounds over libp2p).

.venv/bin/python -m pytest -q tests/test_secure_swarm.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY, Launcher, wait_no_leftovers

pytestmark = pytest.mark.slow

INNER, STEPS, PEERS = 10, 40, 3
RING_BITS = 8 + 1  # uint8's 8 value bits, plus ceil(log2 2) for the sum of the two members other than the reducer


def test_masked_diloco_swarm_trains_and_agrees(launcher: Launcher, tmp_path: Path) -> None:
    # Execute
    swarm = launcher.start(
        "swarm", "--peers", str(PEERS), "--config", TINY, "--max-steps", str(STEPS),
        "--set", "averaging.mode=diloco", "--set", f"averaging.inner_steps={INNER}",
        "--set", "compression.name=uint8", "--set", "privacy.secure_aggregation=true",
        "--set", "averaging.overlap=true", "--set", "averaging.transport=tcp",
        "--run-dir", str(tmp_path / "run"), "--report", str(tmp_path / "report.json"), name="swarm",
    )  # fmt: skip
    assert swarm.wait(timeout=300) == 0, swarm.stdout()[-3000:]

    # Assert: the peers trained through masked rounds and ended in agreement
    report = json.loads((tmp_path / "report.json").read_text())
    peers = report["peers"]
    assert len(peers) == PEERS
    for peer in peers:
        assert peer["final_step"] == STEPS
        assert peer["rounds_ok"] >= 1
        assert peer["eval_loss"] < peer["initial_eval_loss"] - 1.0
    assert report["max_param_divergence"] < 1e-4

    # Assert: a committed round moves the masked ring elements, 9 bits each, over (n-1) vector legs to the
    # reducers, and the 8-bit means back over (n-1) (uint8's chunk scales and the framing add about 1%)
    numel = peers[0]["parameters"]
    per_round = (PEERS - 1) * (RING_BITS * numel / 8 + numel)
    least = min(p["rounds_ok"] for p in peers)
    most = max(p["rounds_ok"] + p["rounds_failed"] for p in peers)
    total = sum(p["bytes_sent"] for p in peers)
    assert least * per_round <= total <= 1.03 * most * per_round
    assert wait_no_leftovers(launcher) == []
