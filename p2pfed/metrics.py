"""Prometheus metrics of one peer (`p2pfed peer --metrics-port 9400`): the figures of its progress lines and of
`p2pfed status`, served over HTTP for a Prometheus server or any scraper.

    metrics = PeerMetrics(peer_id="3fa9c1", cloud="aws", run_id="demo")
    metrics.serve(port=9400, host="0.0.0.0")        # GET http://HOST:9400/metrics
    metrics.update(progress)                        # from the Monitor, on every Progress message

Each peer has a registry of its own (not prometheus_client's global one), so several peers can live in one process
(tests). Totals (samples, bytes, rounds) are exported as counters from the peer's own running totals.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

__all__ = ["PeerMetrics"]

_GAUGES = {
    "step": "global step this peer has reached",
    "loss": "training loss of the last step",
    "eval_loss": "last evaluation loss on the held-out split",
    "samples_per_second": "measured training throughput (EMA)",
    "group_size": "members of the last averaging round",
    "epsilon": "differential privacy spent so far, at privacy.delta (absent without privacy.dp)",
    "waiting_seconds": "time spent waiting for other members to arrive at rounds",
}
_COUNTERS = {
    "samples": "training samples computed",
    "rounds_ok": "averaging rounds committed",
    "rounds_failed": "averaging rounds that failed (the update was not applied)",
    "bytes_sent": "bytes this peer sent to other peers while averaging",
    "bytes_received": "bytes this peer received from other peers while averaging",
}


class PeerMetrics:
    def __init__(self, *, peer_id: str, cloud: str, run_id: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"peer": peer_id, "cloud": cloud, "run": run_id}
        self._gauges = {
            name: Gauge(f"p2pfed_{name}", doc, list(labels), registry=self.registry).labels(**labels)
            for name, doc in _GAUGES.items()
        }
        self._counters = {
            name: Counter(f"p2pfed_{name}", doc, list(labels), registry=self.registry).labels(**labels)
            for name, doc in _COUNTERS.items()
        }
        self._by_cloud = Counter(
            "p2pfed_bytes_sent_by_cloud", "bytes sent to peers of each remote cloud", [*labels, "remote_cloud"],
            registry=self.registry,
        )  # fmt: skip
        self._labels = labels
        self._totals: dict[str, float] = {}
        self.port: int | None = None

    def serve(self, *, port: int, host: str = "127.0.0.1") -> int:
        """Start the HTTP endpoint in a daemon thread; returns the port (the one chosen when `port` is 0)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(server.server_address[1])
        return self.port

    def update(self, progress: dict[str, Any]) -> None:
        """Set the gauges from one progress message and advance the counters to its running totals."""
        for name, key in (("step", "step"), ("loss", "loss"), ("samples_per_second", "samples_per_s")):
            self._gauges[name].set(float(progress[key]))
        for name in ("eval_loss", "epsilon"):
            if progress.get(name) is not None:
                self._gauges[name].set(float(progress[name]))
        self._gauges["group_size"].set(float(progress["group_size"]))
        self._gauges["waiting_seconds"].set(float(progress.get("waiting_s", 0.0)))
        for name, key in (("samples", "samples_total"), ("rounds_ok", "rounds_ok"), ("rounds_failed", "rounds_failed"),
                          ("bytes_sent", "bytes_sent"), ("bytes_received", "bytes_received")):  # fmt: skip
            self._advance(self._counters[name], name, float(progress.get(key, 0)))
        for cloud, sent in (progress.get("bytes_by_cloud") or {}).items():
            self._advance(self._by_cloud.labels(**self._labels, remote_cloud=cloud), f"cloud:{cloud}", float(sent))

    def _advance(self, counter: Any, key: str, total: float) -> None:
        delta = total - self._totals.get(key, 0.0)
        if delta > 0:  # a total never goes down; a restarted peer starts new counters, as Prometheus expects
            counter.inc(delta)
            self._totals[key] = total
