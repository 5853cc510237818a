//! `gradguard log verify FILE... [--head HASH]`: checks an audit log's hash chain across its
//! rotated files and names the first record that was edited, removed, reordered or cut.
//! Exits 0 only when the whole chain verifies.
//!
//! `gradguard log reset-state LOG --reason TEXT`: an operator's reset of the guard state kept
//! beside a node's audit log, after the node refused to go on (its state missing, rolled back or
//! unreadable): a `state_reset` record in the chain, the old state file moved aside.
use gradguard::guard::decide::{reset_state, state_path, verify_files, Verification};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct LogArgs {
    #[command(subcommand)]
    command: LogCommand,
}

#[derive(clap::Subcommand)]
enum LogCommand {
    /// Check the hash chain of an audit log (a chain's base file stands for all its rotated
    /// files); exits non-zero at the first broken record.
    Verify {
        /// The log's files (audit.jsonl, or audit.jsonl audit.1.jsonl ...), in any order.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The head hash a run's summary printed: catches an edit of the last records too.
        #[arg(long)]
        head: Option<String>,
    },
    /// Reset the guard state kept beside an audit log (`LOG.state.json`): the next start is
    /// fresh (levels 0, step 0, an empty M5 ledger), and the log records who reset it and why.
    ResetState {
        /// The audit log (the chain's base file).
        log: PathBuf,
        /// Why, in words: written to the log.
        #[arg(long)]
        reason: String,
    },
}

pub fn run(args: LogArgs) -> anyhow::Result<()> {
    match args.command {
        LogCommand::Verify { files, head } => {
            let v = verify_files(&files, head.as_deref())?;
            println!("{}", describe(&v));
            match &v.broken {
                None => Ok(()),
                Some(b) => anyhow::bail!("audit log chain broken: {b}"),
            }
        }
        LogCommand::ResetState { log, reason } => {
            let reset = reset_state(&log, &reason)?;
            match reset.moved_to {
                Some(aside) => println!("{}: moved aside to {}", state_path(&log).display(), aside.display()),
                None => println!("{}: no state file to move aside", state_path(&log).display()),
            }
            println!("{}: state_reset recorded; the next start is fresh", log.display());
            Ok(())
        }
    }
}

fn describe(v: &Verification) -> String {
    let files = v.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
    let mut out = format!("{} record(s) verified in {} file(s): {files}", v.records, v.files.len());
    if let Some(head) = &v.head {
        out += &format!("\nhead: {head}");
    }
    if v.torn > 0 {
        out += &format!("\n{} torn line(s) skipped (a writer killed mid-record; never acknowledged)", v.torn);
    }
    if v.broken.is_none() && !v.closed && v.records > 0 {
        out += "\nthe last run did not close the log (still running, or killed): its last checkpoint's counts may be missing";
    }
    out
}
