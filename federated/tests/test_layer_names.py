"""One layer-naming rule: the server's Python (verification, the average) groups parameter names
into layers with the guard's own Rust rule (gradguard_fl.layer_of / group_layers), so it agrees
with the layers a client's manifest names: nested module paths, and tch's `__N` suffix of a
duplicate name."""

from __future__ import annotations

import json

import gradguard_fl
import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from gradguard_federated.aggregate import VerifiedUpdate, weighted_mean
from gradguard_federated.task import ARRAYS_KEY, GUARD_KEY, METRICS_KEY, to_record
from gradguard_federated.verify import RequiredPolicies, check_reply
from test_server_aggregation import task_identity  # noqa: F401 - the fixture


@pytest.mark.parametrize(
    "param, layer",
    [
        ("conv1.weight", "conv1"),
        ("block.0.conv.weight", "block.0.conv"),
        ("features.0.bias", "features.0"),
        # tch names a duplicate variable with a `__N` suffix: dropped with the last component...
        ("conv1.weight__1", "conv1"),
        # ... or stripped from a top-level name; a module path's own suffix stays.
        ("scale__2", "scale"),
        ("fc__1.weight", "fc__1"),
        ("w", "w"),
        ("w__", "w__"),
        ("__1", "__1"),
        ("w__1x", "w__1x"),
    ],
)
def test_layer_of_is_the_guards_rule(param, layer):
    assert gradguard_fl.layer_of(param) == layer


def test_group_layers_keeps_first_appearance_order():
    names = ["fc.weight", "scale__1", "block.0.conv.weight", "fc.weight__1", "scale", "fc__1.weight", "block.0.conv.bias"]
    assert list(gradguard_fl.group_layers(names).items()) == [
        ("fc", ["fc.weight", "fc.weight__1"]),
        ("scale", ["scale__1", "scale"]),
        ("block.0.conv", ["block.0.conv.weight", "block.0.conv.bias"]),
        ("fc__1", ["fc__1.weight"]),
    ]
    assert gradguard_fl.group_layers([]) == {}


def test_group_layers_matches_the_guards_layers_of_a_nested_model(tmp_path):
    import torch

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Linear(4, 4)
            self.norm = torch.nn.LayerNorm(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.conv(x))

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = torch.nn.Sequential(Block(), Block())
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.block(x))

    path = tmp_path / "nested.pt"
    torch.jit.save(torch.jit.script(Net()), str(path))
    params = list(gradguard_fl.parameter_shapes(model_path=str(path)))
    assert "block.0.conv.weight" in params
    layers = gradguard_fl.group_layers(params)
    assert list(layers) == gradguard_fl.layer_names(model_path=str(path))
    assert list(layers) == ["block.0.conv", "block.0.norm", "block.1.conv", "block.1.norm", "head"]


def test_group_layers_rejects_non_strings():
    with pytest.raises(TypeError):
        gradguard_fl.group_layers([1, 2])
    with pytest.raises(TypeError):
        gradguard_fl.layer_of(None)


# A model with tch's duplicate names: the top-level `scale` and `scale__1` are one layer `scale`
# (the old `rsplit(".", 1)` rule made `scale__1` a layer of its own), `fc.weight__1` is in `fc`.
PARAMS = {"scale": (3,), "scale__1": (3,), "fc.weight": (2, 3), "fc.weight__1": (2,)}
LAYERS = ("scale", "fc")


def reply(node, arrays, released, n=10):
    instruction = Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
    manifest = json.dumps({"outcome": {"outcome": "released"}, "policy_hash": "x", "step": 0,
                           "layers": [{"name": l, "released": l in released, "actions": [], "checks": []} for l in LAYERS]})
    guard = {"status": "released", "manifest": manifest, "partition-id": node, "policy-hash": "x"}
    records = {METRICS_KEY: MetricRecord({"num-examples": n}), GUARD_KEY: ConfigRecord(guard), ARRAYS_KEY: to_record(arrays)}
    return Message(RecordDict(records), reply_to=instruction)


def arrays(value, layers):
    return {k: np.full(s, value, np.float32) for k, s in PARAMS.items() if gradguard_fl.layer_of(k) in layers}


def test_verification_groups_duplicate_names_as_the_guard_does():
    global_params = {k: np.zeros(s, np.float32) for k, s in PARAMS.items()}
    row, update = check_reply(reply(1, arrays(1.0, ("scale",)), ("scale",)), "node 1", global_params, RequiredPolicies())
    assert row.status == "released", row.reason
    assert set(update) == {"scale", "scale__1"}
    # Half of a released layer is missing a parameter; arrays of a withheld layer are present.
    half = {k: v for k, v in arrays(1.0, ("scale",)).items() if k != "scale__1"}
    row, _ = check_reply(reply(2, half, ("scale",)), "node 2", global_params, RequiredPolicies())
    assert (row.status, row.reject) == ("rejected", "missing-parameter")
    row, _ = check_reply(reply(3, arrays(1.0, LAYERS), ("fc",)), "node 3", global_params, RequiredPolicies())
    assert (row.status, row.reject) == ("rejected", "withheld-layer-present")
    assert "does not release scale" in row.reason


def test_the_average_groups_duplicate_names_as_the_guard_does():
    means = weighted_mean(PARAMS, [VerifiedUpdate("p0", 1, arrays(2.0, ("scale",))), VerifiedUpdate("p1", 3, arrays(6.0, LAYERS))])
    assert list(means) == ["scale", "fc"]
    assert means["scale"].contributors == ["p0", "p1"] and means["fc"].contributors == ["p1"]
    assert set(means["scale"].means) == {"scale", "scale__1"}
    np.testing.assert_array_equal(means["scale"].means["scale__1"], np.full(3, 5.0))
