//! The tch training-loop integration of gradguard. Two forms, as users write loops:
//!
//! 1. Wrap the optimizer: [`GuardedOptimizer::backward_step`] runs the guard between backward
//!    and step.
//! 2. Keep `zero_grad(); backward(); step()` and call [`Guard::after_backward`] between
//!    backward and step.
//!
//! Either way the user keeps their model, data and optimizer; the guard needs a [`LossFn`] that
//! recomputes the batch loss from inputs (for M1) and, for M2, per-sample attribute labels.
pub use gradguard_guard::{Batch, Guard, GuardConfig, GuardError, LossFn, Report};
pub mod torchscript;
pub use torchscript::{TorchScriptError, TorchScriptModel};
use tch::{nn, Tensor};

/// An `nn::Optimizer` whose `backward_step` runs the guard between backward and step.
pub struct GuardedOptimizer {
    optimizer: nn::Optimizer,
    guard: Guard,
}

impl GuardedOptimizer {
    pub fn new(optimizer: nn::Optimizer, guard: Guard) -> Self {
        Self { optimizer, guard }
    }

    /// zero_grad, backward, guard, step. The step is skipped while the guard holds batches back
    /// for the aggregation floor (`report.step_allowed()` is false). On any guard error (a block,
    /// a non-finite gradient, a bad batch) the step is not applied and the gradients are
    /// cleared: nothing unchecked is used.
    pub fn backward_step(&mut self, loss: &Tensor, batch: Batch, loss_fn: impl LossFn) -> Result<Report, GuardError> {
        self.optimizer.zero_grad();
        loss.f_backward().map_err(|source| GuardError::Torch { context: "running backward on the training loss", source })?;
        match self.guard.after_backward(&batch, &loss_fn) {
            Ok(report) => {
                if report.step_allowed() {
                    self.optimizer.step();
                }
                Ok(report)
            }
            Err(e) => {
                self.optimizer.zero_grad();
                Err(e)
            }
        }
    }

    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    pub fn guard_mut(&mut self) -> &mut Guard {
        &mut self.guard
    }

    pub fn optimizer_mut(&mut self) -> &mut nn::Optimizer {
        &mut self.optimizer
    }

    pub fn into_parts(self) -> (nn::Optimizer, Guard) {
        (self.optimizer, self.guard)
    }
}
