//! `gradguard policy init --model M [--inputs x.npy [--labels y.npy]] [--out FILE]`: a starter
//! policy for the model's own layers, from the rules that need no threshold measured on a
//! particular model and hold against a malicious server: sample isolation (M6) on the layers
//! that have units, Gaussian noise calibrated to a bound in bits per input dimension on every
//! layer (M5), and a cap on the run's cumulative bound (the ledger). With `--inputs` it measures
//! the data's per-dimension variance (M5's prior, then fixed in the policy) and M6 at the model's
//! parameters as it is, and says so in the comments.
use crate::commands::audit::LossArg;
use anyhow::{bail, Context};
use gradguard::guard::measure::{layer_units, per_dimension_variance, Inspection, IsolationSettings};
use gradguard::guard::{Batch, Metric, Policy};
use gradguard::models::{AuditData, AuditModel, DataSpec, LossKind};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// M6's threshold: the share of the batch a layer's release may expose alone.
const EXPOSED_ABOVE: f64 = 0.5;
/// The clip before the calibrated noise (the noise scales with what the clip leaves).
const CLIP_NORM: f64 = 10.0;

#[derive(clap::Args)]
pub(super) struct InitArgs {
    /// `cnn` (the digits CNN of `gradguard demo`), `mlp` (widths 64-128-64-10) or the path of
    /// a TorchScript module (`.pt`), resolved as `gradguard audit --model` resolves it.
    #[arg(long)]
    model: String,
    /// Inputs, .npy [n, ...] (a node's x.npy; integer token ids for a model with an embedding
    /// split): measures the data's per-dimension variance (M5's prior) and M6 at the model's
    /// parameters on a batch of them, for the policy and its comments.
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// Labels of --inputs, .npy (default: y.npy beside the inputs, a node folder's layout).
    #[arg(long)]
    labels: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = LossArg::CrossEntropy)]
    loss: LossArg,
    /// Samples of the batch M6 is measured on (the first N of --inputs).
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// The bound of one whole release, bits per input dimension, split evenly over the layers
    /// (Fisher information adds over the layers released together).
    #[arg(long, default_value_t = 0.05)]
    release_bits: f64,
    /// The cap on the run's cumulative bound, bits per input dimension (the run ledger).
    #[arg(long, default_value_t = 1.0)]
    cap_bits: f64,
    /// Write the policy to this file (default: standard output).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Overwrite --out if it exists.
    #[arg(long)]
    force: bool,
}

/// A layer name as a glob that matches exactly that name (glob metacharacters escaped with a
/// backslash, which policies' globs read as an escape).
fn literal_pattern(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '{' | '}' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A TOML basic string (JSON's escapes, `\"`, `\\` and `\uXXXX`, are TOML's too).
fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

fn pattern_list(names: &[&str]) -> String {
    let items: Vec<String> = names.iter().map(|n| quoted(&literal_pattern(n))).collect();
    format!("[{}]", items.join(", "))
}

/// `x` rounded down to 4 significant digits (a bound written below what was asked).
fn floor_sig(x: f64) -> f64 {
    if !(x > 0.0 && x.is_finite()) {
        return x;
    }
    let scale = 10f64.powi(3 - x.log10().floor() as i32);
    (x * scale).floor() / scale
}

/// What `--inputs` measured.
struct Measured {
    source: String,
    /// The prior variance to fix in the policy (continuous inputs only).
    prior_variance: Option<f64>,
    /// The embeddings' variance, for the comments (token models).
    embedding_variance: Option<f64>,
    batch: usize,
    /// M6 per layer at the model's parameters.
    isolation: Vec<Metric<gradguard::guard::report::SampleIsolation>>,
}

fn measure(args: &InitArgs, model: &AuditModel, inputs: &Path) -> anyhow::Result<Measured> {
    let labels = match &args.labels {
        Some(l) => l.clone(),
        None => {
            let beside = inputs.with_file_name("y.npy");
            if !beside.exists() {
                bail!("--labels is required with --inputs (no y.npy beside {})", inputs.display());
            }
            beside
        }
    };
    let loss: LossKind = args.loss.into();
    let spec = DataSpec { inputs: Some(inputs.to_path_buf()), labels: Some(labels), loss, ..Default::default() };
    let data = AuditData::load(&spec, model, Device::Cpu)?;
    let tokens = data.x.kind() == Kind::Int64;
    let (prior_variance, embedding_variance) = if tokens {
        let embedded = tch::no_grad(|| model.embed(&data.x)).context("embedding the inputs")?;
        (None, Some(per_dimension_variance(&embedded, data.n)?))
    } else {
        (Some(per_dimension_variance(&data.x, data.n)?), None)
    };
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let batch = args.batch_size.min(data.n);
    let x = data.x.f_narrow(0, 0, batch as i64)?;
    let y = data.y.f_narrow(0, 0, batch as i64)?;
    let layers = model.layers()?;
    let loss_fn = model.loss_fn(loss);
    let isolation = Inspection::new(&layers, &loss_fn, Batch::new(&x, &y)).sample_isolation(&IsolationSettings::default())?;
    Ok(Measured { source: data.source.clone(), prior_variance, embedding_variance, batch, isolation })
}

/// The policy's text for `names` (model order), `units` (per layer: Ok(count) or why none).
fn render(args: &InitArgs, label: &str, names: &[String], units: &[Result<usize, String>], measured: Option<&Measured>) -> anyhow::Result<String> {
    let l = names.len();
    if !(args.release_bits.is_finite() && args.release_bits > 0.0) {
        bail!("--release-bits must be a finite number > 0, got {}", args.release_bits);
    }
    if !(args.cap_bits.is_finite() && args.cap_bits >= args.release_bits) {
        bail!("--cap-bits must be a finite number of at least --release-bits ({}), got {}", args.release_bits, args.cap_bits);
    }
    // The whole release's v dFIL is the layers' sum: 2^(2B) - 1 split evenly over L layers.
    let per_release = 2f64.powf(2.0 * args.release_bits) - 1.0;
    let per_layer_bits = floor_sig(0.5 * (1.0 + per_release / l as f64).log2());
    let releases = ((2f64.powf(2.0 * args.cap_bits) - 1.0) / per_release).floor() as u64;

    // M6 on the layers with units, less those where it was measured absent.
    let mut m6: Vec<&str> = Vec::new();
    let mut m6_notes: Vec<String> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let measured_here = measured.and_then(|m| m.isolation.get(i));
        match (&units[i], measured_here) {
            (Err(why), _) => m6_notes.push(format!("{name}: left out: {why}")),
            (Ok(_), Some(Metric::Absent { reason })) => m6_notes.push(format!("{name}: left out: M6 absent on the measured batch: {reason}")),
            (Ok(u), Some(Metric::Measured(s))) => {
                m6.push(name);
                let mut line = format!("{name}: {u} units, exposed_fraction {:.3} ({} of {}) at these parameters", s.exposed_fraction, s.exposed_samples, s.n);
                if s.exposed_fraction > EXPOSED_ABOVE {
                    line.push_str(&format!(
                        ": already above {EXPOSED_ABOVE}, so it would be withheld. Parameters sent by a malicious server do this (trap weights); if these are honest (an embedding whose rows one sample alone uses shows which tokens it holds), take the layer out of this rule only if what it exposes is not private"
                    ));
                }
                m6_notes.push(line);
            }
            (Ok(u), None) => {
                m6.push(name);
                m6_notes.push(format!("{name}: {u} units"));
            }
        }
    }

    let mut t = String::new();
    let command = {
        let mut c = format!("gradguard policy init --model {}", args.model);
        if let Some(i) = &args.inputs {
            let _ = write!(c, " --inputs {}", i.display());
        }
        c
    };
    let _ = writeln!(t, "# gradguard policy for {label}, written by `{command}`.");
    let _ = writeln!(t, "# Layers, in model order: {}.", names.join(", "));
    let _ = writeln!(t, "#");
    let _ = writeln!(t, "# Check it before a run:  gradguard policy check THIS_FILE --model {}", args.model);
    t.push_str(
        "#
# Its rules need no threshold measured on a particular model, and they are the ones that hold
# against a malicious server (one that chooses the parameters it sends and the batch size):
# calibrated noise on every layer with a ledger cap (M5), and sample isolation (M6). Thresholds
# on S_l or R_l, clipping and the aggregation floor do not hold against one: trap weights lower
# S_l, a clip scales dW and db alike (x = dW_u / db_u is unchanged), and the server builds its
# trap for the batch size the floor asks for (docs/FEDERATED.md, \"What holds against a
# malicious server\"; scripts/malicious-server-figures.py).
version = 2

[settings]
seed = 0
# One release per federated round, estimated right before it. For a training loop
# (`gradguard train`), set estimate_before_release = false and estimate_every to the steps
# between estimates (max_estimate_age_steps at least that).
estimate_every = 1
estimate_before_release = true
max_estimate_age_steps = 1
background_estimates = false
budget_share = 1.0
# Against an honest server: releases cover at least 64 samples. Not a defence against a
# malicious one.
aggregation_floor = 64
aggregation_ceiling = 1024
# A layer that stays above a threshold is withheld; the rest is released.
on_violation = \"withhold\"
strict_layers = true
withheld_layers_train_locally = true
probes = 8
# The noise is sized for S_l^2 plus 2 standard errors of its estimate over the probes.
calibration_margin_se = 2.0
",
    );
    match measured {
        Some(m) => {
            if let Some(v) = m.prior_variance {
                let _ = writeln!(t, "# M5's prior variance v: the per-dimension variance of the inputs, measured on {}.", m.source);
                let _ = writeln!(t, "# Fixed here, every round's bound uses it; unset, each round measures it on its own samples.");
                let _ = writeln!(t, "prior_variance = {v:.6e}");
            } else if let Some(v) = m.embedding_variance {
                let _ = writeln!(t, "# M5 is measured on the embeddings (token inputs), whose variance moves as the model trains");
                let _ = writeln!(t, "# ({v:.4e} per dimension at these parameters, on {}): each round measures it.", m.source);
            }
        }
        None => {
            t.push_str("# M5's prior variance v is measured on each round's samples (`--inputs x.npy` fixes it in the policy).\n");
        }
    }
    let _ = writeln!(
        t,
        "# The run ledger: over the whole run, no attacker with a Gaussian prior recovers more than
# {cap:?} bits per input dimension of any sample from all releases together (mean squared error
# at least 2^(-2 x {cap}) = {mse:.3} of the data's variance). Each release adds at most
# 2^(2 x {b}) - 1 = {per_release:.4} to v dFIL (rule 2's bound summed over the {l} layers), so a sample
# can be in about {releases} releases before the ledger withholds the layers that would cross the cap.
ledger_cap_bits = {cap:?}

# M6: a unit isolates a sample when that sample holds at least tau of the unit's per-sample
# squared gradient norms.
[settings.isolation]
tau = 0.99",
        cap = args.cap_bits,
        mse = 2f64.powf(-2.0 * args.cap_bits),
        b = args.release_bits,
    );

    let _ = writeln!(t);
    t.push_str(
        "# Rule 1, M6 (sample isolation): withhold a layer whose release would expose more than half of
# the round's samples alone (units whose gradient comes from one sample give it back, whatever
# the batch size: trap weights). Measured at the parameters the server sent, before anything of
# the round leaves. Honest layers isolate some samples of small batches (the digits CNN's fc1 up
# to 0.22 of 32); trap weights most (0.85 to 0.92 of 32). A trap below the threshold passes
# this rule, and rule 2's noise still bounds its release.
",
    );
    match measured {
        Some(m) => {
            let _ = writeln!(t, "# Measured at the model's parameters as given, on the first {} samples of {}:", m.batch, m.source);
        }
        None => t.push_str("# (`--inputs` measures each layer's M6 at the model's parameters.)\n"),
    }
    for note in &m6_notes {
        let _ = writeln!(t, "#   {note}");
    }
    if m6.is_empty() {
        t.push_str("# No layer of this model has units to measure: no M6 rule.\n");
    } else {
        let _ = writeln!(
            t,
            "[[rule]]
name = \"sample-isolation\"
metric = \"exposed_fraction\"
layers = {}
act_above = {EXPOSED_ABOVE}
relax_below = {}
ladder = [{{ action = \"withhold\" }}]",
            pattern_list(&m6),
            EXPOSED_ABOVE / 2.0
        );
    }

    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    let _ = writeln!(
        t,
        "
# Rule 2, M5 (reconstruction bound): every layer's release gets Gaussian noise calibrated so
# that no attacker whose prior knowledge is the data's mean and variance recovers more than
# {per_layer_bits} bits per input dimension of the average sample from it (van Trees), so at most
# {b} for the whole release of {l} layers. The noise std is recomputed at each release from S_l
# after the clip; no threshold depends on the model. The clip is not what protects (the noise
# scales with what it leaves): {CLIP_NORM} is above most layers' mean gradient norm. An
# attacker who knows more of the data than its mean and variance can recover more.
[[rule]]
name = \"reconstruction-bound\"
metric = \"reconstruction_bound_bits\"
layers = {}
act_above = {per_layer_bits}
relax_below = {}
ladder = [{{ action = \"noise\", clip_norm = {CLIP_NORM:?}, target = \"threshold\" }}]",
        pattern_list(&all),
        floor_sig(per_layer_bits / 5.0),
        b = args.release_bits,
    );
    Ok(t)
}

pub(super) fn init(args: InitArgs) -> anyhow::Result<()> {
    if let Some(out) = &args.out {
        if out.exists() && !args.force {
            bail!("{} exists: pass --force to overwrite it", out.display());
        }
    }
    let model = super::load_model(&args.model)?;
    let layers = model.layers()?;
    let names = layers.names();
    if names.is_empty() {
        bail!("{} has no trainable parameters: nothing to guard", model.label());
    }
    let units: Vec<Result<usize, String>> = layers.layers().iter().map(layer_units).collect();
    let measured = args.inputs.as_deref().map(|inputs| measure(&args, &model, inputs)).transpose()?;
    let text = render(&args, &model.label(), &names, &units, measured.as_ref())?;

    // What is written must load and cover this model's layers.
    let origin = args.out.as_ref().map_or("policy init".to_string(), |p| p.display().to_string());
    let policy = Policy::from_toml_str(&text, &origin).context("the written policy does not load (a bug)")?;
    policy.coverage(&names).context("the written policy does not fit the model (a bug)")?;

    match &args.out {
        Some(out) => {
            gradguard::models::files::write_file(out, &text, "writing the policy")?;
            println!("wrote {} for {} ({} layers), hash {}", out.display(), model.label(), names.len(), policy.short_hash());
            for (i, rule) in policy.rules().iter().enumerate() {
                println!("  rule {} '{}': {} on {}", i + 1, rule.name, rule.metric.name(), rule.layers.join(", "));
            }
            if let Some(cap) = policy.settings().ledger_cap_bits {
                println!("  ledger cap: {cap} bits/dim over the run");
            }
            println!("check it: gradguard policy check {} --model {}", out.display(), args.model);
        }
        None => print!("{text}"),
    }
    Ok(())
}
