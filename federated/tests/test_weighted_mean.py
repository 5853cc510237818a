"""The server's weighted mean on its own (aggregate.py), on hand-computed cases: each layer's
parameters averaged, weighted by num-examples, over the verified updates that released the
layer; a layer released by too few keeps its value; the step applied in float64."""

from __future__ import annotations

import gradguard_fl
import numpy as np
import pytest

from gradguard_federated.aggregate import LayerMean, VerifiedUpdate, apply_step, weighted_mean

# Two layers: a (weight, bias) and b (weight).
PARAMS = ["a.weight", "a.bias", "b.weight"]


def arrays(values: dict[str, list[float]]) -> dict[str, np.ndarray]:
    return {k: np.array(v, np.float32) for k, v in values.items()}


def full(a: float, b: float | None) -> dict[str, np.ndarray]:
    """An update releasing a (both parameters at value a) and, unless b is None, b."""
    out = {"a.weight": [a, a], "a.bias": [a]}
    if b is not None:
        out["b.weight"] = [b, b, b]
    return arrays(out)


def test_two_clients_are_weighted_by_their_examples():
    p0 = VerifiedUpdate("p0", 1, arrays({"a.weight": [1.0, 2.0], "a.bias": [0.0], "b.weight": [4.0, 0.0, -4.0]}))
    p1 = VerifiedUpdate("p1", 3, arrays({"a.weight": [3.0, 6.0], "a.bias": [4.0], "b.weight": [0.0, 4.0, 8.0]}))
    means = weighted_mean(PARAMS, [p0, p1])
    # (1 * x0 + 3 * x1) / 4
    np.testing.assert_array_equal(means["a"].means["a.weight"], [2.5, 5.0])
    np.testing.assert_array_equal(means["a"].means["a.bias"], [3.0])
    np.testing.assert_array_equal(means["b"].means["b.weight"], [1.0, 3.0, 5.0])
    assert means["a"].contributors == ["p0", "p1"] and means["b"].contributors == ["p0", "p1"]
    assert all(m.dtype == np.float64 for layer in means.values() for m in layer.means.values())


def test_a_layer_withheld_by_one_client_is_averaged_over_the_others():
    means = weighted_mean(PARAMS, [VerifiedUpdate("p0", 1, full(2.0, 10.0)), VerifiedUpdate("p1", 3, full(6.0, None))])
    np.testing.assert_array_equal(means["a"].means["a.weight"], [5.0, 5.0])  # (2 + 18) / 4
    np.testing.assert_array_equal(means["b"].means["b.weight"], [10.0, 10.0, 10.0])  # p0's alone, whatever its weight
    assert means["a"].contributors == ["p0", "p1"]
    assert means["b"].contributors == ["p0"]


def test_a_single_client_is_its_own_mean():
    update = arrays({"a.weight": [0.1, -0.3], "a.bias": [7.0], "b.weight": [1.5, 2.5, 3.5]})
    means = weighted_mean(PARAMS, [VerifiedUpdate("p4", 250, update)])
    for name, value in update.items():
        np.testing.assert_array_equal(means[gradguard_fl.layer_of(name)].means[name], value.astype(np.float64))
    assert means["a"].contributors == ["p4"]


def test_a_layer_no_client_released_has_no_mean_and_keeps_its_value():
    means = weighted_mean(PARAMS, [VerifiedUpdate("p0", 1, full(1.0, None)), VerifiedUpdate("p1", 1, full(3.0, None))])
    assert means["b"] == LayerMean([], {})
    global_params = arrays({"a.weight": [1.0, 1.0], "a.bias": [1.0], "b.weight": [9.0, 9.0, 9.0]})
    new = apply_step(global_params, means, 0.5)
    assert new["b.weight"] is global_params["b.weight"]
    np.testing.assert_array_equal(new["a.weight"], [0.0, 0.0])  # 1 - 0.5 * 2


def test_no_updates_keep_every_layer():
    means = weighted_mean(PARAMS, [])
    assert means == {"a": LayerMean(), "b": LayerMean()}


def test_a_layer_below_the_layer_cohort_keeps_its_value():
    updates = [VerifiedUpdate("p0", 1, full(1.0, 5.0)), VerifiedUpdate("p1", 1, full(3.0, None))]
    means = weighted_mean(PARAMS, updates, min_layer_cohort=2)
    np.testing.assert_array_equal(means["a"].means["a.weight"], [2.0, 2.0])
    assert means["b"] == LayerMean([], {})
    assert weighted_mean(PARAMS, updates, min_layer_cohort=3) == {"a": LayerMean(), "b": LayerMean()}


def test_layers_follow_the_models_order_and_contributors_are_sorted():
    params = ["z.weight", "a.weight", "z.bias"]
    updates = [VerifiedUpdate(p, 1, {n: np.zeros(1, np.float32) for n in params}) for p in ("p2", "p10", "p0")]
    means = weighted_mean(params, updates)
    assert list(means) == ["z", "a"]
    assert list(means["z"].means) == ["z.weight", "z.bias"]
    assert means["z"].contributors == ["p0", "p10", "p2"]


def test_the_step_is_taken_in_float64_and_kept_in_each_dtype():
    global_params = {"a.weight": np.array([1.0, 2.0], np.float32), "a.bias": np.array([0.25], np.float64), "b.weight": np.zeros(3, np.float16)}
    update = {"a.weight": np.array([0.1, 0.2], np.float32), "a.bias": np.array([0.5])}
    means = weighted_mean(PARAMS, [VerifiedUpdate("p0", 3, update)])
    new = apply_step(global_params, means, 2.0)
    assert list(new) == list(global_params)
    expected = (np.array([1.0, 2.0], np.float32).astype(np.float64) - 2.0 * update["a.weight"].astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(new["a.weight"], expected)
    assert new["a.weight"].dtype == np.float32
    np.testing.assert_array_equal(new["a.bias"], [-0.75])
    assert new["b.weight"] is global_params["b.weight"]


def test_inputs_are_left_as_they_were():
    update = full(2.0, 4.0)
    before = {k: v.copy() for k, v in update.items()}
    global_params = full(1.0, 1.0)
    apply_step(global_params, weighted_mean(PARAMS, [VerifiedUpdate("p0", 2, update)]), 1.0)
    for name in PARAMS:
        np.testing.assert_array_equal(update[name], before[name])
        np.testing.assert_array_equal(global_params[name], full(1.0, 1.0)[name])


@pytest.mark.parametrize("n", [0, -1, True, 1.5, None])
def test_an_update_needs_a_positive_integer_weight(n):
    with pytest.raises(ValueError, match="num_examples of p0 must be a positive integer"):
        VerifiedUpdate("p0", n, {})


@pytest.mark.parametrize("cohort", [0, -2, True, 1.0])
def test_the_layer_cohort_must_be_at_least_one(cohort):
    with pytest.raises(ValueError, match="min_layer_cohort must be an integer >= 1"):
        weighted_mean(PARAMS, [], min_layer_cohort=cohort)
