"""The server's check of every train reply before it may reach the average.

A reply is aggregated only when it carries a gradguard manifest that
- is readable, with status and outcome "released" and a positive num-examples;
- was produced under a policy the run requires (`required-policy`: hashes, or policy files
  whose hash and rules the server then knows), the reply's stated hash being the manifest's;
- for a required policy known from its file, shows a check of each of that policy's rules
  (a manifest whose hash was rewritten onto an unguarded release shows none);
- releases exactly the layers whose arrays are present: every parameter of each released
  layer, nothing of a withheld or blocked one, the model's shapes, finite values.
Anything else is rejected with a reason code (the label of `gradguard_server_rejected_total`)
and a message, and never reaches the average.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message

import gradguard_fl

from .task import ARRAYS_KEY, GUARD_KEY, METRICS_KEY, resolve_policy, summarise_leakage, to_numpy

HASH = re.compile(r"^[0-9a-f]{64}$")

# Every reason a reply can be rejected for (the counter's label values, pre-registered).
REJECT_REASONS = (
    "no-manifest",
    "malformed",
    "policy-mismatch",
    "forged-manifest",
    "status",
    "blocked-with-arrays",
    "withheld-layer-present",
    "missing-parameter",
    "unknown-parameter",
    "shape",
    "non-finite",
    "num-examples",
)


@dataclass(frozen=True)
class RequiredPolicies:
    """The policies a client must enforce: hash -> the policy's rule names (None when only the
    hash is known). Empty: any policy (the manifest is still checked against the arrays)."""

    rules: dict[str, frozenset[str] | None] = field(default_factory=dict)

    @staticmethod
    def parse(value: str, model_path: str = "", torch_model: str = "") -> "RequiredPolicies":
        rules: dict[str, frozenset[str] | None] = {}
        for entry in re.split(r"[\s,]+", str(value).strip()):
            if not entry:
                continue
            if HASH.match(entry.lower()):
                rules.setdefault(entry.lower(), None)
                continue
            path = Path(resolve_policy(entry))
            text = path.read_text()
            if torch_model:
                from .torch_task import policy_hash

                checked_hash = policy_hash(torch_model, str(path))
            else:
                checked_hash = gradguard_fl.check_policy(text, str(path), model_path=model_path or None)["hash"]
            names = frozenset(r["name"] for r in tomllib.loads(text).get("rule", []))
            rules[checked_hash] = names
        return RequiredPolicies(rules)

    def describe(self) -> str:
        return ", ".join(h[:12] for h in self.rules) if self.rules else "any policy"


@dataclass
class ClientRow:
    node_id: int
    partition: str
    status: str  # the reply: released | blocked | refused | error | rejected | no reply
    kind: str | None = None  # the release, from its verified manifest (gradguard_fl.release_kind): released | protected | blocked
    reason: str | None = None
    released: list[str] | None = None
    withheld: list[str] | None = None
    actions: dict[str, list[str]] | None = None
    leakage: dict[str, dict[str, float]] | None = None
    num_examples: int = 0
    reject: str | None = None  # the reason code when rejected
    policy_hash: str | None = None
    step: int | None = None
    levels: dict[str, int] | None = None  # protection level per layer (its checks' highest)

    def summary(self) -> str:
        if self.status == "released":
            acted = [f"{layer}:{'+'.join(a.split('(')[0] for a in acts)}" for layer, acts in (self.actions or {}).items() if acts]
            return ", ".join(acted) if acted else "released as computed"
        if self.status == "blocked":
            return "BLOCKED"
        if self.status == "refused":
            return f"REFUSED ({self.reason})"
        if self.status == "rejected":
            return f"REJECTED ({self.reject})"
        return self.status.upper()

    def rejected(self, code: str, reason: str) -> "ClientRow":
        self.status, self.reject, self.reason = "rejected", code, reason
        return self


def check_reply(msg: Message, partition: str, global_params: dict[str, np.ndarray], required: RequiredPolicies,
                node: int | None = None) -> tuple[ClientRow, dict[str, np.ndarray] | None]:
    """The reply's row, and its update when it may be aggregated. `node`: the node the reply is
    about, when not its sender (an error the SuperLink wrote for a node it lost)."""
    node = msg.metadata.src_node_id if node is None else node
    if msg.has_error():
        return ClientRow(node, partition, "error", reason=msg.error.reason), None
    content = msg.content
    row = ClientRow(node, partition, "rejected")
    guard = content.config_records.get(GUARD_KEY)
    metrics = content.metric_records.get(METRICS_KEY)
    if guard is not None and metrics is not None and str(guard.get("status")) == "refused":
        # The node refused the global model before training on it: nothing to verify or
        # aggregate, only why (a reply with arrays is not a refusal).
        if content.array_records:
            return row.rejected("refused-with-arrays", "a refused reply carried arrays"), None
        if "partition-id" in guard:
            row.partition = f"p{guard['partition-id']}"
        row.status, row.kind, row.reason = "refused", "refused", str(guard.get("reason", "refused"))
        return row, None
    if guard is None or metrics is None or not guard.get("manifest"):
        return row.rejected("no-manifest", "no gradguard manifest in the reply"), None
    if "partition-id" in guard:
        row.partition = f"p{guard['partition-id']}"
    try:
        manifest: dict[str, Any] = json.loads(str(guard["manifest"]))
        layers = manifest["layers"]
        row.actions = {l["name"]: list(l.get("actions", [])) for l in layers}
        row.released = [l["name"] for l in layers if l.get("released")]
        row.withheld = [l["name"] for l in layers if not l.get("released")]
        row.policy_hash = str(manifest["policy_hash"])
        row.step = int(manifest.get("step", 0))
        row.levels = {l["name"]: max([int(c.get("level", 0)) for c in l.get("checks", [])] or [0]) for l in layers}
        row.num_examples = int(metrics.get("num-examples", 0))
    except (ValueError, KeyError, TypeError) as error:
        return row.rejected("malformed", f"unreadable manifest: {type(error).__name__}: {error}"), None
    if str(guard.get("policy-hash", row.policy_hash)) != row.policy_hash:
        return row.rejected("forged-manifest", f"the reply states policy {guard.get('policy-hash')}, its manifest {row.policy_hash}"), None
    if required.rules and row.policy_hash not in required.rules:
        return row.rejected("policy-mismatch", f"policy {row.policy_hash[:12]} is not one the run requires ({required.describe()})"), None
    rule_names = required.rules.get(row.policy_hash)
    status = str(guard.get("status"))
    if status == "blocked":
        row.status, row.kind, row.reason = "blocked", "blocked", str(guard.get("reason", "blocked"))
        row.leakage = {l["name"]: {c["metric"]: c["raw"] for c in l.get("checks", []) if c.get("raw") is not None} for l in layers}
        if content.array_records:
            return row.rejected("blocked-with-arrays", "a blocked reply carried arrays"), None
        return row, None
    if status != "released" or manifest.get("outcome", {}).get("outcome") != "released":
        return row.rejected("status", f"status {status!r}, manifest outcome {manifest.get('outcome')}"), None
    if rule_names is not None:
        checked = {c.get("rule") for l in layers for c in l.get("checks", [])}
        if checked != set(rule_names):
            missing = sorted(set(rule_names) - checked)
            return row.rejected("forged-manifest", f"the manifest claims policy {row.policy_hash[:12]} but shows no check of its rules {missing}"), None
    if row.num_examples < 1:
        return row.rejected("num-examples", "num-examples missing or not positive"), None
    row.leakage = summarise_leakage(str(guard.get("report", "")))
    record = content.array_records.get(ARRAYS_KEY)
    update = to_numpy(record) if record is not None else {}
    # The model's layers as the guard groups its parameters (gradguard_fl: one rule, in Rust).
    layers: dict[str, list[str]] = gradguard_fl.group_layers(list(global_params))
    layer_of = {param: layer for layer, params in layers.items() for param in params}
    for name, value in update.items():
        if name not in global_params:
            return row.rejected("unknown-parameter", f"unknown parameter {name}"), None
        if layer_of[name] not in row.released:
            return row.rejected("withheld-layer-present", f"{name} arrived but the manifest does not release {layer_of[name]}"), None
        if value.shape != global_params[name].shape:
            return row.rejected("shape", f"{name} has shape {value.shape}, the model {global_params[name].shape}"), None
        if not np.all(np.isfinite(value)):
            return row.rejected("non-finite", f"{name} is not finite"), None
    for layer in row.released:
        expected = {param for name, params in layers.items() if name == layer for param in params}
        if not expected or not expected <= set(update):
            return row.rejected("missing-parameter", f"the manifest releases {layer} but its parameters are missing"), None
    try:
        # released or protected, by the guard's own rule.
        row.kind = gradguard_fl.release_kind(str(guard["manifest"]))
    except ValueError as error:
        return row.rejected("malformed", str(error)), None
    row.status = "released"
    return row, update
