"""The server's state of a round and its record: what aggregate_train learnt (RoundState, the
clients' accuracy added by aggregate_evaluate), the closed round (RoundRecord: a line of
rounds.jsonl), and the round table's and the leakage report's lines."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .verify import ClientRow


@dataclass(frozen=True)
class RoundState:
    """A round between aggregate_train and evaluate_global: every train reply's row (and one
    per node that did not answer), whether the global model was updated (else why not), the
    partitions averaged into each layer, the number of compliant updates; then the accuracy the
    clients reported on their held-out shares, per client and weighted by their size.

    Read by key too (`state["rows"]`), as the tests written against the earlier dict do."""

    rows: list[ClientRow]
    aggregated: bool
    reason: str | None
    contributors: dict[str, list[str]]
    compliant: int
    client_accuracy: dict[str, float] = field(default_factory=dict)
    federated_accuracy: float | None = None

    @staticmethod
    def no_replies() -> "RoundState":
        """A round that aggregate_train never saw."""
        return RoundState(rows=[], aggregated=False, reason="no replies", contributors={}, compliant=0)

    def evaluated(self, client_accuracy: dict[str, float], federated_accuracy: float | None) -> "RoundState":
        """The same round with the clients' accuracy."""
        return dataclasses.replace(self, client_accuracy=client_accuracy, federated_accuracy=federated_accuracy)

    def __getitem__(self, key: str) -> Any:
        if key not in _ROUND_STATE_FIELDS:
            raise KeyError(key)
        return getattr(self, key)


_ROUND_STATE_FIELDS = frozenset(f.name for f in dataclasses.fields(RoundState))


@dataclass(frozen=True)
class RoundRecord:
    """A closed round: the global model's accuracy and loss (None where the server cannot
    evaluate the run's model), and, after round 0, its state, the nodes it was sent to and the
    cohort floor."""

    round: int
    accuracy: float | None
    loss: float | None
    state: RoundState | None = None
    sent: list[int] = field(default_factory=list)
    min_cohort: int | None = None

    def json(self) -> dict[str, Any]:
        """The round's line of rounds.jsonl."""
        if self.state is None:
            return {"round": self.round, "accuracy": self.accuracy, "loss": self.loss}
        state = self.state
        return {
            "round": self.round,
            "accuracy": self.accuracy,
            "loss": self.loss,
            "federated_accuracy": state.federated_accuracy,
            "aggregated": state.aggregated,
            "reason": state.reason,
            "compliant": state.compliant,
            "min_cohort": self.min_cohort,
            "contributors": state.contributors,
            "client_accuracy": state.client_accuracy,
            "sent": self.sent,
            "clients": [client_record(r) for r in state.rows],
        }


def client_record(r: ClientRow) -> dict[str, Any]:
    """A client's entry in the round's record."""
    return {
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


def table_lines(server_round: int, accuracy: float | None, state: RoundState | None, min_cohort: int) -> list[str]:
    """The round's line of the round table (round 0: the header, then the initial model's)."""
    shown = "-" if accuracy is None else f"{accuracy:.3f}"
    if server_round == 0:
        header = f"{'round':>5}  {'accuracy':>8}  {'update':<22}  clients (actions per layer; blocks)"
        return [header, f"{0:>5}  {shown:>8}  {'(initial model)':<22}"]
    state = state if state is not None else RoundState.no_replies()
    rows = sorted(state.rows, key=lambda r: r.partition)
    update = f"aggregated {state.compliant}/{len(rows)}" if state.aggregated else f"SKIPPED {state.compliant}<{min_cohort}"
    clients = " | ".join(f"{r.partition}: {r.summary()}" for r in rows)
    blocks = [r.partition for r in rows if r.status == "blocked"]
    refusals = [r.partition for r in rows if r.status == "refused"]
    line = f"{server_round:>5}  {shown:>8}  {update:<22}  {clients}; blocks: {', '.join(blocks) if blocks else 'none'}"
    if refusals:
        line += f"; refused the global model: {', '.join(refusals)}"
    if state.reason:
        line += f"; {state.reason}"
    return [line]


def leakage_lines(server_round: int, rows: list[ClientRow]) -> list[str]:
    """What each client reported of its layers' leakage (METRICS.md M1 and M2)."""
    short = {"sensitivity": "S", "sensitivity_rms": "S_rms", "relative_sensitivity": "R", "subspace_separation": "sep"}
    lines = []
    for r in sorted(rows, key=lambda r: r.partition):
        if not r.leakage:
            continue
        layers = "; ".join(
            f"{layer} " + " ".join(f"{short.get(k, k)}={v:.3g}" for k, v in values.items())
            for layer, values in r.leakage.items()
            if values
        )
        lines.append(f"round {server_round} leakage {r.partition} ({r.status}): {layers}")
    return lines
