"""The server's average of the verified updates: per layer, weighted by num-examples, over the
clients that released the layer; and the global model's step from it.

Pure functions on arrays: what reaches them already passed verify.check_reply (a client sends
every parameter of a layer it releases and nothing of one it withholds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

import gradguard_fl


@dataclass(frozen=True)
class VerifiedUpdate:
    """A verified reply's part in the average: its client (partition), its weight and its
    arrays (the released layers' parameters)."""

    partition: str
    num_examples: int
    arrays: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        if isinstance(self.num_examples, bool) or not isinstance(self.num_examples, (int, np.integer)) or self.num_examples < 1:
            raise ValueError(f"num_examples of {self.partition} must be a positive integer, got {self.num_examples!r}")


@dataclass(frozen=True)
class LayerMean:
    """One layer's average: the clients averaged (partitions, sorted) and the weighted mean of
    each parameter (float64). No contributors and no means: too few clients released the layer,
    which keeps its value."""

    contributors: list[str] = field(default_factory=list)
    means: dict[str, np.ndarray] = field(default_factory=dict)


def weighted_mean(params: Iterable[str], updates: Sequence[VerifiedUpdate], min_layer_cohort: int = 1) -> dict[str, LayerMean]:
    """`{layer: LayerMean}` for the model's parameters `params` (in model order, grouped into
    layers by gradguard_fl.group_layers): each parameter is averaged, weighted by num-examples,
    over the updates that carry it, when at least `min_layer_cohort` do; the layers in the order
    of their first parameter."""
    if isinstance(min_layer_cohort, bool) or not isinstance(min_layer_cohort, int) or min_layer_cohort < 1:
        raise ValueError(f"min_layer_cohort must be an integer >= 1, got {min_layer_cohort!r}")
    out: dict[str, LayerMean] = {}
    for layer, names in gradguard_fl.group_layers(list(params)).items():
        contributors: list[str] = []
        means: dict[str, np.ndarray] = {}
        for name in names:
            given = [u for u in updates if name in u.arrays]
            if len(given) < min_layer_cohort:
                continue
            weights = np.array([u.num_examples for u in given], dtype=np.float64)
            means[name] = sum(w * u.arrays[name].astype(np.float64) for w, u in zip(weights, given)) / weights.sum()
            contributors = sorted({u.partition for u in given})
        out[layer] = LayerMean(contributors, means)
    return out


def apply_step(global_params: Mapping[str, np.ndarray], layers: Mapping[str, LayerMean], step: float) -> dict[str, np.ndarray]:
    """The new global model: `w - step * mean` (in float64, back in each parameter's dtype) for
    every parameter with a mean, the same array for the others, in `global_params`' order."""
    means = {name: mean for layer in layers.values() for name, mean in layer.means.items()}
    return {
        name: (value.astype(np.float64) - step * means[name]).astype(value.dtype) if name in means else value
        for name, value in global_params.items()
    }
