"""The ServerApp's settings: the run config's server keys, checked (type and range), and the
policies a reply's manifest must show (`required-policy`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .verify import RequiredPolicies


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
    # The user's own PyTorch model (`package.module:function`, torch_task.py); "" for none.
    torch_model: str = ""
    # A malicious server, for testing the nodes' vetting and for the validation study: in round
    # `adversary-round` it sends the parameters of the TorchScript file `adversary-model` (same
    # architecture) instead of the global model. Off unless both are set.
    adversary_model: str = ""
    adversary_round: int = 0

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
            required=RequiredPolicies.parse(required_policies(cfg), str(cfg.get("model-path", "")), str(cfg.get("torch-model", ""))),
            torch_model=str(cfg.get("torch-model", "")),
            model_path=str(cfg.get("model-path", "")),
            loss=str(cfg.get("loss", "cross-entropy")),
            adversary_model=str(cfg.get("adversary-model", "")),
            adversary_round=int(cfg.get("adversary-round", 0)),
        )


def required_policies(cfg) -> str:
    """What `required-policy` asks for, failing closed: unset, the run's `default-policy` (a
    node that enforces another policy is rejected); `any` accepts every policy (a manifest that
    matches the arrays is still required)."""
    value = str(cfg.get("required-policy", "")).strip()
    if not value:
        return str(cfg.get("default-policy", "default.toml"))
    return "" if value.lower() == "any" else value
