//! The offline audit of one model on data: per layer every metric of METRICS.md (M1
//! sensitivity, M2 subspace distance, M3 usable latent information, and optionally M4 usable
//! original information).
use crate::error::{AuditError, Result};
use crate::estimate::defended::Chain;
use crate::estimate::attacks::AttackPlan;
use crate::estimate::{measure_layers, MetricSettings};
use gradguard_defenses::Defence;
use gradguard_models::AuditData;
use crate::report::{AuditReport, AuditSettings};
use gradguard_models::{AuditModel, Trainer};
use gradguard_guard::{Batch, Inspection, measure::{InversionPlan, InversionSettings}};
use gradguard_guard::report::JvpMethod;
use gradguard_guard::measure::SensitivitySettings;
use gradguard_guard::measure::SubspaceSettings;
use gradguard_guard::measure::UsableSettings;
use std::time::Instant;

/// How to audit (the flags of `gradguard audit`).
#[derive(Clone, Debug)]
pub struct AuditOptions {
    /// Samples in the released batch for M1 (the first N samples; capped at the data's n).
    pub batch_size: usize,
    /// Probes K of the M1 estimator (at least 2 unless `exact`).
    pub probes: usize,
    /// Exact M1 (enumerate a basis): small models only.
    pub exact: bool,
    /// Seed of every random choice (probes, splits, projections, attack starts).
    pub seed: u64,
    /// M3: a fixed L2 penalty of the attacker; None: chosen by cross-validation on each
    /// training split from the default grid.
    pub l2: Option<f64>,
    /// M3: seeded stratified splits averaged (mean and standard error).
    pub m3_splits: usize,
    /// The defence chain applied to every layer's release (empty: the raw release).
    pub defence: Vec<Defence>,
    /// M5's prior variance; None: the per-dimension variance over all inputs.
    pub prior_variance: Option<f64>,
    /// Built-in models only: Adam steps (lr 1e-3, batches of 64) on the audited data first.
    pub train_steps: usize,
    /// M4: run the inversion attack with these settings (slow); None: M4 absent.
    pub inversion: Option<InversionOptions>,
    /// M4: the attack suite (analytic attacks and label recovery) on this many consecutive
    /// releases of `batch_size` samples; 0: not run.
    pub attack_releases: usize,
    /// The device, as recorded in the report (the model and data must already be on it).
    pub device: String,
}

impl Default for AuditOptions {
    fn default() -> Self {
        Self { batch_size: 32, probes: 8, exact: false, seed: 0, l2: None, m3_splits: 5, defence: Vec::new(), prior_variance: None, train_steps: 0, inversion: None, attack_releases: 4, device: "cpu".into() }
    }
}

/// The M4 optimisation attack of an audit.
#[derive(Clone, Copy, Debug)]
pub struct InversionOptions {
    /// Releases attacked (consecutive batches from the start of the data).
    pub releases: usize,
    /// Samples per attacked release.
    pub batch_size: usize,
    /// Adam steps of the attack.
    pub iterations: usize,
    /// Adam step size, in units of the inputs' standard deviation.
    pub learning_rate: f64,
}

impl Default for InversionOptions {
    fn default() -> Self {
        Self { releases: 8, batch_size: 1, iterations: 300, learning_rate: 0.1 }
    }
}

impl AuditOptions {
    /// Checks the options on their own (before any model or data is loaded).
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(AuditError::Usage("--batch-size must be at least 1".into()));
        }
        if self.m3_splits == 0 {
            return Err(AuditError::Usage("--m3-splits must be at least 1".into()));
        }
        if self.exact && !self.defence.is_empty() {
            return Err(AuditError::Usage("--exact cannot be combined with --defence: a defended release is measured through K probe JVPs".into()));
        }
        if let Some(v) = self.prior_variance.filter(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(AuditError::Usage(format!("--prior-variance must be a finite number > 0, got {v}")));
        }
        if !self.exact && self.probes < 2 {
            return Err(AuditError::Usage(format!("--probes must be at least 2 (for a standard error), got {}", self.probes)));
        }
        Ok(())
    }

    /// The M1 batch for `n` audited samples.
    pub fn m1_batch(&self, n: usize) -> usize {
        self.batch_size.min(n)
    }
}

/// Audits `model` on `data` (loaded for it): trains it first if asked (built-in models), then
/// measures every metric of every layer with the loss the data were loaded for.
pub fn run_audit(model: &AuditModel, data: &AuditData, options: &AuditOptions) -> Result<AuditReport> {
    options.validate()?;
    let started = Instant::now();
    let mut training = None;
    if options.train_steps > 0 {
        if !model.is_builtin() {
            return Err(AuditError::Usage("--train-steps is for the built-in models only".into()));
        }
        Trainer::new(model, &data.x, &data.y, (0..data.n).collect(), 64, options.seed)?.train_to(options.train_steps)?;
        training = Some(started.elapsed().as_secs_f64());
    }
    let layers = model.layers()?;
    let loss_fn = model.loss_fn(data.loss);
    let settings = MetricSettings {
        sensitivity: SensitivitySettings { probes: options.probes, method: JvpMethod::DoubleBackward, exact: options.exact, probe_samples: None },
        m1_batch: options.m1_batch(data.n),
        subspace: SubspaceSettings::default(),
        usable: match options.l2 {
            Some(l2) => UsableSettings { l2, l2_grid: Vec::new(), splits: options.m3_splits, ..Default::default() },
            None => UsableSettings { splits: options.m3_splits, ..Default::default() },
        },
        inversion: options.inversion.map(|i| {
            (InversionPlan { batch_size: i.batch_size, releases: i.releases }, InversionSettings { iterations: i.iterations, learning_rate: i.learning_rate, ..Default::default() })
        }),
        attacks: (options.attack_releases > 0).then(|| AttackPlan { batch_size: options.m1_batch(data.n), releases: options.attack_releases, optimisation: None }),
        defence: options.defence.clone(),
        prior_variance: options.prior_variance,
        seed: options.seed,
    };
    let target = Inspection::new(&layers, &loss_fn, Batch::new(&data.x, &data.y)).seeded(options.seed, 0);
    let mut measured = measure_layers(&target, data.attribute.as_deref(), &settings)?;
    if let Some(t) = training {
        measured.seconds.insert("training", t);
    }
    Ok(AuditReport {
        model: model.label(),
        data: data.source.clone(),
        samples: data.n,
        batch_size: settings.m1_batch,
        probes: (!options.exact).then_some(options.probes),
        seed: options.seed,
        exact: options.exact,
        loss: data.loss,
        device: options.device.clone(),
        train_steps: options.train_steps,
        defence: (!options.defence.is_empty()).then(|| Chain::describe(&options.defence)),
        release: measured.release,
        labels_recovered: measured.labels,
        settings: AuditSettings { sensitivity: settings.sensitivity, subspace: settings.subspace, usable: settings.usable, inversion: settings.inversion, attacks: settings.attacks },
        seconds: measured.seconds,
        layers: measured.rows,
    })
}
