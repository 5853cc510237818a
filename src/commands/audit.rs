//! `gradguard audit`: the offline audit of one model on data (`gradguard::audit::run_audit`).
//! Per layer, every metric of METRICS.md (M1 sensitivity, M2 subspace distance, M3 usable
//! latent information, and with `--invert` M4 usable original information), printed as a
//! table, written as JSON and drawn as an SVG of per-layer bars.
//!
//! ```text
//! gradguard audit --model model.pt --inputs X.npy --labels Y.npy --attribute A.npy \
//!     --json audit.json --plot audit.svg [--invert]
//! gradguard audit --model cnn --train-steps 300 --invert      # built-in model, shipped digits
//! ```
use gradguard::audit::{run_audit, AuditOptions, InversionOptions};
use gradguard::models::{AuditData, AuditModel, DataSpec, LossKind};
use gradguard::defenses::Defence;
use gradguard::guard::measure::parse_device;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct AuditArgs {
    /// `cnn` (gradguard's digits CNN), `mlp` (widths 64-128-64-10) or a TorchScript file
    /// (torch.jit.script or torch.jit.trace output saved with torch.jit.save).
    #[arg(long)]
    model: String,
    /// Inputs, .npy float32/float64 [n, ...]. Default with a built-in model: the shipped digits.
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// Labels, .npy: integer class ids [n] (cross-entropy) or floats shaped like the model's
    /// output (mse).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Private attribute, .npy integers [n]; enables M2 and M3.
    #[arg(long)]
    attribute: Option<PathBuf>,
    /// Samples in the released batch for M1 (the first N samples; at most n).
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Probes K of the M1 estimator.
    #[arg(long, default_value_t = 8)]
    probes: usize,
    /// Exact M1 (enumerate a basis): small models only.
    #[arg(long)]
    exact: bool,
    /// Seed of every random choice (probes, splits, projections, attack starts, built-in init).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value_t = LossArg::CrossEntropy)]
    loss: LossArg,
    /// Audit only the first N samples (default: all).
    #[arg(long)]
    samples: Option<usize>,
    /// Run the M4 inversion attack (slow).
    #[arg(long)]
    invert: bool,
    /// M4: releases attacked (consecutive batches from the start of the data).
    #[arg(long, default_value_t = 8)]
    invert_releases: usize,
    /// M4: samples per attacked release (default: --batch-size, the batch size trained with).
    #[arg(long)]
    invert_batch_size: Option<usize>,
    /// M4: Adam steps of the attack.
    #[arg(long, default_value_t = 300)]
    invert_iterations: usize,
    /// M4: Adam step size of the attack, in units of the inputs' standard deviation.
    #[arg(long, default_value_t = 0.1)]
    invert_lr: f64,
    /// M4: releases of --batch-size samples the attack suite (analytic attacks, label
    /// recovery) attacks; 0 skips it.
    #[arg(long, default_value_t = 4)]
    attack_releases: usize,
    /// M3: a fixed L2 penalty of the attacker (default: chosen by cross-validation on each
    /// training split from 1e-3, 1e-2, 1e-1, 1).
    #[arg(long)]
    l2: Option<f64>,
    /// M3: seeded stratified splits averaged (the mean and its standard error are reported).
    #[arg(long, default_value_t = 5)]
    m3_splits: usize,
    /// Apply this defence to every layer's release and measure every metric on the defended
    /// release, M5 included: the policy's action syntax, e.g. 'noise(clip_norm=0.5,multiplier=0.1)',
    /// 'clip(max_norm=1)', 'sparsify(keep_fraction=0.1)'. Repeat the flag for a chain, applied in
    /// the order given.
    #[arg(long = "defence", value_name = "DEFENCE")]
    defence: Vec<String>,
    /// M5: the prior's per-dimension variance v (default: measured over all inputs).
    #[arg(long)]
    prior_variance: Option<f64>,
    /// Built-in models only: Adam steps (lr 1e-3, batches of 64) on the audited data first.
    #[arg(long, default_value_t = 0)]
    train_steps: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Write the JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the SVG plot here.
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// `--loss`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum LossArg {
    CrossEntropy,
    Mse,
}

impl From<LossArg> for LossKind {
    fn from(l: LossArg) -> Self {
        match l {
            LossArg::CrossEntropy => LossKind::CrossEntropy,
            LossArg::Mse => LossKind::Mse,
        }
    }
}

impl AuditArgs {
    fn options(&self) -> anyhow::Result<AuditOptions> {
        let defence = self
            .defence
            .iter()
            .map(|d| d.parse::<Defence>().map_err(|e| anyhow::anyhow!("--defence '{d}': {e}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(AuditOptions {
            batch_size: self.batch_size,
            probes: self.probes,
            exact: self.exact,
            seed: self.seed,
            l2: self.l2,
            m3_splits: self.m3_splits,
            defence,
            prior_variance: self.prior_variance,
            train_steps: self.train_steps,
            inversion: self.invert.then_some(InversionOptions {
                releases: self.invert_releases,
                batch_size: self.invert_batch_size.unwrap_or(self.batch_size),
                iterations: self.invert_iterations,
                learning_rate: self.invert_lr,
            }),
            attack_releases: self.attack_releases,
            device: self.device.clone(),
        })
    }

    fn data(&self) -> DataSpec {
        DataSpec { inputs: self.inputs.clone(), labels: self.labels.clone(), attribute: self.attribute.clone(), samples: self.samples, loss: self.loss.into(), token_ids_without_split: false }
    }
}

pub fn run(args: AuditArgs) -> anyhow::Result<()> {
    let options = args.options()?;
    options.validate()?;
    let device = parse_device(&args.device)?;
    let model = AuditModel::load(&args.model, args.seed, device)?;
    let data = AuditData::load(&args.data(), &model, device)?;
    let batch = options.m1_batch(data.n);
    if batch < args.batch_size {
        eprintln!("note: --batch-size {} exceeds the {} audited samples; M1 uses a batch of {batch}", args.batch_size, data.n);
    }
    let report = run_audit(&model, &data, &options)?;

    println!("gradguard audit: {}, data {}", report.model, report.data);
    println!("M1 on the first {batch} samples ({}), seed {}", if args.exact { "exact".to_string() } else { format!("K = {} probes", args.probes) }, args.seed);
    if let Some(d) = &report.defence {
        println!("every metric on the release defended by {d} (M1 through the defence's Jacobian)");
    }
    print!("{}", report.table());
    if let Some(path) = &args.json {
        report.write_json(path)?;
        println!("JSON report: {}", path.display());
    }
    if let Some(path) = &args.plot {
        report.write_plot(path)?;
        println!("SVG plot: {}", path.display());
    }
    Ok(())
}
