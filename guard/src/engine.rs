//! The guard: holds the layer map and settings, inspects each step's released gradient and
//! schedules the M1/M2 estimates.
use crate::batch::Batch;
use crate::error::{GuardError, Result};
use crate::layers::LayerMap;
use crate::loss::LossFn;
use crate::report::{LayerReport, Metric, Report, Sensitivity, Subspace};
use crate::sensitivity::{estimate_sensitivity, SensitivitySettings};
use crate::stats::{current_grads, gradient_stats};
use crate::subspace::{estimate_subspace, SubspaceSettings};
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;

/// Guard settings. Serde so that a policy file can carry them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GuardConfig {
    /// Seed of every random choice (probes, splits): the same seed gives the same report.
    pub seed: u64,
    /// Estimate M1/M2 every this many steps (1: every step).
    pub estimate_every: u64,
    pub sensitivity: SensitivitySettings,
    pub subspace: SubspaceSettings,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self { seed: 0, estimate_every: 10, sensitivity: SensitivitySettings::default(), subspace: SubspaceSettings::default() }
    }
}

impl GuardConfig {
    pub fn validate(&self) -> Result<()> {
        if self.estimate_every == 0 {
            return Err(GuardError::Config { setting: "estimate_every", why: "must be at least 1".into() });
        }
        self.sensitivity.validate()?;
        self.subspace.validate()
    }
}

/// Per-layer leakage estimation for one model.
pub struct Guard {
    config: GuardConfig,
    layers: LayerMap,
    step: u64,
    sample_shape: Option<Vec<i64>>,
    latest_sensitivity: Vec<Metric<Sensitivity>>,
    latest_subspace: Vec<Metric<Subspace>>,
    last_report: Option<Report>,
}

impl Guard {
    /// A guard over every trainable parameter of the VarStore.
    pub fn new(vs: &VarStore, config: GuardConfig) -> Result<Self> {
        Self::from_layers(LayerMap::from_var_store(vs)?, config)
    }

    pub fn from_layers(layers: LayerMap, config: GuardConfig) -> Result<Self> {
        config.validate()?;
        let l = layers.len();
        Ok(Self {
            config,
            layers,
            step: 0,
            sample_shape: None,
            latest_sensitivity: (0..l).map(|_| Metric::absent("not estimated yet")).collect(),
            latest_subspace: (0..l).map(|_| Metric::absent("not estimated yet")).collect(),
            last_report: None,
        })
    }

    pub fn config(&self) -> &GuardConfig {
        &self.config
    }

    pub fn layers(&self) -> &LayerMap {
        &self.layers
    }

    /// Steps inspected so far; the next call of `after_backward` reports this step.
    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn last_report(&self) -> Option<&Report> {
        self.last_report.as_ref()
    }

    /// The explicit hook for loops that run `zero_grad(); backward(); step()`: call it between
    /// backward and step. Reads the released gradient from `.grad()`, estimates M1/M2 when they
    /// are due, and returns the step's report. A non-finite gradient is an error (the caller
    /// must not apply or release it); the report is still kept in `last_report`.
    pub fn after_backward(&mut self, batch: &Batch, loss_fn: &dyn LossFn) -> Result<Report> {
        let n = self.check_batch(batch)?;
        let step = self.step;
        self.step += 1;
        let stats = gradient_stats(&self.layers, &current_grads(&self.layers), step)?;
        let due = step % self.config.estimate_every == 0;
        let mut report = self.assemble(step, n, due, stats);
        let non_finite = report.non_finite_layers();
        if !non_finite.is_empty() {
            self.last_report = Some(report);
            return Err(GuardError::NonFiniteGradient { step, layers: non_finite });
        }
        if due {
            self.estimate_into(batch, loss_fn, step)?;
            report = self.assemble(step, n, true, report.layers.into_iter().map(|l| l.gradient).collect());
        }
        self.last_report = Some(report.clone());
        Ok(report)
    }

    /// Estimates M1 (and M2 when attribute labels are given) on a batch now, without reading
    /// `.grad()` or advancing the step: an audit of the model at its current parameters.
    pub fn estimate(&mut self, batch: &Batch, loss_fn: &dyn LossFn) -> Result<Report> {
        let n = self.check_batch(batch)?;
        let step = self.step;
        self.estimate_into(batch, loss_fn, step)?;
        let stats = (0..self.layers.len()).map(|_| Metric::absent("audit: no released gradient")).collect();
        let report = self.assemble(step, n, true, stats);
        self.last_report = Some(report.clone());
        Ok(report)
    }

    fn check_batch(&mut self, batch: &Batch) -> Result<usize> {
        let n = batch.validate()?;
        let shape = batch.sample_shape();
        match &self.sample_shape {
            Some(expected) if *expected != shape => {
                return Err(GuardError::InputShape { expected: expected.clone(), got: shape })
            }
            Some(_) => {}
            None => self.sample_shape = Some(shape),
        }
        Ok(n)
    }

    fn estimate_into(&mut self, batch: &Batch, loss_fn: &dyn LossFn, step: u64) -> Result<()> {
        let seed = self.config.seed;
        self.latest_sensitivity = estimate_sensitivity(
            &self.layers,
            loss_fn,
            batch.inputs,
            batch.targets,
            &self.config.sensitivity,
            seed,
            step,
        )?;
        self.latest_subspace = match batch.attribute_values()? {
            None => (0..self.layers.len()).map(|_| Metric::absent("no attribute labels given")).collect(),
            Some(attribute) => estimate_subspace(
                &self.layers,
                loss_fn,
                batch.inputs,
                batch.targets,
                &attribute,
                &self.config.subspace,
                seed,
                step,
            )?,
        };
        Ok(())
    }

    fn assemble(&self, step: u64, n: usize, estimated: bool, stats: Vec<Metric<crate::report::GradientStats>>) -> Report {
        let layers = self
            .layers
            .layers()
            .iter()
            .zip(stats)
            .enumerate()
            .map(|(l, (layer, gradient))| LayerReport {
                name: layer.name.clone(),
                params: layer.numel(),
                gradient,
                sensitivity: self.latest_sensitivity[l].clone(),
                subspace: self.latest_subspace[l].clone(),
            })
            .collect();
        Report { step, batch_size: n, seed: self.config.seed, estimated, layers }
    }
}
