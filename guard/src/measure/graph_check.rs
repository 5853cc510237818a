//! Does the autograd graph connect every layer's gradient to the inputs? M1's double backward
//! differentiates dL/dx with respect to the parameters, so it sees only what autograd recorded.
//! A model that computes part of its forward under `torch.no_grad`, with `.detach()`, or
//! through a function marked once-differentiable can cut a layer off that record while its
//! gradient still moves with the inputs: a linear probe on a frozen feature extractor gets a
//! gradient that gives its features back, and the double backward measures its M1 as exactly
//! 0, "safe". Whether the double backward reaches a parameter does not depend on the direction,
//! so one JVP tells; a layer with a parameter whose gradient is nonzero but not reached is cut,
//! and M1 is then measured by central differences, which re-run the forward (`decide` does the
//! switch).
//!
//! Not covered: a parameter reached along one path from the inputs and cut on another (a
//! once-differentiable function on one branch only) is not found, and its M1 lacks that path's
//! part.
use super::graph::{GradientGraph, Point};
use super::inspection::Inspection;
use super::tensors::{gaussian_probes, rng_for, to_f64_vec};
use crate::error::{Result, TorchContext};

/// The stream of the seeded generator the check's direction is drawn from ([`rng_for`]).
const CHECK_STREAM: u64 = 5;

/// The check's verdict on every layer.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphCheck {
    /// The layers with a parameter whose gradient is nonzero but not connected to the inputs by
    /// the graph.
    pub cut_layers: Vec<String>,
}

impl Inspection<'_> {
    /// Builds the gradient graph on the batch and takes one double-backward JVP: the layers
    /// with a parameter whose gradient is nonzero and which it does not reach. The random
    /// stream and buffers are left as they were. [`crate::GuardError::DiscreteInputs`] for
    /// integer inputs without an embedding split.
    pub fn graph_check(&self) -> Result<GraphCheck> {
        self.observing(|| {
            let n = self.batch().validate()?;
            let point = Point::of(self, n)?;
            let graph = GradientGraph::build(self, &point)?;
            let v = gaussian_probes(&graph.x, 1, &mut rng_for(self.seed(), self.step(), CHECK_STREAM))?.f_get(0).during("selecting the check's direction")?;
            let jvp = graph.jvp(&v)?;
            let layers = self.layers();
            // Per parameter: a layer whose weight is reached but whose bias is not (a
            // once-differentiable function between them) is cut too.
            let norms = to_f64_vec(&layers.param_norms(&graph.grads)?)?;
            let mut cut = vec![false; layers.len()];
            for ((t, &l), norm) in jvp.iter().zip(&graph.owner).zip(norms) {
                cut[l] |= norm > 0.0 && !t.defined();
            }
            let cut_layers = layers.layers().iter().zip(cut).filter(|(_, cut)| *cut).map(|(layer, _)| layer.name.clone()).collect();
            Ok(GraphCheck { cut_layers })
        })
    }
}
