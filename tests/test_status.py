"""`p2pfed status` without a swarm: byte rates from successive announcements, and the table's rows by cloud.

.venv/bin/python -m pytest -q tests/test_status.py
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from p2pfed.status import add_rates, status_table


def _runs(*peers: dict[str, Any]) -> list[dict[str, Any]]:
    base = {"device": "cpu", "step": 3, "loss": 2.5, "samples_per_s": 100.0, "ready": True, "finished": False}
    return [{"run_id": "r", "info": {}, "peers": [base | p for p in peers]}]


def test_rates_come_from_two_announcements_and_survive_a_repeated_record() -> None:
    before: dict[str, tuple[float, int, float | None]] = {}

    first = _runs({"peer_id": "a", "cloud": "aws", "announced_at": 10.0, "bytes_sent": 1000})
    add_rates(first, before)
    again = _runs({"peer_id": "a", "cloud": "aws", "announced_at": 10.0, "bytes_sent": 1000})  # not announced anew
    add_rates(again, before)
    later = _runs({"peer_id": "a", "cloud": "aws", "announced_at": 12.0, "bytes_sent": 5000})
    add_rates(later, before)
    same = _runs({"peer_id": "a", "cloud": "aws", "announced_at": 12.0, "bytes_sent": 5000})
    add_rates(same, before)

    assert first[0]["peers"][0]["bytes_per_s"] is None and again[0]["peers"][0]["bytes_per_s"] is None
    assert later[0]["peers"][0]["bytes_per_s"] == 2000.0 and same[0]["peers"][0]["bytes_per_s"] == 2000.0


def test_the_table_groups_peers_by_cloud_and_shows_rates_and_epsilon() -> None:
    runs = _runs(
        {"peer_id": "a", "cloud": "aws", "bytes_per_s": 2.5e6, "epsilon": 1.25},
        {"peer_id": "b", "cloud": "gcp", "bytes_per_s": None, "epsilon": None, "ready": False},
    )
    console = Console(width=200, record=True)
    console.print(status_table(runs))
    text = console.export_text()

    assert "bytes/s" in text and "2.5 MB/s" in text and "1.250" in text and "joining" in text
    assert text.index("aws") < text.index("gcp")
