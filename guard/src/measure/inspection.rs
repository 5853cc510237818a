//! What the guard looks at when it measures: the model's layers, the loss that rebuilds the
//! batch's graph, the batch, and the seed and step that pick every random draw. Every
//! estimator of METRICS.md is a method of it.
use super::batch::Batch;
use super::inversion::{self, Inversion, InversionPlan, InversionSettings, ReleaseTransform};
use super::layers::LayerMap;
use super::loss::LossFn;
use super::per_sample::{self, GradientMatrix};
use super::sensitivity::{self, JvpSamples, SensitivitySettings};
use super::subspace::{self, SubspaceSamples, SubspaceSettings};
use super::usable::{self, UsableInformation, UsableSettings};
use crate::error::Result;
use crate::report::{Metric, Sensitivity, Subspace};

/// One batch of one model, as the estimators see it. Cheap to copy: everything is borrowed.
///
/// ```no_run
/// # fn demo(layers: &gradguard_guard::LayerMap, loss: &dyn gradguard_guard::LossFn,
/// #         x: &tch::Tensor, y: &tch::Tensor, a: &tch::Tensor) -> gradguard_guard::Result<()> {
/// use gradguard_guard::{Batch, Inspection, SensitivitySettings, SubspaceSettings};
/// let batch = Batch::new(x, y).with_attribute(a);
/// let look = Inspection::new(layers, loss, batch).seeded(7, 100);
/// let m1 = look.sensitivity(&SensitivitySettings::default())?; // one entry per layer
/// let m2 = look.subspace(&SubspaceSettings::default())?;
/// # Ok(()) }
/// ```
#[derive(Clone, Copy)]
pub struct Inspection<'a> {
    layers: &'a LayerMap,
    loss: &'a dyn LossFn,
    batch: Batch<'a>,
    seed: u64,
    step: u64,
}

impl<'a> Inspection<'a> {
    /// Looks at `batch` through `loss` (seed 0, step 0).
    pub fn new(layers: &'a LayerMap, loss: &'a dyn LossFn, batch: Batch<'a>) -> Self {
        Self { layers, loss, batch, seed: 0, step: 0 }
    }

    /// The same look with another seed and step: the probes, selections and projections they
    /// pick are reproducible from the pair.
    pub fn seeded(self, seed: u64, step: u64) -> Self {
        Self { seed, step, ..self }
    }

    /// The same model and loss on another batch.
    pub fn on(self, batch: Batch<'a>) -> Self {
        Self { batch, ..self }
    }

    /// The model's layers.
    pub fn layers(&self) -> &'a LayerMap {
        self.layers
    }

    /// The loss that rebuilds the batch's graph.
    pub fn loss(&self) -> &'a dyn LossFn {
        self.loss
    }

    /// The batch looked at.
    pub fn batch(&self) -> Batch<'a> {
        self.batch
    }

    /// The seed of every random draw.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The step the look belongs to (it enters every seeded draw).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// M1 of every layer.
    pub fn sensitivity(&self, settings: &SensitivitySettings) -> Result<Vec<Metric<Sensitivity>>> {
        sensitivity::estimate_sensitivity(self, settings)
    }

    /// The probe JVPs of every layer, kept so that M1 of any defended release can be measured
    /// afterwards ([`JvpSamples::release_sensitivity`]) without another backward pass.
    pub fn jvp_samples(&self, settings: &SensitivitySettings) -> Result<JvpSamples> {
        sensitivity::jvp_samples(self, settings)
    }

    /// The per-sample gradients M2 needs (from the batch's attribute labels), or the reason M2
    /// cannot be computed on this batch.
    pub fn subspace_samples(&self, settings: &SubspaceSettings) -> Result<std::result::Result<SubspaceSamples, String>> {
        subspace::subspace_samples(self, settings)
    }

    /// M2 of every layer (absent, with its reason, without attribute labels).
    pub fn subspace(&self, settings: &SubspaceSettings) -> Result<Vec<Metric<Subspace>>> {
        subspace::estimate_subspace(self, settings)
    }

    /// The n x P_l per-sample gradient matrix of every layer (None: the loss does not reach it).
    pub fn per_sample_gradients(&self) -> Result<Vec<Option<GradientMatrix>>> {
        per_sample::per_sample_gradients(self)
    }

    /// M4 of every layer: the layer-restricted inversion attack on `plan.releases` releases of
    /// the batch, each released gradient passed through `transform` (a defence) first.
    pub fn original_information(
        &self,
        plan: &InversionPlan,
        settings: &InversionSettings,
        transform: Option<&ReleaseTransform>,
    ) -> Result<Vec<Metric<Inversion>>> {
        inversion::estimate_original_information(self, plan, settings, transform)
    }

    /// M3 of every layer against the batch's attribute labels, from per-sample gradients.
    pub fn usable_information(&self, settings: &UsableSettings) -> Result<Vec<Metric<UsableInformation>>> {
        usable::estimate_usable_information(self, settings)
    }
}
