"""Per-node series on the server, from what each node's verified reply shows (its manifest
and shared report), under the training-loop exporter's metric names (gradguard-exporter,
exporter/README.md) with a `node` label (the partition, `p0`, ...: a bounded set). Nodes need
no metrics server of their own, and nothing of a rejected reply is shown: only what passed
verification (released) or a block.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from .verify import ClientRow


class NodeSeries:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.leakage = Gauge("gradguard_layer_leakage", "A node's latest leakage estimate for a layer (METRICS.md), from its reply.", ["node", "layer", "metric"], registry=r)
        self.withheld = Gauge("gradguard_layer_withheld", "1 while the node withholds the layer's gradient, else 0.", ["node", "layer"], registry=r)
        self.level = Gauge("gradguard_layer_protection_level", "The node's protection level on the layer (rung of its policy's ladder).", ["node", "layer"], registry=r)
        self.actions = Counter("gradguard_defence_actions", "Defence actions a node applied to a layer's released gradient, by action.", ["node", "layer", "action"], registry=r)
        self.releases = Counter("gradguard_releases", "A node's releases by outcome: released (as computed), protected (after defence actions), blocked.", ["node", "outcome"], registry=r)
        self.step = Gauge("gradguard_report_step", "Step number of the node's latest release (its guard's count, across rounds).", ["node"], registry=r)
        self.policy = Gauge("gradguard_policy_info", "The policy a node's latest manifest was produced under: hash as a label, value 1.", ["node", "hash"], registry=r)

    def observe(self, row: ClientRow) -> None:
        """One reply that passed verification, or a block."""
        if row.status not in ("released", "blocked"):
            return
        node = row.partition
        # The guard's own vocabulary, read from the verified manifest (withholding is protection).
        self.releases.labels(node, row.kind or row.status).inc()
        if row.status == "released":
            for layer, acts in (row.actions or {}).items():
                for a in acts:
                    self.actions.labels(node, layer, a.split("(")[0]).inc()
        for layer in (row.released or []) + (row.withheld or []):
            self.withheld.labels(node, layer).set(0 if row.status == "released" and layer in (row.released or []) else 1)
            self.level.labels(node, layer).set((row.levels or {}).get(layer, 0))
        for layer, values in (row.leakage or {}).items():
            for metric, v in values.items():
                self.leakage.labels(node, layer, metric).set(v)
        if row.step is not None:
            self.step.labels(node).set(row.step)
        if row.policy_hash:
            self.policy.labels(node, row.policy_hash).set(1)
