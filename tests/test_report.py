"""Swarm reports: the parameter-divergence check against a plain-torch pairwise reference, and the combined report.

.venv/bin/python -m pytest -q tests/test_report.py
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import save_file

from p2pfed.report import combine_reports, max_param_divergence


def _peer_states(n_peers: int) -> list[dict[str, torch.Tensor]]:
    """Nearly equal parameters, as after a run, each peer off by its own noise (one tensor in float16)."""
    g = torch.Generator().manual_seed(0)
    base = {"embed.weight": torch.randn(16, 8, generator=g), "norm.weight": torch.ones(8), "head.bias": torch.zeros(4)}
    states = []
    for _ in range(n_peers):
        state = {name: t + 1e-3 * torch.randn(t.shape, generator=g) for name, t in base.items()}
        state["norm.weight"] = state["norm.weight"].half()
        states.append(state)
    return states


def _write(tmp_path, states: list[dict[str, torch.Tensor]]) -> list[str]:
    paths = []
    for i, state in enumerate(states):
        path = tmp_path / f"peer{i}.safetensors"
        save_file(state, str(path))
        paths.append(str(path))
    return paths


def _reference_divergence(states: list[dict[str, torch.Tensor]]) -> float:
    """Largest |a - b| over every pair of peers and every element, the slow obvious way."""
    return max(
        float((a[name].double() - b[name].double()).abs().max())
        for a, b in itertools.combinations(states, 2)
        for name in a
    )


def test_max_param_divergence_is_the_largest_pairwise_difference(tmp_path):
    # Prepare
    states = _peer_states(3)
    states[2]["head.bias"][1] += 0.5  # one clear outlier: the answer must come from this pair of elements
    paths = _write(tmp_path, states)

    # Execute
    divergence = max_param_divergence(paths)

    # Assert
    assert divergence is not None
    torch.testing.assert_close(divergence, _reference_divergence(states), rtol=0, atol=0)
    assert divergence > 0.5 - 0.1  # the outlier, less a few 1e-3 of noise, dominates


def test_identical_peers_have_zero_divergence(tmp_path):
    # Prepare
    state = _peer_states(1)[0]
    paths = _write(tmp_path, [state, {k: v.clone() for k, v in state.items()}])

    # Execute / Assert
    assert max_param_divergence(paths) == 0.0


def test_fewer_than_two_files_give_none(tmp_path):
    # Prepare
    paths = _write(tmp_path, _peer_states(1))

    # Execute / Assert
    assert max_param_divergence([]) is None
    assert max_param_divergence(paths) is None
    assert max_param_divergence([paths[0], str(tmp_path / "missing.safetensors")]) is None


def test_different_parameter_names_raise_value_error(tmp_path):
    # Prepare
    a, b = _peer_states(2)
    b["extra.weight"] = torch.zeros(2)
    paths = _write(tmp_path, [a, b])

    # Execute / Assert
    with pytest.raises(ValueError, match="different parameter sets"):
        max_param_divergence(paths)


def test_combine_reports_collects_peer_reports_and_divergence(tmp_path):
    # Prepare
    states = _peer_states(2)
    param_paths = _write(tmp_path, states)
    peers = [{"peer_id": f"peer{i}", "steps": 10, "final_loss": 2.0 + i} for i in range(2)]
    report_paths = []
    for i, peer in enumerate(peers):
        path = tmp_path / f"peer{i}.json"
        path.write_text(json.dumps(peer))
        report_paths.append(str(path))
    report_paths.append(str(tmp_path / "never-written.json"))  # a peer that died before writing its report

    # Execute
    report = combine_reports("run-x", report_paths, param_paths)

    # Assert
    assert set(report) == {"run_id", "peers", "max_param_divergence"}
    assert report["run_id"] == "run-x"
    assert report["peers"] == peers
    torch.testing.assert_close(report["max_param_divergence"], _reference_divergence(states), rtol=0, atol=0)
    json.dumps(report)  # the swarm writes it as JSON
