//! `gradguard report DIR`: a run's `report.json` and audit log as one self-contained HTML
//! page (`DIR/report.html`): per layer each metric over the steps with its threshold, the
//! protection level over time and the decisions marked.
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct ReportArgs {
    /// The run's folder (holds report.json and audit.jsonl).
    dir: PathBuf,
    /// Where to write the page (default DIR/report.html).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let out = args.out.unwrap_or_else(|| args.dir.join("report.html"));
    write(&args.dir, &out)?;
    println!("run report: {}", out.display());
    Ok(())
}

/// Writes `dir/report.html` for a run that just ended; returns its path.
pub fn write_for_run(dir: &Path) -> anyhow::Result<PathBuf> {
    let out = dir.join("report.html");
    write(dir, &out)?;
    Ok(out)
}

fn write(dir: &Path, out: &Path) -> anyhow::Result<()> {
    let html = gradguard::run::run_page::render_dir(dir)?;
    std::fs::write(out, html).map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?;
    Ok(())
}
