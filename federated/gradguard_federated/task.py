"""Helpers shared by the ClientApp and the ServerApp: node settings, policies, array records,
and the client's own metrics server.

Everything that decides what leaves a client (training, leakage metrics, policy, defences) is
in the Rust extension `gradguard_fl`; this module only moves arrays, files and processes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

import gradguard_fl

LOG = logging.getLogger("flwr")

POLICY_DIR = Path(__file__).resolve().parent / "policies"

# Reply layout (the server reads the same keys).
ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
GUARD_KEY = "gradguard"
CONFIG_KEY = "config"

# Keys a node's config (`flower-supernode --node-config`) may set.
NODE_CONFIG_KEYS = (
    "partition-id",
    "num-partitions",
    "label-skew",
    "data-seed",
    "policy",
    "metrics-port",
    "spool-dir",
)


class NodeConfigError(ValueError):
    """The SuperNode's node config has a bad value."""


@dataclass(frozen=True)
class NodeSettings:
    partition_id: int
    num_partitions: int
    label_skew: float
    data_seed: int
    policy_path: str
    metrics_port: int
    spool_dir: Path

    def partition(self) -> gradguard_fl.Partition:
        return gradguard_fl.Partition(
            self.partition_id, self.num_partitions, label_skew=self.label_skew, seed=self.data_seed
        )


def resolve_policy(value: str) -> str:
    """A policy shipped with the app (a bare file name, in policies/) or a path on the node."""
    if not isinstance(value, str) or not value.strip():
        raise NodeConfigError(f"policy must be a file name or a path, got {value!r}")
    path = Path(value).expanduser()
    if len(path.parts) == 1 and not path.is_absolute():
        path = POLICY_DIR / path
    if not path.is_file():
        shipped = sorted(p.name for p in POLICY_DIR.glob("*.toml"))
        raise NodeConfigError(f"policy {value!r}: no such file ({path}); shipped policies: {shipped}")
    return str(path)


def _int(config: dict[str, Any], key: str, default: int | None, low: int, high: int) -> int:
    value = config.get(key, default)
    if value is None:
        raise NodeConfigError(f"node config {key} is required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise NodeConfigError(f"node config {key} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise NodeConfigError(f"node config {key} must be in {low}..{high}, got {value}")
    return value


def node_settings(node_config: dict[str, Any], run_config: dict[str, Any], node_id: int) -> NodeSettings:
    """Reads and checks the node's settings (its partition, policy and metrics port)."""
    config = dict(node_config)
    unknown = sorted(set(config) - set(NODE_CONFIG_KEYS))
    if unknown:
        LOG.warning("gradguard: ignoring unknown node config keys %s (known: %s)", unknown, list(NODE_CONFIG_KEYS))
    num_partitions = _int(config, "num-partitions", None, 1, 1_000_000)
    partition_id = _int(config, "partition-id", None, 0, num_partitions - 1)
    skew = config.get("label-skew", 0.8)
    if isinstance(skew, bool) or not isinstance(skew, (int, float)) or not 0.0 <= float(skew) <= 1.0:
        raise NodeConfigError(f"node config label-skew must be a number in [0, 1], got {skew!r}")
    data_seed = _int(config, "data-seed", 0, 0, 2**62)
    policy = config.get("policy", run_config.get("default-policy", "default.toml"))
    metrics_port = _int(config, "metrics-port", 0, 0, 65535)
    spool = config.get("spool-dir") or str(Path(tempfile.gettempdir()) / f"gradguard-fl-node-{node_id}")
    if not isinstance(spool, str):
        raise NodeConfigError(f"node config spool-dir must be a path, got {spool!r}")
    return NodeSettings(
        partition_id=partition_id,
        num_partitions=num_partitions,
        label_skew=float(skew),
        data_seed=data_seed,
        policy_path=resolve_policy(policy),
        metrics_port=metrics_port,
        spool_dir=Path(spool),
    )


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def to_record(params: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in params.items()})


# ---------------------------------------------------------------------------------------------
# The client's own /metrics: a process per node (Flower starts a new ClientApp process for
# every message), fed through a spool folder of report files.

SIDECAR_PID_FILE = "metrics-server.pid"
SIDECAR_READY_FILE = "metrics-server.port"


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def ensure_metrics_server(settings: NodeSettings) -> None:
    """Starts the node's metrics server (gradguard's exporter) unless it already serves."""
    if settings.metrics_port == 0 or _listening(settings.metrics_port):
        return
    spool = settings.spool_dir
    spool.mkdir(parents=True, exist_ok=True)
    for stale in (SIDECAR_READY_FILE, "stop"):
        (spool / stale).unlink(missing_ok=True)
    # It outlives this ClientApp process and stops with the node's SuperExec (this process's
    # parent), with a `stop` file in the spool, or on SIGTERM.
    code = (
        "import sys, gradguard_fl; "
        "gradguard_fl.serve_metrics(int(sys.argv[1]), sys.argv[2], watch_pid=int(sys.argv[3]), "
        "ready_file=sys.argv[4])"
    )
    with open(spool / "metrics-server.log", "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                code,
                str(settings.metrics_port),
                str(spool),
                str(os.getppid()),
                str(spool / SIDECAR_READY_FILE),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    (spool / SIDECAR_PID_FILE).write_text(str(proc.pid))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if (spool / SIDECAR_READY_FILE).exists():
            LOG.info("gradguard: node metrics on http://127.0.0.1:%d/metrics (pid %d)", settings.metrics_port, proc.pid)
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    LOG.warning(
        "gradguard: the node metrics server did not start on port %d (see %s)",
        settings.metrics_port,
        spool / "metrics-server.log",
    )


def spool_report(settings: NodeSettings, report_json: str, server_round: int) -> None:
    """Hands one release's report to the node's metrics server (atomically: write, rename)."""
    if settings.metrics_port == 0 or not report_json or report_json == "null":
        return
    settings.spool_dir.mkdir(parents=True, exist_ok=True)
    name = f"{time.time_ns():020d}-round{server_round}"
    tmp = settings.spool_dir / f"{name}.tmp"
    tmp.write_text(report_json)
    tmp.rename(settings.spool_dir / f"{name}.json")


def summarise_leakage(report_json: str) -> dict[str, dict[str, float]]:
    """Per layer: the leakage metrics of a (shared) report that were measured."""
    if not report_json:
        return {}
    out: dict[str, dict[str, float]] = {}
    for layer in json.loads(report_json).get("layers", []):
        values: dict[str, float] = {}
        sens = layer.get("sensitivity", {})
        if sens.get("status") == "measured":
            for key in ("sensitivity", "sensitivity_rms", "relative_sensitivity"):
                if sens.get(key) is not None:
                    values[key] = float(sens[key])
        sub = layer.get("subspace", {})
        if sub.get("status") == "measured":
            values["subspace_separation"] = float(sub["subspace_separation"])
        out[layer["name"]] = values
    return out
