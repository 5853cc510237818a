"""Helpers shared by the ClientApp and the ServerApp: node settings, policies, array records,
and the client's own metrics server.

Everything that decides what leaves a client (training, leakage metrics, policy, defences) is
in the Rust extension `gradguard_fl`; this module only moves arrays, files and processes.
"""

from __future__ import annotations

import hashlib
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
    "data-dir",
    "test-fraction",
    "audit-log",
)

# Where a node keeps what the guard remembers between rounds (Context.state, a RecordDict that
# the SuperNode keeps for the run and hands to every ClientApp process).
STATE_KEY = "gradguard-guard"


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
    # The node's own data folder (x.npy, y.npy, ...); None: its digits partition.
    data_dir: Path | None = None
    test_fraction: float = 0.2
    audit_log: Path | None = None

    def partition(self) -> gradguard_fl.Partition:
        return gradguard_fl.Partition(
            self.partition_id, self.num_partitions, label_skew=self.label_skew, seed=self.data_seed
        )

    def data(self) -> gradguard_fl.Partition | gradguard_fl.DataDir:
        """The node's samples: its data folder, else its share of the shipped digits."""
        if self.data_dir is None:
            return self.partition()
        return gradguard_fl.DataDir(str(self.data_dir), test_fraction=self.test_fraction, seed=self.data_seed)


def resolve_data_dir(value: str, partition_id: int | None) -> Path:
    """A node's data folder: `value` itself when it holds x.npy, else (simulation, where nodes
    are virtual) its `partition-<id>/` sub-folder for the partition id Flower gave the node."""
    path = Path(value).expanduser()
    if (path / "x.npy").is_file() or partition_id is None:
        return path
    sub = path / f"partition-{partition_id}"
    if sub.is_dir():
        return sub
    raise NodeConfigError(f"data-dir {path}: neither x.npy nor partition-{partition_id}/ is there")


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


def _node_key(config: dict[str, Any], data_dir: Any, node_id: int) -> str:
    """A name for this node that survives its restarts: from its node config (the partition, else
    the data folder), not Flower's node id, which a restarted SuperNode gets anew."""
    if "partition-id" in config:
        return f"p{config['partition-id']}"
    if isinstance(data_dir, str):
        return "d" + hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:12]
    return f"node-{node_id}"


def node_settings(node_config: dict[str, Any], run_config: dict[str, Any], node_id: int, run_id: int = 0) -> NodeSettings:
    """Reads and checks the node's settings (its data, policy, audit log and metrics port).

    `data-dir` comes from the node config, else the run config (simulation: one folder with a
    `partition-<id>/` per virtual node). Without it, the node trains on its digits partition
    (`partition-id`, `num-partitions`)."""
    config = dict(node_config)
    unknown = sorted(set(config) - set(NODE_CONFIG_KEYS))
    if unknown:
        LOG.warning("gradguard: ignoring unknown node config keys %s (known: %s)", unknown, list(NODE_CONFIG_KEYS))
    data_dir = config.get("data-dir") or run_config.get("data-dir") or None
    if data_dir is not None and not isinstance(data_dir, str):
        raise NodeConfigError(f"data-dir must be a path, got {data_dir!r}")
    default_parts = None if data_dir is None else 1
    num_partitions = _int(config, "num-partitions", default_parts, 1, 1_000_000)
    partition_id = _int(config, "partition-id", None if data_dir is None else 0, 0, num_partitions - 1)
    test_fraction = config.get("test-fraction", 0.2)
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0.0 < float(test_fraction) < 1.0:
        raise NodeConfigError(f"node config test-fraction must be a number in (0, 1), got {test_fraction!r}")
    skew = config.get("label-skew", 0.8)
    if isinstance(skew, bool) or not isinstance(skew, (int, float)) or not 0.0 <= float(skew) <= 1.0:
        raise NodeConfigError(f"node config label-skew must be a number in [0, 1], got {skew!r}")
    data_seed = _int(config, "data-seed", 0, 0, 2**62)
    policy = config.get("policy", run_config.get("default-policy", "default.toml"))
    metrics_port = _int(config, "metrics-port", 0, 0, 65535)
    # The default spool (and so the audit log and the guard state beside it) is one folder per
    # run and node, named from the node config: a restarted node finds its own again.
    spool = config.get("spool-dir") or str(Path(tempfile.gettempdir()) / f"gradguard-fl-{run_id}-{_node_key(config, data_dir, node_id)}")
    if not isinstance(spool, str):
        raise NodeConfigError(f"node config spool-dir must be a path, got {spool!r}")
    audit_log = config.get("audit-log") or str(Path(spool) / "audit.jsonl")
    if not isinstance(audit_log, str):
        raise NodeConfigError(f"node config audit-log must be a path, got {audit_log!r}")
    given_id = partition_id if "partition-id" in config else None
    return NodeSettings(
        partition_id=partition_id,
        num_partitions=num_partitions,
        label_skew=float(skew),
        data_seed=data_seed,
        policy_path=resolve_policy(policy),
        metrics_port=metrics_port,
        spool_dir=Path(spool),
        data_dir=None if data_dir is None else resolve_data_dir(data_dir, given_id),
        test_fraction=float(test_fraction),
        audit_log=Path(audit_log),
    )


def model_config(run_config: dict[str, Any]) -> dict[str, str]:
    """The run's model for `gradguard_fl.train`: `model-path` (a TorchScript file on every
    node; "" for the digits CNN) and `loss`."""
    return {"model-path": str(run_config.get("model-path", "")), "loss": str(run_config.get("loss", "cross-entropy"))}


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


def ensure_metrics_server(settings: NodeSettings, model_path: str = "") -> None:
    """Starts the node's metrics server (gradguard's exporter, for the layers of the run's
    model) unless it already serves."""
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
        "ready_file=sys.argv[4], model_path=sys.argv[5] or None)"
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
                model_path,
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
    tmp.rename(settings.spool_dir / f"{name}.report.json")


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
