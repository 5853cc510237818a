"""The extension with the user's own model and data: a TorchScript MLP saved here with the
venv's torch, trained on .npy folders; the guard's state carried from round to round; and
clear errors, naming the file, for data and models that cannot be used."""

from __future__ import annotations

import json

import gradguard_fl
import numpy as np
import pytest

from byo import CHANCE, POLICIES, layer_decisions, save_mlp, write_node


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return str(save_mlp(tmp_path_factory.mktemp("model") / "mlp.pt"))


def config(mlp, policy="mlp-tight.toml", server_round=1, **extra):
    return {"local-steps": 10, "lr": 0.1, "batch-size": 32, "seed": 0, "server-round": server_round,
            "policy-path": str(POLICIES / policy), "model-path": mlp, "loss": "cross-entropy", **extra}


def test_the_server_starts_from_the_files_parameters(mlp):
    import torch

    saved = {k: v.detach().numpy() for k, v in torch.jit.load(mlp).named_parameters()}
    params = gradguard_fl.initial_parameters(model_path=mlp)
    assert sorted(params) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    for name, value in saved.items():
        np.testing.assert_array_equal(params[name], value)
    assert gradguard_fl.layer_names(model_path=mlp) == ["fc1", "fc2"]


def test_state_carries_levels_and_steps_across_rounds(mlp, tmp_path):
    data = gradguard_fl.DataDir(str(write_node(tmp_path / "node", 0)))
    log = tmp_path / "audit.jsonl"
    params = gradguard_fl.initial_parameters(model_path=mlp)
    first = gradguard_fl.train(params, config(mlp), data, audit_log=str(log))
    assert first.state_origin == "fresh" and first.step == 0
    assert first.withheld_layers == ["fc1"] and first.released_layers == ["fc2"]
    state = json.loads(first.state)
    assert state["levels"] == {"first-layer-tight": {"fc1": 2}} and state["step"] == 1
    second = gradguard_fl.train(params, config(mlp, server_round=2), data, state=first.state, audit_log=str(log))
    assert second.state_origin == "restored (step 1)" and second.step == 1
    # The M5 run ledger goes on too: two releases, each of the samples it used by id.
    ledger = json.loads(second.state)["ledger"]
    assert ledger["releases"] == 2 and json.loads(first.state)["ledger"]["releases"] == 1
    assert len(ledger["per_sample"]) >= len(json.loads(first.state)["ledger"]["per_sample"]) > 0
    by_step = {s: layer_decisions(log, "fc1", s) for s in (0, 1)}
    # Round 1 climbed the ladder; round 2 started at the top rung: no escalation, level 2.
    assert [r["level"] for r in by_step[0] if r["outcome"] == "escalated"] == [1, 2]
    assert by_step[1] and all(r["outcome"] != "escalated" for r in by_step[1])
    assert {r["level"] for r in by_step[1]} == {2}
    # Without the state the guard starts over: step 0, climbing again.
    fresh = gradguard_fl.train(params, config(mlp, server_round=2), data)
    assert fresh.step == 0 and fresh.state_origin == "fresh"
    # A state of another policy is not applied to this one.
    other = gradguard_fl.train(params, config(mlp, policy="mlp-observe.toml"), data, state=first.state)
    assert other.state_origin.startswith("fresh: the saved state belongs to policy")


def test_trains_and_evaluates_on_its_own_held_out_files(mlp, tmp_path):
    data = gradguard_fl.DataDir(str(write_node(tmp_path / "node", 1, test_files=True)))
    params = gradguard_fl.initial_parameters(model_path=mlp)
    before = gradguard_fl.evaluate(params, data, model_path=mlp)
    assert before["num_examples"] == 100
    for r in range(1, 6):
        result = gradguard_fl.train(params, config(mlp, policy="mlp-observe.toml", server_round=r), data)
        assert not result.blocked and result.released_layers == ["fc1", "fc2"]
        params = {k: v - 0.1 * 10 * result.update[k] for k, v in params.items()}
    after = gradguard_fl.evaluate(params, data, model_path=mlp)
    assert after["accuracy"] > max(before["accuracy"], CHANCE) + 0.2, (before, after)


def test_file_errors_name_the_file(mlp, tmp_path):
    params = gradguard_fl.initial_parameters(model_path=mlp)
    with pytest.raises(gradguard_fl.DataError, match="y.npy is missing"):
        (tmp_path / "empty").mkdir()
        np.save(tmp_path / "empty" / "x.npy", np.zeros((4, 16), np.float32))
        gradguard_fl.DataDir(str(tmp_path / "empty"))
    narrow = tmp_path / "narrow"
    write_node(narrow, 0)
    np.save(narrow / "x.npy", np.zeros((300, 15), np.float32))
    with pytest.raises(gradguard_fl.ModelError, match=r"narrow/x\.npy"):
        gradguard_fl.train(params, config(mlp), gradguard_fl.DataDir(str(narrow)))
    labels = tmp_path / "labels"
    write_node(labels, 0)
    np.save(labels / "y.npy", np.full(300, 7, np.int64))
    with pytest.raises(gradguard_fl.DataError, match=r"labels/y\.npy"):
        gradguard_fl.train(params, config(mlp), gradguard_fl.DataDir(str(labels)))
    with pytest.raises(gradguard_fl.ModelError, match="nowhere.pt"):
        gradguard_fl.train(params, config(str(tmp_path / "nowhere.pt")), gradguard_fl.DataDir(str(labels)))
    # The module still trains afterwards.
    ok = gradguard_fl.train(params, config(mlp), gradguard_fl.DataDir(str(write_node(tmp_path / "ok", 2))))
    assert ok.released_layers == ["fc2"]


def test_token_model_follows_the_embedding_convention(tmp_path):
    """A TorchScript model on token ids that exports embed and forward_embedded (the fixture of
    tests/token_torchscript.rs) trains on integer x.npy; M1 is measured on its embeddings."""
    import shutil
    from pathlib import Path

    fixtures = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
    folder = tmp_path / "tokens"
    folder.mkdir()
    for src, dst in (("tokens_x.npy", "x.npy"), ("tokens_y.npy", "y.npy"), ("tokens_a.npy", "attribute.npy")):
        shutil.copy(fixtures / src, folder / dst)
    model = str(fixtures / "token_scripted.pt")
    params = gradguard_fl.initial_parameters(model_path=model)
    result = gradguard_fl.train(params, config(model, policy="permissive.toml"), gradguard_fl.DataDir(str(folder)))
    assert not result.blocked and result.released_layers == gradguard_fl.layer_names(model_path=model)
    layers = json.loads(result.report)["layers"]
    assert all(l["sensitivity"]["status"] == "measured" for l in layers), layers
