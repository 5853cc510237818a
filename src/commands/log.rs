//! `gradguard log verify FILE... [--head HASH]`: checks an audit log's hash chain across its
//! rotated files and names the first record that was edited, removed, reordered or cut.
//! Exits 0 only when the whole chain verifies.
use gradguard::guard::decide::{verify_files, Verification};
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
