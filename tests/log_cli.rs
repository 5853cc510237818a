//! On the command line: a second `gradguard demo` with the same `--out` continues the first
//! run's log (never truncates it), and `gradguard log verify` exits 0 on the chain, non-zero
//! naming the line after an edit or a removal, and checks a published head. SIGTERM ends a
//! run between steps with its log closed.
#[path = "support/demo.rs"]
mod demo;

use gradguard::guard::{AuditLog, decide::{verify_chain, DecisionRecord, Outcome}};
use std::path::Path;
use std::process::Command;

fn gradguard(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gradguard")).args(args).output().expect("run gradguard")
}

fn demo(out: &Path, steps: &str) {
    let o = gradguard(&["demo", "--steps", steps, "--metrics-addr", "127.0.0.1:0", "--checkpoint-every", "5", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn verify(args: &[&str]) -> (i32, String) {
    let o = gradguard(&[&["log", "verify"], args].concat());
    (o.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

#[test]
fn a_second_run_continues_the_chain_and_log_verify_names_the_first_bad_line() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("log-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.join("out");
    let log = out.join("audit.jsonl");
    demo(&out, "12");
    let first = std::fs::read(&log).unwrap();
    demo(&out, "0");
    demo(&out, "7");
    let after = std::fs::read(&log).unwrap();
    assert!(after.starts_with(&first) && after.len() > first.len(), "the later runs appended");
    let records = AuditLog::read_chain(&log).unwrap();
    assert_eq!(records.iter().filter(|r| r.outcome == Outcome::Started).count(), 3);
    assert_eq!(records.iter().filter(|r| r.outcome == Outcome::Closed).count(), 3);
    let counted: u64 = records.iter().filter_map(|r| r.checkpoint.as_ref()).flat_map(|c| &c.layers).filter(|t| t.layer == "conv1").map(|t| t.released + t.protected + t.withheld).sum();
    let written = steps_written(&records, "conv1");
    assert_eq!(counted + written, 19, "conv1 decided each of the 12 + 7 steps once");

    let log_arg = log.to_str().unwrap();
    let (code, text) = verify(&[log_arg]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains(&format!("{} record(s) verified", records.len())), "{text}");
    let head = text.lines().find_map(|l| l.strip_prefix("head: ")).unwrap().to_string();
    assert_eq!(verify(&[log_arg, "--head", &head]).0, 0);
    assert_ne!(verify(&[log_arg, "--head", &"0".repeat(64)]).0, 0, "a wrong head fails");

    let lines: Vec<&str> = std::str::from_utf8(&after).unwrap().lines().collect();
    let write = |ls: &[&str]| std::fs::write(&log, ls.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let mut edited = lines.clone();
    let changed = edited[3].replacen("\"time_unix_ms\":", "\"time_unix_ms\":1", 1);
    edited[3] = &changed;
    write(&edited);
    let (code, text) = verify(&[log_arg]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("audit.jsonl line 5") && text.contains("edited"), "{text}");
    let mut removed = lines.clone();
    removed.remove(2);
    write(&removed);
    let (code, text) = verify(&[log_arg]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("line 3") && text.contains("record 2 is missing"), "{text}");
}

#[test]
fn sigterm_ends_a_demo_between_steps_with_its_log_closed_and_its_summary() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("log-cli-term-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.join("out");
    let mut run = demo::Demo::start(&out, 100_000, &["--checkpoint-every", "1000"]);
    let addr = run.live_addr();
    run.wait_steps(addr, 5, std::time::Duration::from_secs(120));
    let status = Command::new("kill").args(["-TERM", &run.pid().to_string()]).status().unwrap();
    assert!(status.success());
    let stopped = run.wait_line("stop requested", std::time::Duration::from_secs(60));
    let at: u64 = stopped.trim_start_matches("step ").split(':').next().unwrap().parse().unwrap();
    run.wait_line("run report: ", std::time::Duration::from_secs(120));
    assert!(run.child.wait().unwrap().success(), "the demo ends normally after a stop");
    let v = verify_chain(&out.join("audit.jsonl")).unwrap();
    assert_eq!((v.broken.clone(), v.closed), (None, true), "{:?}", v.broken);
    // The one checkpoint (every 1000 steps, none due yet) was written at the close: it counts
    // every step run.
    let records = AuditLog::read_chain(out.join("audit.jsonl")).unwrap();
    let counted: u64 = records.iter().filter_map(|r| r.checkpoint.as_ref()).flat_map(|c| &c.layers).filter(|t| t.layer == "conv1").map(|t| t.released + t.protected + t.withheld).sum();
    let written = steps_written(&records, "conv1");
    assert_eq!(counted + written, at, "conv1 decided each of the {at} steps run once");
}

/// The steps with a release record of `layer` written one by one, over every run of the chain
/// (a state change writes one record per rule, and a calibrated rung one more for its sigma):
/// each is one decided step.
fn steps_written(records: &[DecisionRecord], layer: &str) -> u64 {
    let mut run = 0;
    let mut steps = std::collections::BTreeSet::new();
    for r in records {
        if r.outcome == Outcome::Started {
            run += 1;
        } else if r.layer == layer && matches!(r.outcome, Outcome::Released | Outcome::Protected | Outcome::Withheld) {
            steps.insert((run, r.step));
        }
    }
    steps.len() as u64
}
