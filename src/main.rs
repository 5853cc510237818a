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
    /// Train the digits CNN on the shipped data with the guard on, printing per-layer leakage.
    Demo(commands::demo::DemoArgs),
    /// Validate a policy file and show what its rules cover.
    Policy(commands::policy::PolicyArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => commands::demo::run(args),
        Command::Policy(args) => commands::policy::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
