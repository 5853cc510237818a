//! The `gradguard` command line.
use clap::{Parser, Subcommand};

mod commands;

#[derive(Parser)]
#[command(name = "gradguard", version, about = "Per-layer gradient leakage guard for tch training runs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Audit a model (TorchScript file or built-in) on data: per-layer M1-M4 leakage, table, JSON and SVG.
    Audit(commands::audit::AuditArgs),
    /// Run the validation study (cheap metrics against the attacks) and write docs/VALIDATION.md.
    Validate(commands::validate::ValidateArgs),
    /// Train the digits CNN on the shipped data with the guard on, printing per-layer leakage.
    Demo(commands::demo::DemoArgs),
    /// Train a TorchScript model on .npy data with the guard on (or --no-guard): model.pt, report.json, audit.jsonl.
    Train(commands::train::TrainArgs),
    /// Validate a policy file and show what its rules cover.
    Policy(commands::policy::PolicyArgs),
    /// Audit log tools: `log verify FILE...` checks the hash chain.
    Log(commands::log::LogArgs),
    /// Turn a run's report.json and audit log into one self-contained HTML page.
    Report(commands::report::ReportArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Audit(args) => commands::audit::run(args),
        Command::Validate(args) => commands::validate::run(args),
        Command::Demo(args) => commands::demo::run(args),
        Command::Train(args) => commands::train::run(args),
        Command::Policy(args) => commands::policy::run(args),
        Command::Log(args) => commands::log::run(args),
        Command::Report(args) => commands::report::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
