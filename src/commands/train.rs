//! `gradguard train`: guarded training of a TorchScript model on .npy data
//! (`gradguard::run::train`), for users who do not write Rust. Writes the trained module
//! (`model.pt`, for `torch.jit.load`), `report.json` and, guarded, `audit.jsonl`; shows a
//! progress bar and ends with the summary `gradguard demo` prints.
//!
//! ```text
//! gradguard train --model net.pt --inputs X.npy --labels Y.npy [--attribute A.npy] \
//!     [--policy P.toml] [--steps N] [--batch-size B] [--optimizer sgd|adam] [--lr F] \
//!     [--loss cross-entropy|mse] [--metrics-addr HOST:PORT] [--device cpu|cuda] [--seed S] --out DIR
//! gradguard train ... --no-guard --out DIR      # the unguarded baseline
//! ```
use super::audit::LossArg;
use gradguard::models::{AuditData, DataSpec, ModelSource};
use gradguard::run::{train, GuardOptions, OptimizerKind, PolicyReloader, StopSignal, TrainOptions};
use gradguard::guard::{GuardError, measure::parse_device};
use gradguard::Policy;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// The TorchScript module to train (torch.jit.script or torch.jit.trace output saved with
    /// torch.jit.save).
    #[arg(long)]
    model: PathBuf,
    /// Inputs, .npy float32/float64 [n, ...].
    #[arg(long)]
    inputs: PathBuf,
    /// Labels, .npy: integer class ids [n] (cross-entropy) or floats shaped like the model's
    /// output (mse).
    #[arg(long)]
    labels: PathBuf,
    /// Private attribute, .npy integers [n]; lets the guard measure M2.
    #[arg(long)]
    attribute: Option<PathBuf>,
    /// Policy file (default: none, the guard measures and releases what is finite).
    #[arg(long, conflicts_with = "no_guard")]
    policy: Option<PathBuf>,
    /// Training steps.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Samples per step (at most the number of samples).
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, value_enum, default_value_t = OptimizerArg::Adam)]
    optimizer: OptimizerArg,
    /// Learning rate (default: 1e-3 for adam, 0.05 for sgd).
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long, value_enum, default_value_t = LossArg::CrossEntropy)]
    loss: LossArg,
    /// Serve the guard's metrics here while training (/metrics, /healthz, /report).
    #[arg(long, conflicts_with = "no_guard")]
    metrics_addr: Option<SocketAddr>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Seed of the mini-batch order: the same seed gives the same run.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Rotate the audit log when a file reaches this many bytes.
    #[arg(long, default_value_t = gradguard::guard::decide::DEFAULT_MAX_FILE_BYTES, conflicts_with = "no_guard")]
    audit_max_bytes: u64,
    /// Steps between the audit log's checkpoints (the counts of unchanged releases).
    #[arg(long, default_value_t = gradguard::guard::decide::DEFAULT_CHECKPOINT_EVERY, conflicts_with = "no_guard")]
    checkpoint_every: u64,
    /// Train without the guard (the baseline run): no policy, no audit log.
    #[arg(long)]
    no_guard: bool,
    /// Folder for model.pt, report.json and (guarded) audit.jsonl.
    #[arg(long)]
    out: PathBuf,
}

/// `--optimizer`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum OptimizerArg {
    Sgd,
    Adam,
}

impl OptimizerArg {
    fn name(self) -> &'static str {
        match self {
            Self::Sgd => "sgd",
            Self::Adam => "adam",
        }
    }
}

impl From<OptimizerArg> for OptimizerKind {
    fn from(o: OptimizerArg) -> Self {
        match o {
            OptimizerArg::Sgd => OptimizerKind::Sgd,
            OptimizerArg::Adam => OptimizerKind::Adam,
        }
    }
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device)?;
    let optimizer = OptimizerKind::from(args.optimizer);
    let policy = args.policy.as_deref().map(Policy::load).transpose()?;
    // SIGHUP reloads the policy file between steps (without one, SIGHUP ends the run as usual).
    let reload = match (&args.policy, args.no_guard) {
        (Some(path), false) => Some(PolicyReloader::on_sighup(path)?),
        _ => None,
    };
    // Ctrl-C or SIGTERM ends a guarded run between steps, with its log closed and its summary.
    let stop = (!args.no_guard).then(StopSignal::install).transpose()?;
    let guard = (!args.no_guard).then(|| GuardOptions {
        policy: policy.clone(),
        metrics_addr: args.metrics_addr,
        reload: reload.clone(),
        audit_max_file_bytes: Some(args.audit_max_bytes),
        checkpoint_every: Some(args.checkpoint_every),
        stop,
    });
    let options = TrainOptions {
        steps: args.steps,
        batch_size: args.batch_size,
        optimizer,
        learning_rate: args.lr.unwrap_or(optimizer.default_learning_rate()),
        seed: args.seed,
        device: args.device.clone(),
        guard,
    };
    options.validate()?;
    let mut model = ModelSource::TorchScript(args.model.clone()).load(args.seed, device)?;
    let spec = DataSpec { inputs: Some(args.inputs.clone()), labels: Some(args.labels.clone()), attribute: args.attribute.clone(), samples: None, loss: args.loss.into(), token_ids_without_split: true };
    let data = AuditData::load(&spec, &model, device)?;
    options.check_model(&model)?;
    let discrete = !data.x.f_is_floating_point()? && !model.has_embedding();

    println!(
        "gradguard train: {} on {}, {device:?}; {} lr {}, {} steps of {}, seed {}",
        model.label(),
        data.source,
        args.optimizer.name(),
        options.learning_rate,
        options.steps,
        options.batch_size.min(data.n),
        options.seed
    );
    match &options.guard {
        Some(g) => {
            let policy = policy.unwrap_or_else(Policy::permissive);
            println!("{}", super::progress::guard_header(&model.layer_names()?, &policy, g.metrics_addr, &args.out.join("audit.jsonl")));
            if discrete {
                // The TorchScript model exports no embed / forward_embedded split.
                println!("M1: absent: {}\n", GuardError::DiscreteInputs { kind: format!("{:?}", data.x.kind()) });
            }
            if let Some(r) = &reload {
                println!("policy reload: kill -HUP {} re-reads {}\n", std::process::id(), r.path().display());
            }
        }
        None => println!("guard: off (--no-guard): every step applied, no audit log\n"),
    }

    let bar = super::progress::steps_bar(options.steps);
    let outcome = train(&mut model, &data, &options, &args.out, |p| {
        if let Some(outcome) = p.reload {
            bar.suspend(|| println!("step {}: {outcome}", p.step));
        }
        if let Some(release) = p.release {
            super::progress::show_release(&bar, p.step, release);
        }
        bar.set_message(match p.release {
            Some(_) => format!("loss {:.4}, {}", p.loss, p.counts),
            None => format!("loss {:.4}", p.loss),
        });
        bar.inc(1);
    });
    bar.finish();
    let outcome = outcome?;
    print!("\n{}", outcome.summary);
    if !args.no_guard {
        let html = super::report::write_for_run(&args.out)?;
        println!("run report: {}", html.display());
    }
    println!("model: {} (torch.jit.load)", outcome.model_path.display());
    Ok(())
}
