"""The extension module `gradguard_fl` called directly: the guarded training step, its result,
and clear errors (never a panic, never a crash) on bad input."""

from __future__ import annotations

import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

import gradguard_fl

# A policy without noise: the same round releases the same update (the shipped default noises
# every layer, with a key each guard keeps secret).
CNN_THRESHOLDS = Path(__file__).resolve().parent / "policies" / "cnn-thresholds.toml"

ROUND = {"local-steps": 10, "lr": 0.1, "batch-size": 32, "seed": 0, "server-round": 1}


def config(policy_path, **extra):
    return {**ROUND, "policy-path": str(policy_path), **extra}


@pytest.mark.parametrize("torch_first", [False, True], ids=["without-torch", "after-torch"])
def test_imports_with_and_without_torch(torch_first):
    # gradguard_fl is gradguard.fl, and gradguard imports torch before its native module (which
    # links torch's Python bindings): torch is loaded either way, the same libtorch.
    code = ("import torch; " if torch_first else "") + (
        "import gradguard_fl, gradguard.fl, sys; "
        "p = gradguard_fl.initial_parameters(0); "
        "assert gradguard_fl.layer_names() == ['conv1', 'conv2', 'fc1', 'fc2']; "
        "assert gradguard_fl.train is gradguard.fl.train and gradguard_fl.PolicyError is gradguard.PolicyError; "
        "assert 'torch' in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_model_parameters_are_named_by_layer(global_params):
    shapes = gradguard_fl.parameter_shapes()
    assert set(shapes) == {f"{layer}.{kind}" for layer in ("conv1", "conv2", "fc1", "fc2") for kind in ("weight", "bias")}
    assert list(dict.fromkeys(name.split(".")[0] for name in shapes)) == ["conv1", "conv2", "fc1", "fc2"]
    assert shapes["conv1.weight"] == (8, 1, 3, 3) and shapes["fc1.weight"] == (64, 256)
    for name, value in global_params.items():
        assert value.dtype == np.float32 and value.shape == tuple(shapes[name])


def test_partitions_are_non_iid_and_disjoint():
    parts = [gradguard_fl.Partition(i, 3) for i in range(3)]
    counts = [p.label_counts() for p in parts]
    for i, c in enumerate(counts):
        own = sum(c[d] for d in range(10) if d % 3 == i)
        assert own > 0.7 * sum(c), f"partition {i} is not skewed to its digits: {c}"
    assert sum(p.num_train for p in parts) == sum(sum(c) for c in counts)
    iid = gradguard_fl.Partition(0, 3, label_skew=0.0).label_counts()
    assert min(iid) > 0


def test_release_returns_update_manifest_and_report(global_params, policy_paths):
    part = gradguard_fl.Partition(0, 3)
    result = gradguard_fl.train(global_params, config(CNN_THRESHOLDS), part)
    assert not result.blocked and result.reason is None
    update = result.update
    assert set(update) == set(global_params)
    for name, value in update.items():
        assert value.shape == global_params[name].shape and np.all(np.isfinite(value))
    manifest = json.loads(result.manifest)
    assert manifest["outcome"] == {"outcome": "released"}
    assert [l["name"] for l in manifest["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    report = json.loads(result.report)
    conv1 = next(l for l in report["layers"] if l["name"] == "conv1")
    assert conv1["sensitivity"]["status"] == "measured" and conv1["sensitivity"]["sensitivity_rms"] > 0
    assert conv1["sensitivity"]["n"] == result.num_examples
    assert result.num_examples >= 64 and result.local_steps == 10
    # Deterministic: the same round on the same partition releases the same update.
    again = gradguard_fl.train(global_params, config(CNN_THRESHOLDS), part)
    for name, value in again.update.items():
        np.testing.assert_array_equal(value, update[name])


def test_release_is_the_mean_gradient(global_params, policy_paths):
    """One local step over a batch: the update is G(B) = the loss gradient at the global params,
    so a small step along it (w - 0.01 G) lowers the loss on the partition."""
    part = gradguard_fl.Partition(1, 3)
    result = gradguard_fl.train(global_params, config(policy_paths["default"], **{"local-steps": 1, "batch-size": 64}), part)
    stepped = {k: v - 0.01 * result.update[k] for k, v in global_params.items()}
    before = gradguard_fl.evaluate(global_params, part)["loss"]
    after = gradguard_fl.evaluate(stepped, part)["loss"]
    assert after < before


def test_tight_policy_withholds_the_first_layer(global_params, policy_paths):
    result = gradguard_fl.train(global_params, config(policy_paths["tight-first-layer"]), gradguard_fl.Partition(1, 3))
    assert not result.blocked
    assert result.withheld_layers == ["conv1"]
    assert not any(name.startswith("conv1.") for name in result.update)
    manifest = json.loads(result.manifest)
    conv1 = manifest["layers"][0]
    assert conv1["name"] == "conv1" and conv1["released"] is False and conv1["actions"] == ["withhold"]
    shared = json.loads(result.shared_report)
    assert next(l for l in shared["layers"] if l["name"] == "conv1")["gradient"]["status"] == "absent"
    assert next(l for l in shared["layers"] if l["name"] == "fc1")["gradient"]["status"] == "measured"


def test_impossible_policy_blocks_with_reason(global_params, policy_paths):
    result = gradguard_fl.train(global_params, config(policy_paths["impossible"]), gradguard_fl.Partition(2, 3))
    assert result.blocked
    assert "blocked" in result.reason and "above threshold 0" in result.reason
    assert result.update == {} and result.shared_report == ""
    manifest = json.loads(result.manifest)
    assert manifest["outcome"]["outcome"] == "blocked"
    assert all(not l["released"] for l in manifest["layers"])


def bad_params(global_params, change):
    params = {k: v.copy() for k, v in global_params.items()}
    change(params)
    return params


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p.pop("conv1.bias"), "missing parameter conv1.bias"),
        (lambda p: p.__setitem__("conv9.weight", np.zeros(3, np.float32)), 'unknown parameter "conv9.weight"'),
        (lambda p: p.__setitem__("fc1.weight", np.zeros((64, 255), np.float32)), "fc1.weight has shape [64, 255], the local model [64, 256]"),
        (lambda p: p.__setitem__("fc2.bias", np.zeros(10, np.int64)), "expected a float32 (or float64) numpy array, got int64"),
        (lambda p: p.__setitem__("fc2.bias", "zeros"), "expected a float32 (or float64) numpy array"),
    ],
    # Non-finite values are the guard's to refuse, by name, before anything runs on them
    # (test_refusal.py::test_non_finite_parameters_are_refused_by_name).
    ids=["missing", "unknown", "shape", "dtype", "not-an-array"],
)
def test_bad_parameters_are_a_clear_error(global_params, policy_paths, change, message):
    with pytest.raises(gradguard_fl.ParameterError, match=None) as info:
        gradguard_fl.train(bad_params(global_params, change), config(policy_paths["default"]), gradguard_fl.Partition(0, 3))
    assert message in str(info.value)
    assert isinstance(info.value, gradguard_fl.GradguardError)


def test_float64_parameters_are_accepted(global_params, policy_paths):
    params = {k: v.astype(np.float64) for k, v in global_params.items()}
    result = gradguard_fl.train(params, config(policy_paths["default"]), gradguard_fl.Partition(0, 3))
    assert not result.blocked


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"local-epochs": 2}, 'unknown config key "local-epochs"'),
        ({"lr": -0.1}, "config lr: must be a finite number in (0, 100], got -0.1"),
        ({"lr": float("nan")}, "config lr: must be a finite number"),
        ({"lr": "fast"}, "config lr: must be a number, got a string"),
        ({"local-steps": 0}, "config local-steps: must be in 1..=100000, got 0"),
        ({"batch-size": True}, "config batch-size: must be an integer, got a bool"),
        ({"seed": [1, 2]}, "config seed: unsupported value type list"),
        ({"policy": "version = 1\n"}, "give either `policy` (TOML text) or `policy-path`, not both"),
    ],
    ids=["unknown-key", "negative-lr", "nan-lr", "string-lr", "zero-steps", "bool-batch", "list-seed", "two-policies"],
)
def test_bad_config_is_a_clear_error(global_params, policy_paths, extra, message):
    with pytest.raises(gradguard_fl.ConfigError) as info:
        gradguard_fl.train(global_params, config(policy_paths["default"], **extra), gradguard_fl.Partition(0, 3))
    assert message in str(info.value)


def test_missing_policy_is_refused(global_params):
    with pytest.raises(gradguard_fl.ConfigError, match="no privacy policy"):
        gradguard_fl.train(global_params, dict(ROUND), gradguard_fl.Partition(0, 3))


@pytest.mark.parametrize(
    "policy, message",
    [
        ("version = 1\n[settings]\nmystery = 1\n", "unknown field `mystery`"),
        ('version = 1\n[[rule]]\nname = "r"\nmetric = "sensitivity"\nlayers = ["conv7"]\nact_above = 1.0\nrelax_below = 0.5\nladder = [{ action = "withhold" }]\n',
         "layer pattern 'conv7' matches no layer"),
        ("version = 3\n", "version 3 is not supported"),
    ],
    ids=["unknown-setting", "unknown-layer", "version"],
)
def test_bad_policy_is_a_clear_error(global_params, policy, message):
    with pytest.raises(gradguard_fl.PolicyError) as info:
        gradguard_fl.train(global_params, {**ROUND, "policy": policy}, gradguard_fl.Partition(0, 3))
    assert message in str(info.value)
    with pytest.raises(gradguard_fl.PolicyError):
        gradguard_fl.check_policy(policy)


def test_unreadable_policy_path(global_params, tmp_path):
    with pytest.raises(gradguard_fl.PolicyError, match="cannot read policy"):
        gradguard_fl.train(global_params, config(tmp_path / "nope.toml"), gradguard_fl.Partition(0, 3))


def test_empty_partition_is_a_clear_error(global_params, policy_paths):
    # 1437 training digits over 100000 partitions: most partitions hold nothing.
    empty = next(p for p in (gradguard_fl.Partition(i, 100_000) for i in range(50)) if p.num_train == 0)
    with pytest.raises(gradguard_fl.DataError, match=r"partition \d+ of 100000 holds no training samples"):
        gradguard_fl.train(global_params, config(policy_paths["default"]), empty)
    with pytest.raises(gradguard_fl.DataError, match="no held-out samples"):
        gradguard_fl.evaluate(global_params, empty)


@pytest.mark.parametrize(
    "args, message",
    [
        ((3, 3), "partition_id must be in 0..3, got 3"),
        ((-1, 3), "partition_id must be in 0..3, got -1"),
        ((0, 0), "num_partitions must be at least 1, got 0"),
    ],
)
def test_bad_partition_spec(args, message):
    with pytest.raises(gradguard_fl.DataError) as info:
        gradguard_fl.Partition(*args)
    assert message in str(info.value)
    with pytest.raises(gradguard_fl.DataError, match="label_skew"):
        gradguard_fl.Partition(0, 3, label_skew=1.5)


def test_wrong_argument_types_raise_python_errors(global_params, policy_paths):
    with pytest.raises(gradguard_fl.ParameterError, match="must be a dict"):
        gradguard_fl.train([1, 2], config(policy_paths["default"]), gradguard_fl.Partition(0, 3))
    with pytest.raises(gradguard_fl.ConfigError, match="must be a dict"):
        gradguard_fl.train(global_params, "lr=1", gradguard_fl.Partition(0, 3))
    with pytest.raises(TypeError):
        gradguard_fl.train(global_params, config(policy_paths["default"]), "partition 0")


def test_errors_leave_the_module_usable(global_params, policy_paths):
    """After every kind of error, the next call in the same process works."""
    part = gradguard_fl.Partition(0, 3)
    for bad in ({"lr": 0}, {"local-epochs": 1}):
        with pytest.raises(gradguard_fl.ConfigError):
            gradguard_fl.train(global_params, config(policy_paths["default"], **bad), part)
    with pytest.raises(gradguard_fl.ParameterError):
        gradguard_fl.train({}, config(policy_paths["default"]), part)
    assert not gradguard_fl.train(global_params, config(policy_paths["default"]), part).blocked


def test_central_evaluation_on_held_out_digits(global_params):
    scores = gradguard_fl.evaluate(global_params)
    assert scores["num_examples"] == 359
    assert 0.0 <= scores["accuracy"] <= 0.3  # an untrained model


def test_node_metrics_server_serves_spooled_reports(tmp_path, global_params, policy_paths):
    """The node's /metrics process: gradguard's exporter fed by report files, unreadable files set
    aside, stopped by a `stop` file."""
    import socket
    import time
    import urllib.request

    result = gradguard_fl.train(global_params, config(policy_paths["tight-first-layer"]), gradguard_fl.Partition(1, 3))
    spool, ready = tmp_path / "spool", tmp_path / "ready"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import sys, gradguard_fl; "
        "n = gradguard_fl.serve_metrics(int(sys.argv[1]), sys.argv[2], ready_file=sys.argv[3]); "
        "sys.exit(0 if n == 1 else 3)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(port), str(spool), str(ready)])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the metrics server did not start"
            time.sleep(0.1)
        assert int(ready.read_text()) == port
        (spool / "0-garbage.report.json").write_text("{not json")
        (spool / "1-round1.report.json").write_text(result.report)
        # Not a report: the guard state a node may keep in its spool is left alone.
        (spool / "audit.jsonl.state.json").write_text('{"step": 1}')
        text = ""
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
            if 'gradguard_layer_withheld{layer="conv1"} 1' in text:
                break
            time.sleep(0.2)
        assert 'gradguard_layer_withheld{layer="conv1"} 1' in text, text[-2000:]
        assert 'gradguard_releases_total{outcome="protected"} 1' in text
        assert 'gradguard_layer_threshold{layer="conv1",metric="sensitivity_rms"} 0.00001' in text or \
            'gradguard_layer_threshold{layer="conv1",metric="sensitivity_rms"} 1e-5' in text
        assert (spool / "0-garbage.report.bad").exists() and not (spool / "1-round1.report.json").exists()
        assert (spool / "audit.jsonl.state.json").read_text() == '{"step": 1}'
        (spool / "stop").touch()
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_release_kind_is_the_guards_vocabulary():
    """The server names a release from its manifest by the guard's own rule (ReleaseKind::of)."""
    released = {"outcome": {"outcome": "released"}, "layers": [{"name": "fc1", "actions": []}]}
    protected = {"outcome": {"outcome": "released"}, "layers": [{"name": "fc1", "actions": [{"action": "clip", "max_norm": 1.0}]}]}
    blocked = {"outcome": {"outcome": "blocked", "reason": "x"}, "layers": []}
    held = {"outcome": {"outcome": "held", "reason": "floor"}, "layers": []}
    kinds = [gradguard_fl.release_kind(json.dumps(m)) for m in (released, protected, blocked, held)]
    assert kinds == ["released", "protected", "blocked", "held"]
    with pytest.raises(ValueError, match="unreadable manifest"):
        gradguard_fl.release_kind("{}")
