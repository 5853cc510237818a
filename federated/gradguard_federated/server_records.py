"""The server's record of a run: the files under `out-dir` (Recorder, with exactly what
arrived from each client) and its Prometheus metrics (ServerMetrics: round-level series,
rejections by reason, and each node's series)."""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message
from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest, start_http_server

from .node_metrics import NodeSeries
from .server_rounds import RoundState
from .task import GUARD_KEY, to_numpy
from .verify import REJECT_REASONS

LOG = logging.getLogger("flwr")


class Recorder:
    """The run's files under `out-dir` (nothing when it is not set)."""

    def __init__(self, out_dir: Path | None) -> None:
        self.out = out_dir
        if self.out:
            (self.out / "received").mkdir(parents=True, exist_ok=True)

    def append(self, name: str, record: dict[str, Any]) -> None:
        if self.out:
            with open(self.out / name, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")

    def event(self, event: str, **fields: Any) -> None:
        self.append("events.jsonl", {"event": event, "time": time.time(), **fields})

    def text(self, name: str, line: str) -> None:
        if self.out:
            with open(self.out / name, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    def arrays(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        if self.out:
            np.savez(self.out / name, **arrays)

    def write(self, name: str, data: bytes) -> None:
        if self.out:
            tmp = self.out / f"{name}.tmp"
            tmp.write_bytes(data)
            tmp.rename(self.out / name)

    def received(self, server_round: int, msg: Message) -> None:
        """Records exactly what arrived from a client (record names, array names and bytes)."""
        node = msg.metadata.src_node_id
        entry: dict[str, Any] = {"round": server_round, "node_id": node, "has_error": msg.has_error()}
        if msg.has_error():
            entry["error"] = msg.error.reason
        else:
            content = msg.content
            entry["array_records"] = {k: sorted(v.keys()) for k, v in content.array_records.items()}
            entry["array_bytes"] = sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
            entry["metric_records"] = {k: dict(v) for k, v in content.metric_records.items()}
            entry["config_records"] = {k: sorted(v.keys()) for k, v in content.config_records.items()}
            guard = content.config_records.get(GUARD_KEY)
            entry["status"] = guard.get("status") if guard is not None else None
            for key, rec in content.array_records.items():
                self.arrays(f"received/round{server_round}-node{node}-{key}.npz", to_numpy(rec))
        self.append("received.jsonl", entry)


class ServerMetrics:
    """The server's Prometheus metrics (its own registry), served while the run lasts."""

    def __init__(self, port: int) -> None:
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.round = Gauge("gradguard_fl_round", "Last completed federated round.", registry=r)
        self.accuracy = Gauge("gradguard_fl_global_accuracy", "Global model accuracy on the held-out digits.", registry=r)
        self.rounds = Counter("gradguard_fl_rounds", "Rounds by outcome (aggregated, or skipped: cohort floor not met).", ["outcome"], registry=r)
        self.updates = Gauge("gradguard_fl_round_updates", "Client replies of the last round by status.", ["status"], registry=r)
        self.releases = Counter("gradguard_fl_client_releases", "Client replies by partition and status.", ["client", "status"], registry=r)
        self.actions = Counter("gradguard_fl_client_layer_actions", "Defence actions applied to released updates, per client and layer.", ["client", "layer", "action"], registry=r)
        self.leakage = Gauge("gradguard_fl_client_layer_leakage", "Leakage a client reported for a layer (its last release).", ["client", "layer", "metric"], registry=r)
        self.contributors = Gauge("gradguard_fl_layer_contributors", "Compliant clients whose release of the layer was aggregated in the last round.", ["layer"], registry=r)
        self.rejected = Counter("gradguard_server_rejected", "Train replies rejected before aggregation, by reason (see verify.py).", ["reason"], registry=r)
        self.refusals = Counter("gradguard_fl_refusals", "Global models a node refused before training on them, by reason: isolation (an M6 rule), attack (the analytic attacks above vetting.max_recovered_fraction), non_finite (parameters), absent (M6 could not be measured).", ["reason"], registry=r)
        for outcome in ("aggregated", "skipped"):
            self.rounds.labels(outcome)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        # Each node's series from its verified replies, under the exporter's names.
        self.nodes = NodeSeries(r)
        self.server = None
        if port:
            try:
                self.server, _ = start_http_server(port, addr="127.0.0.1", registry=r)
            except OSError as error:
                raise OSError(error.errno, f"run config metrics-port {port}: cannot serve the server's metrics on 127.0.0.1:{port} ({error.strerror}); another process holds it, or set another port (0: none)") from error
            LOG.info("gradguard: server metrics on http://127.0.0.1:%d/metrics", port)

    def export_round(self, server_round: int, state: RoundState) -> None:
        """The closed round's series: its outcome, each reply's status, the defence actions
        applied to released updates, the leakage reported, the contributors per layer."""
        self.round.set(server_round)
        self.rounds.labels("aggregated" if state.aggregated else "skipped").inc()
        counts: dict[str, int] = defaultdict(int)
        for r in state.rows:
            counts[r.status] += 1
            if r.status == "refused":
                self.refusals.labels(refusal_reason(r.reason or "")).inc()
            self.releases.labels(r.partition, r.status).inc()
            self.nodes.observe(r)
            # Only what was applied to a release counts (a blocked release applied nothing).
            for layer, acts in (r.actions or {}).items() if r.status == "released" else ():
                for a in acts:
                    self.actions.labels(r.partition, layer, a.split("(")[0]).inc()
            for layer, values in (r.leakage or {}).items():
                for metric, v in values.items():
                    self.leakage.labels(r.partition, layer, metric).set(v)
        for status in ("released", "blocked", "refused", "error", "rejected", "no reply"):
            self.updates.labels(status.replace(" ", "_")).set(counts.get(status, 0))
        for layer, parts in state.contributors.items():
            self.contributors.labels(layer).set(len(parts))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def refusal_reason(reason: str) -> str:
    """The class of a node's refusal, from the guard's words (Vetting::refusal): a bounded label."""
    if "non-finite" in reason:
        return "non_finite"
    if "isolates" in reason:
        return "isolation"
    if "attack recovers" in reason:
        return "attack"
    return "absent"
