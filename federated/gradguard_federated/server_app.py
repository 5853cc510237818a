"""The ServerApp: a FedAvg that reads the clients' release manifests.

- Each parameter is averaged (weighted by num-examples) over the compliant clients that released
  its layer; a layer that fewer than `min-layer-cohort` clients released (none, by default)
  keeps its previous global value.
- A round updates the global model only when at least `min-cohort` compliant updates arrived
  (the server side of strong aggregation); otherwise the global model stays and the reason is
  logged.
- Compliant: a reply that passed verify.check_reply (a manifest of a `required-policy` that
  releases exactly the arrays present, with the model's shapes and finite values). Blocked
  replies, error replies, missing replies and rejected ones (counted by reason in
  `gradguard_server_rejected_total`) are never aggregated.
- The model is the run's `model-path` (a TorchScript file; the server starts from its
  parameters) or the digits CNN.
- What clients release is the round's mean gradient (see gradguard_fl), so the new global model
  is `w - lr * local_steps * mean(update)`.

Per round it logs a table (held-out accuracy, per-client actions, blocks) and the leakage the
clients reported, exports them to Prometheus (prometheus_client, `metrics-port`), and, with
`out-dir`, writes: events.jsonl (round start/end), rounds.jsonl (everything per round),
rounds.txt (the table), leakage.txt, received.jsonl plus received/*.npz (exactly what arrived from each
client), global-round<N>.npz (the global model after each round) and metrics.prom.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

import gradguard_fl

from .aggregate import VerifiedUpdate, apply_step, weighted_mean
from .task import ARRAYS_KEY, CONFIG_KEY, GUARD_KEY, METRICS_KEY, to_numpy, to_record
from .server_records import Recorder, ServerMetrics
from .verify import ClientRow, RequiredPolicies, check_reply

LOG = logging.getLogger("flwr")

app = ServerApp()


@dataclass(frozen=True)
class ServerSettings:
    num_rounds: int
    local_steps: int
    lr: float
    batch_size: int
    seed: int
    min_cohort: int
    min_layer_cohort: int
    min_nodes: int
    connect_timeout: float
    round_timeout: float
    fraction_evaluate: float
    metrics_port: int
    out_dir: Path | None
    # What a reply's manifest must show (verify.py); the model every node trains.
    required: RequiredPolicies = RequiredPolicies()
    model_path: str = ""
    loss: str = "cross-entropy"

    @staticmethod
    def from_run_config(cfg: dict[str, Any]) -> "ServerSettings":
        def num(key: str, kind: type, low: float, high: float) -> Any:
            value = cfg[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
                raise ValueError(f"run config {key} must be {kind.__name__}, got {value!r}")
            if not (low <= value <= high) or (isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(f"run config {key} must be in [{low}, {high}], got {value}")
            return kind(value)

        out = str(cfg.get("out-dir", ""))
        return ServerSettings(
            num_rounds=num("num-server-rounds", int, 1, 10_000),
            local_steps=num("local-steps", int, 1, 100_000),
            lr=num("lr", float, 1e-9, 100.0),
            batch_size=num("batch-size", int, 1, 4096),
            seed=num("seed", int, 0, 2**62),
            min_cohort=num("min-cohort", int, 1, 100_000),
            min_layer_cohort=num("min-layer-cohort", int, 1, 100_000),
            min_nodes=num("min-nodes", int, 1, 100_000),
            connect_timeout=num("connect-timeout", float, 0.0, 86_400.0),
            round_timeout=num("round-timeout", float, 1.0, 86_400.0),
            fraction_evaluate=num("fraction-evaluate", float, 0.0, 1.0),
            metrics_port=num("metrics-port", int, 0, 65535),
            out_dir=Path(out) if out else None,
            required=RequiredPolicies.parse(required_policies(cfg), str(cfg.get("model-path", ""))),
            model_path=str(cfg.get("model-path", "")),
            loss=str(cfg.get("loss", "cross-entropy")),
        )


def required_policies(cfg) -> str:
    """What `required-policy` asks for, failing closed: unset, the run's `default-policy` (a
    node that enforces another policy is rejected); `any` accepts every policy (a manifest that
    matches the arrays is still required)."""
    value = str(cfg.get("required-policy", "")).strip()
    if not value:
        return str(cfg.get("default-policy", "default.toml"))
    return "" if value.lower() == "any" else value


class GuardedFedAvg(FedAvg):
    """FedAvg over protected updates: per-layer averages over the clients that released each
    layer, and a cohort floor on compliant updates."""

    def __init__(self, settings: ServerSettings, recorder: Recorder, metrics: ServerMetrics) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=settings.fraction_evaluate,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=1,
        )
        self.settings = settings
        self.recorder = recorder
        self.metrics = metrics
        self.global_params: dict[str, np.ndarray] = {}
        self.sent: dict[int, list[int]] = {}
        self.partitions: dict[int, str] = {}
        self.rows: dict[int, dict[str, Any]] = {}
        self.history: list[dict[str, Any]] = []

    # -- sampling ---------------------------------------------------------------------------

    def _nodes(self, grid: Grid, server_round: int) -> list[int]:
        nodes = sorted(grid.get_node_ids())
        if server_round == 1:
            deadline = time.monotonic() + self.settings.connect_timeout
            while len(nodes) < self.settings.min_nodes and time.monotonic() < deadline:
                LOG.info("gradguard: %d of %d SuperNodes connected, waiting", len(nodes), self.settings.min_nodes)
                time.sleep(1.0)
                nodes = sorted(grid.get_node_ids())
            if len(nodes) < self.settings.min_nodes:
                LOG.warning("gradguard: only %d of %d SuperNodes after %.0f s; going on", len(nodes), self.settings.min_nodes, self.settings.connect_timeout)
        return nodes

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.global_params = to_numpy(arrays)
        if server_round == 1:
            self.recorder.arrays("global-round0.npz", self.global_params)
        nodes = self._nodes(grid, server_round)
        self.sent[server_round] = nodes
        self.recorder.event("round-start", round=server_round, nodes=nodes)
        LOG.info("gradguard: round %d: sending to %d nodes", server_round, len(nodes))
        config["server-round"] = server_round
        record = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
        return self._construct_messages(record, nodes, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.settings.fraction_evaluate == 0.0:
            return []
        nodes = sorted(grid.get_node_ids())
        count = max(1, int(round(len(nodes) * self.settings.fraction_evaluate)))
        config["server-round"] = server_round
        record = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
        return self._construct_messages(record, nodes[:count], MessageType.EVALUATE)

    # -- aggregation ------------------------------------------------------------------------

    def _capture(self, server_round: int, msg: Message) -> None:
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
                self.recorder.arrays(f"received/round{server_round}-node{node}-{key}.npz", to_numpy(rec))
        self.recorder.append("received.jsonl", entry)

    def _check(self, msg: Message) -> tuple[ClientRow, dict[str, np.ndarray] | None]:
        """A reply's row, and its update when it passed verification (verify.check_reply)."""
        node = msg.metadata.src_node_id
        row, update = check_reply(msg, self.partitions.get(node, f"node {node}"), self.global_params, self.settings.required)
        if row.partition.startswith("p"):
            self.partitions[node] = row.partition
        if row.status == "rejected":
            self.metrics.rejected.labels(row.reject).inc()
            LOG.warning("gradguard: rejected the reply of %s (node %d): %s: %s", row.partition, node, row.reject, row.reason)
        return row, update

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        rows: list[ClientRow] = []
        compliant: list[tuple[ClientRow, dict[str, np.ndarray]]] = []
        answered = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            answered.add(node)
            try:
                self._capture(server_round, msg)
                row, update = self._check(msg)
            except Exception as error:  # noqa: BLE001 - a malformed reply is rejected, never fatal
                row, update = ClientRow(node, self.partitions.get(node, f"node {node}"), "rejected",
                                        reason=f"malformed reply: {type(error).__name__}: {error}"), None
            rows.append(row)
            if update is not None:
                compliant.append((row, update))
        for node in self.sent.get(server_round, []):
            if node not in answered:
                rows.append(
                    ClientRow(node, self.partitions.get(node, f"node {node}"), "no reply",
                              reason=f"no reply within {self.settings.round_timeout:g} s (node gone or slow)")
                )
        blocked = [r for r in rows if r.status == "blocked"]
        contributors: dict[str, list[str]] = {}
        new_params: dict[str, np.ndarray] | None = None
        reason = None
        if len(compliant) < self.settings.min_cohort:
            reason = (
                f"cohort floor not met: {len(compliant)} compliant update(s) < min-cohort "
                f"{self.settings.min_cohort}; the global model keeps its round-{server_round - 1} value"
            )
            LOG.warning("gradguard: round %d: %s", server_round, reason)
        else:
            updates = [VerifiedUpdate(row.partition, row.num_examples, update) for row, update in compliant]
            means = weighted_mean(self.global_params, updates, self.settings.min_layer_cohort)
            new_params = apply_step(self.global_params, means, self.settings.lr * self.settings.local_steps)
            contributors = {layer: mean.contributors for layer, mean in means.items()}
        self.rows[server_round] = {
            "rows": rows,
            "aggregated": new_params is not None,
            "reason": reason,
            "contributors": contributors,
            "compliant": len(compliant),
        }
        for layer, parts in contributors.items():
            LOG.info("gradguard: round %d: %s aggregated from %s", server_round, layer, ", ".join(parts) or "no client (kept)")
        for row in blocked:
            LOG.warning("gradguard: round %d: %s blocked: %s", server_round, row.partition, row.reason)
        agg_metrics = MetricRecord(
            {
                "compliant-updates": len(compliant),
                "blocked-updates": len(blocked),
                "aggregated": int(new_params is not None),
                "num-examples": sum(r.num_examples for r, _ in compliant),
            }
        )
        if new_params is None:
            return None, agg_metrics
        self.global_params = new_params
        return to_record(new_params), agg_metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        accuracies: dict[str, float] = {}
        total, weighted = 0, 0.0
        for msg in replies:
            if msg.has_error() or METRICS_KEY not in msg.content.metric_records:
                continue
            m = msg.content.metric_records[METRICS_KEY]
            if "accuracy" not in m:  # mse: loss only
                continue
            accuracies[f"p{m['partition-id']}"] = float(m["accuracy"])
            total += int(m["num-examples"])
            weighted += float(m["accuracy"]) * int(m["num-examples"])
        if server_round in self.rows:
            self.rows[server_round]["client_accuracy"] = accuracies
            self.rows[server_round]["federated_accuracy"] = weighted / total if total else None
        return MetricRecord({"accuracy": weighted / total}) if total else None

    # -- the round's record -----------------------------------------------------------------

    def evaluate_global(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Central evaluation on the held-out digits (the digits CNN), or, for the run's own
        model (`model-path`: the server holds no data), the clients' accuracy on their
        held-out shares weighted by their size; closes the round's record."""
        params = to_numpy(arrays)
        if self.settings.model_path:
            scores = {"accuracy": None, "loss": None}
        else:
            scores = gradguard_fl.evaluate(params)
        if server_round == 0:
            accuracy = scores["accuracy"]
            self.history.append({"round": 0, "accuracy": accuracy})
            self.recorder.append("rounds.jsonl", {"round": 0, "accuracy": accuracy, "loss": scores["loss"]})
            self._table_line(0, accuracy, None)
            if accuracy is not None:
                self.metrics.accuracy.set(accuracy)
            return MetricRecord({"accuracy": accuracy, "loss": scores["loss"]} if accuracy is not None else {})
        self.recorder.arrays(f"global-round{server_round}.npz", params)
        state = self.rows.get(server_round, {"rows": [], "aggregated": False, "reason": "no replies", "contributors": {}, "compliant": 0})
        accuracy = scores["accuracy"] if scores["accuracy"] is not None else state.get("federated_accuracy")
        if accuracy is not None:
            self.metrics.accuracy.set(accuracy)
        rows: list[ClientRow] = state["rows"]
        record = {
            "round": server_round,
            "accuracy": accuracy,
            "loss": scores["loss"],
            "federated_accuracy": state.get("federated_accuracy"),
            "aggregated": state["aggregated"],
            "reason": state["reason"],
            "compliant": state["compliant"],
            "min_cohort": self.settings.min_cohort,
            "contributors": state["contributors"],
            "client_accuracy": state.get("client_accuracy", {}),
            "sent": self.sent.get(server_round, []),
            "clients": [
                {
                    "node_id": r.node_id,
                    "partition": r.partition,
                    "status": r.status,
                    "reason": r.reason,
                    "released": r.released,
                    "withheld": r.withheld,
                    "actions": r.actions,
                    "leakage": r.leakage,
                    "num_examples": r.num_examples,
                    "reject": r.reject,
                    "policy_hash": r.policy_hash,
                    "step": r.step,
                }
                for r in rows
            ],
        }
        self.history.append(record)
        self.recorder.append("rounds.jsonl", record)
        self._export(server_round, state, rows)
        self._table_line(server_round, accuracy, state)
        self._leakage_lines(server_round, rows)
        self.recorder.event("round-end", round=server_round, aggregated=state["aggregated"], reason=state["reason"])
        return MetricRecord({"accuracy": accuracy} if accuracy is not None else {})

    def _export(self, server_round: int, state: dict[str, Any], rows: list[ClientRow]) -> None:
        m = self.metrics
        m.round.set(server_round)
        m.rounds.labels("aggregated" if state["aggregated"] else "skipped").inc()
        counts: dict[str, int] = defaultdict(int)
        for r in rows:
            counts[r.status] += 1
            m.releases.labels(r.partition, r.status).inc()
            m.nodes.observe(r)
            # Only what was applied to a release counts (a blocked release applied nothing).
            for layer, acts in (r.actions or {}).items() if r.status == "released" else ():
                for a in acts:
                    m.actions.labels(r.partition, layer, a.split("(")[0]).inc()
            for layer, values in (r.leakage or {}).items():
                for metric, v in values.items():
                    m.leakage.labels(r.partition, layer, metric).set(v)
        for status in ("released", "blocked", "error", "rejected", "no reply"):
            m.updates.labels(status.replace(" ", "_")).set(counts.get(status, 0))
        for layer, parts in state["contributors"].items():
            m.contributors.labels(layer).set(len(parts))
        self.recorder.write("metrics.prom", m.render())

    def _leakage_lines(self, server_round: int, rows: list[ClientRow]) -> None:
        """What each client reported of its layers' leakage (METRICS.md M1 and M2)."""
        short = {"sensitivity": "S", "sensitivity_rms": "S_rms", "relative_sensitivity": "R", "subspace_separation": "sep"}
        for r in sorted(rows, key=lambda r: r.partition):
            if not r.leakage:
                continue
            layers = "; ".join(
                f"{layer} " + " ".join(f"{short.get(k, k)}={v:.3g}" for k, v in values.items())
                for layer, values in r.leakage.items()
                if values
            )
            line = f"round {server_round} leakage {r.partition} ({r.status}): {layers}"
            LOG.info("gradguard: %s", line)
            self.recorder.text("leakage.txt", line)

    def _table_line(self, server_round: int, accuracy: float | None, state: dict[str, Any] | None) -> None:
        shown = "-" if accuracy is None else f"{accuracy:.3f}"
        if server_round == 0:
            header = f"{'round':>5}  {'accuracy':>8}  {'update':<22}  clients (actions per layer; blocks)"
            LOG.info("gradguard: %s", header)
            self.recorder.text("rounds.txt", header)
            line = f"{0:>5}  {shown:>8}  {'(initial model)':<22}"
        else:
            rows = sorted(state["rows"], key=lambda r: r.partition)
            update = f"aggregated {state['compliant']}/{len(rows)}" if state["aggregated"] else f"SKIPPED {state['compliant']}<{self.settings.min_cohort}"
            clients = " | ".join(f"{r.partition}: {r.summary()}" for r in rows)
            blocks = [r.partition for r in rows if r.status == "blocked"]
            line = f"{server_round:>5}  {shown:>8}  {update:<22}  {clients}; blocks: {', '.join(blocks) if blocks else 'none'}"
            if state["reason"]:
                line += f"; {state['reason']}"
        LOG.info("gradguard: %s", line)
        self.recorder.text("rounds.txt", line)


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = ServerSettings.from_run_config(dict(context.run_config))
    recorder = Recorder(settings.out_dir)
    metrics = ServerMetrics(settings.metrics_port)
    strategy = GuardedFedAvg(settings, recorder, metrics)
    recorder.event("run-start", settings={k: str(v) for k, v in settings.__dict__.items()})
    LOG.info("gradguard: aggregating only manifests of %s", settings.required.describe())
    train_config = ConfigRecord(
        {
            "local-steps": settings.local_steps,
            "lr": settings.lr,
            "batch-size": settings.batch_size,
            "seed": settings.seed,
        }
    )
    try:
        strategy.start(
            grid=grid,
            initial_arrays=to_record(gradguard_fl.initial_parameters(settings.seed, model_path=settings.model_path or None)),
            num_rounds=settings.num_rounds,
            timeout=settings.round_timeout,
            train_config=train_config,
            evaluate_config=ConfigRecord(),
            evaluate_fn=strategy.evaluate_global,
        )
        recorder.event("run-end", rounds=settings.num_rounds)
    except Exception as error:
        recorder.event("run-failed", error=f"{type(error).__name__}: {error}")
        raise
    finally:
        metrics.close()
