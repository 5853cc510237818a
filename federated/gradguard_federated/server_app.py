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
- The model is the run's `torch-model` (the user's PyTorch module, torch_task.py) or
  `model-path` (a TorchScript file; the server starts from its
  parameters) or the digits CNN.
- What clients release is the round's mean gradient (see gradguard_fl), so the new global model
  is `w - lr * local_steps * mean(update)`.

Per round it logs a table (held-out accuracy, per-client actions, blocks) and the leakage the
clients reported, exports them to Prometheus (prometheus_client, `metrics-port`), and, with
`out-dir`, writes: events.jsonl (round start/end), rounds.jsonl (everything per round),
rounds.txt (the table), leakage.txt, received.jsonl plus received/*.npz (exactly what arrived from each
client), global-round<N>.npz (the global model after each round) and metrics.prom.

This module wires the steps into Flower's FedAvg; the steps live by job: server_settings (the
run config, checked), verify (a reply's check), aggregate (the weighted mean, pure),
server_rounds (the round's state and its lines) and server_records (files and Prometheus).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.exit import add_exit_handler

import gradguard_fl

from .aggregate import VerifiedUpdate, apply_step, weighted_mean
from .server_records import Recorder, ServerMetrics
from .server_rounds import RoundRecord, RoundState, leakage_lines, table_lines
from .server_settings import ServerSettings, required_policies
from .task import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, to_numpy, to_record
from .verify import ClientRow, check_reply

LOG = logging.getLogger("flwr")

app = ServerApp()

__all__ = ["GuardedFedAvg", "Recorder", "ServerMetrics", "ServerSettings", "app", "required_policies"]


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
        # The train messages of each round: the grid gives each its id when it sends it, and a
        # reply the SuperLink writes for a node (node unavailable) names only that id.
        self.sent_messages: dict[int, list[Message]] = {}
        self.partitions: dict[int, str] = {}
        self.rows: dict[int, RoundState] = {}
        self.history: list[RoundRecord] = []

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
        if self.settings.adversary_model and server_round == self.settings.adversary_round:
            # The malicious server of the tests and the validation study: other parameters than
            # the global model's, chosen to give the nodes' samples back.
            arrays = to_record(gradguard_fl.initial_parameters(model_path=self.settings.adversary_model))
            LOG.warning("gradguard: ADVERSARY: round %d sends the parameters of %s", server_round, self.settings.adversary_model)
            self.recorder.event("adversary", round=server_round, model=self.settings.adversary_model)
        record = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
        messages = list(self._construct_messages(record, nodes, MessageType.TRAIN))
        self.sent_messages[server_round] = messages
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.settings.fraction_evaluate == 0.0:
            return []
        nodes = sorted(grid.get_node_ids())
        count = max(1, int(round(len(nodes) * self.settings.fraction_evaluate)))
        config["server-round"] = server_round
        record = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
        return self._construct_messages(record, nodes[:count], MessageType.EVALUATE)

    # -- aggregation ------------------------------------------------------------------------

    def last_round_started(self) -> int:
        """The last round whose train messages were made (0: none)."""
        return max(self.sent, default=0)

    def _node_of(self, server_round: int, msg: Message) -> int:
        """The node a reply is about: its sender, or, for an error the SuperLink wrote itself
        (sender the SuperLink: "node unavailable"), the node the message it answers went to."""
        node = msg.metadata.src_node_id
        if node in self.sent.get(server_round, []):
            return node
        answered = msg.metadata.reply_to_message_id
        for sent in self.sent_messages.get(server_round, []):
            if answered and sent.metadata.message_id == answered:
                return sent.metadata.dst_node_id
        return node

    def _check(self, msg: Message, node: int) -> tuple[ClientRow, dict[str, np.ndarray] | None]:
        """A reply's row, and its update when it passed verification (verify.check_reply)."""
        row, update = check_reply(msg, self.partitions.get(node, f"node {node}"), self.global_params, self.settings.required, node)
        if row.partition.startswith("p"):
            self.partitions[node] = row.partition
        if row.status == "rejected":
            self.metrics.rejected.labels(row.reject).inc()
            LOG.warning("gradguard: rejected the reply of %s (node %d): %s: %s", row.partition, node, row.reject, row.reason)
        if row.status == "refused":
            LOG.warning("gradguard: %s (node %d) %s", row.partition, node, row.reason)
        if row.status == "error":
            LOG.warning("gradguard: %s (node %d) replied with an error: %s", row.partition, node, row.reason)
        return row, update

    def _collect(self, server_round: int, replies: Iterable[Message]) -> tuple[list[ClientRow], list[VerifiedUpdate]]:
        """Every reply recorded and checked: a row per reply and per node that sent none, and
        the verified updates."""
        rows: list[ClientRow] = []
        compliant: list[VerifiedUpdate] = []
        answered = set()
        for msg in replies:
            node = self._node_of(server_round, msg)
            if node in answered:
                # One row per node: a second reply about it (a late error after a reply) is logged.
                LOG.warning("gradguard: round %d: a second reply about node %d ignored: %s", server_round, node,
                            msg.error.reason if msg.has_error() else "content")
                continue
            answered.add(node)
            try:
                self.recorder.received(server_round, msg)
                row, update = self._check(msg, node)
            except Exception as error:  # noqa: BLE001 - a malformed reply is rejected, never fatal
                row, update = ClientRow(node, self.partitions.get(node, f"node {node}"), "rejected",
                                        reason=f"malformed reply: {type(error).__name__}: {error}"), None
            rows.append(row)
            if update is not None:
                compliant.append(VerifiedUpdate(row.partition, row.num_examples, update))
        for node in self.sent.get(server_round, []):
            if node not in answered:
                row = ClientRow(node, self.partitions.get(node, f"node {node}"), "no reply",
                                reason=f"no reply within {self.settings.round_timeout:g} s (node gone or slow)")
                LOG.warning("gradguard: round %d: %s (node %d): %s", server_round, row.partition, node, row.reason)
                rows.append(row)
        return self._one_row_per_partition(server_round, rows), compliant

    @staticmethod
    def _one_row_per_partition(server_round: int, rows: list[ClientRow]) -> list[ClientRow]:
        """A SuperNode started again rejoins under a new node id while the SuperLink may still list
        the old one: the partition (from the node's config) is the node. A silent or failed old id
        is dropped when the same partition answered under another id."""
        answered = {r.partition for r in rows if r.status not in ("no reply", "error")}
        kept = []
        for r in rows:
            if r.status in ("no reply", "error") and r.partition.startswith("p") and r.partition in answered:
                LOG.warning("gradguard: round %d: %s answered under a new node id; its old id %d (%s) is not counted",
                            server_round, r.partition, r.node_id, r.status)
                continue
            kept.append(r)
        return kept

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rows, compliant = self._collect(server_round, list(replies))
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
            means = weighted_mean(self.global_params, compliant, self.settings.min_layer_cohort)
            new_params = apply_step(self.global_params, means, self.settings.lr * self.settings.local_steps)
            contributors = {layer: mean.contributors for layer, mean in means.items()}
        self.rows[server_round] = RoundState(
            rows=rows, aggregated=new_params is not None, reason=reason, contributors=contributors, compliant=len(compliant)
        )
        for layer, parts in contributors.items():
            LOG.info("gradguard: round %d: %s aggregated from %s", server_round, layer, ", ".join(parts) or "no client (kept)")
        for row in blocked:
            LOG.warning("gradguard: round %d: %s blocked: %s", server_round, row.partition, row.reason)
        agg_metrics = MetricRecord(
            {
                "compliant-updates": len(compliant),
                "blocked-updates": len(blocked),
                "aggregated": int(new_params is not None),
                "num-examples": sum(u.num_examples for u in compliant),
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
            self.rows[server_round] = self.rows[server_round].evaluated(accuracies, weighted / total if total else None)
        return MetricRecord({"accuracy": weighted / total}) if total else None

    # -- the round's record -----------------------------------------------------------------

    def evaluate_global(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Central evaluation on the held-out digits (the digits CNN), or, for the run's own
        model (`model-path`: the server holds no data), the clients' accuracy on their
        held-out shares weighted by their size; closes the round's record."""
        params = to_numpy(arrays)
        if self.settings.model_path or self.settings.torch_model:
            scores = {"accuracy": None, "loss": None}
        else:
            scores = gradguard_fl.evaluate(params)
        if server_round == 0:
            accuracy = scores["accuracy"]
            record = RoundRecord(0, accuracy, scores["loss"])
            self.history.append(record)
            self.recorder.append("rounds.jsonl", record.json())
            self._lines("rounds.txt", table_lines(0, accuracy, None, self.settings.min_cohort))
            if accuracy is not None:
                self.metrics.accuracy.set(accuracy)
            return MetricRecord({"accuracy": accuracy, "loss": scores["loss"]} if accuracy is not None else {})
        self.recorder.arrays(f"global-round{server_round}.npz", params)
        state = self.rows.get(server_round, RoundState.no_replies())
        accuracy = scores["accuracy"] if scores["accuracy"] is not None else state.federated_accuracy
        if accuracy is not None:
            self.metrics.accuracy.set(accuracy)
        record = RoundRecord(server_round, accuracy, scores["loss"], state, self.sent.get(server_round, []), self.settings.min_cohort)
        self.history.append(record)
        self.recorder.append("rounds.jsonl", record.json())
        self.metrics.export_round(server_round, state)
        self.recorder.write("metrics.prom", self.metrics.render())
        self._lines("rounds.txt", table_lines(server_round, accuracy, state, self.settings.min_cohort))
        self._lines("leakage.txt", leakage_lines(server_round, state.rows))
        self.recorder.event("round-end", round=server_round, aggregated=state.aggregated, reason=state.reason)
        return MetricRecord({"accuracy": accuracy} if accuracy is not None else {})

    def _lines(self, name: str, lines: list[str]) -> None:
        """Logs the lines and appends them to the run's file `name`."""
        for line in lines:
            LOG.info("gradguard: %s", line)
            self.recorder.text(name, line)


def initial_parameters(settings: ServerSettings) -> dict[str, np.ndarray]:
    """The run's starting point: the user's PyTorch model (`torch-model`, seeded), the
    TorchScript file's parameters (`model-path`) or the seeded digits CNN."""
    if settings.torch_model:
        from .torch_task import load_model, parameters

        return parameters(load_model(settings.torch_model, settings.seed))
    return gradguard_fl.initial_parameters(settings.seed, model_path=settings.model_path or None)


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)
    recorder = Recorder(Path(str(run_config["out-dir"])) if run_config.get("out-dir") else None)
    try:
        settings = ServerSettings.from_run_config(run_config)
        metrics = ServerMetrics(settings.metrics_port)
    except (ValueError, OSError) as error:
        # A run that cannot start says why, in its events and the ServerApp's log.
        recorder.event("run-failed", error=str(error), round=0)
        LOG.error("gradguard: the run cannot start: %s", error)
        raise
    strategy = GuardedFedAvg(settings, recorder, metrics)
    recorded = {"end": False}  # run-end or run-failed written: once, whichever path gets there

    def failed(error: str) -> None:
        if not recorded["end"]:
            recorded["end"] = True
            recorder.event("run-failed", error=error, round=strategy.last_round_started())

    def on_exit() -> None:
        # Flower's graceful exit (SIGTERM, SIGINT: the SuperLink or an operator stopping the
        # ServerApp) ends the run as failed, on the record, instead of a silent exit.
        failed("the ServerApp was stopped (signal) before the run's last round ended")

    add_exit_handler(on_exit)
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
            initial_arrays=to_record(initial_parameters(settings)),
            num_rounds=settings.num_rounds,
            timeout=settings.round_timeout,
            train_config=train_config,
            evaluate_config=ConfigRecord(),
            evaluate_fn=strategy.evaluate_global,
        )
        recorded["end"] = True
        recorder.event("run-end", rounds=settings.num_rounds)
    except BaseException as error:  # noqa: BLE001 - SystemExit too: recorded, then re-raised
        failed(f"{type(error).__name__}: {error}")
        LOG.error("gradguard: the run failed: %s: %s", type(error).__name__, error)
        raise
    finally:
        metrics.close()
