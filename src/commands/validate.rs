//! `gradguard validate --out docs/`: the validation study of docs/VALIDATION.md
//! (`gradguard::validation::run_validation`). Trains the example CNN and MLP on the shipped
//! digits, measures every metric per layer at three checkpoints, sweeps the batch size and two
//! defences, and writes VALIDATION.md with its SVG figures.
use gradguard::validation::{run_validation, ValidationOptions};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ValidateArgs {
    /// Folder for VALIDATION.md; the figures go to its `validation/` subfolder.
    #[arg(long, default_value = "docs")]
    out: PathBuf,
    /// Seed of the models, the data order, probes, splits, projections and attacks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Smaller sample counts and fewer attack steps: a smoke run (minutes -> seconds), not the
    /// study.
    #[arg(long)]
    quick: bool,
    /// libtorch intra-op threads (the models are tiny: 1 is fastest on 2 shared cores).
    #[arg(long, default_value_t = 1)]
    threads: i32,
}

pub fn run(args: ValidateArgs) -> anyhow::Result<()> {
    let options = ValidationOptions { out: args.out, seed: args.seed, quick: args.quick, threads: args.threads };
    let summary = run_validation(&options, &mut |done| eprintln!("validate: {done}"))?;
    println!("validation study written to {} (figures in {}), {:.0}s", summary.markdown.display(), summary.figures.display(), summary.seconds);
    Ok(())
}
