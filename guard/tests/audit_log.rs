//! The audit log: acknowledged records survive SIGKILL, every complete line parses, reopening
//! appends, torn tails are skipped and reported.
use gradguard_guard::{AuditLog, decide::{verify_chain, BreakKind, DecisionRecord, Outcome}, error::AuditError};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Set in the child process: the log path to append to.
const CHILD_ENV: &str = "GRADGUARD_AUDIT_TEST_CHILD_LOG";
const ACKS_BEFORE_KILL: u64 = 200;

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("audit-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn record(step: u64, layer: &str) -> DecisionRecord {
    DecisionRecord {
        time_unix_ms: gradguard_guard::decide::unix_ms_now(),
        step,
        layer: layer.into(),
        rule: Some("first-layer".into()),
        metric: Some("sensitivity_rms".into()),
        value: Some(0.0123 + step as f64 * 1e-6),
        threshold: Some(0.01),
        level: (step % 5) as usize,
        action: "clip(max_norm=1)".into(),
        outcome: Outcome::Protected,
        reason: Some("sensitivity_rms 0.0123 above act_above 0.01: \"escalate\" \u{2192} rung 1".into()),
        policy_hash: "0123456789abcdef".repeat(4),
        previous_policy_hash: None,
        checkpoint: None,
    }
}

/// Child mode only (a no-op in a normal test run): appends records in a tight loop and prints
/// `ack <step>` after each `record` returns, until the parent kills it.
#[test]
fn child_writer() {
    let Some(path) = std::env::var_os(CHILD_ENV) else { return };
    let mut log = AuditLog::open(&path).expect("child opens the log");
    let stdout = std::io::stdout();
    let started = Instant::now();
    for step in 0.. {
        log.record(&record(step, "conv1")).expect("child records");
        let mut out = stdout.lock();
        writeln!(out, "ack {step}").expect("child prints");
        out.flush().expect("child flushes");
        // A safety net should the parent die without killing us.
        if started.elapsed() > Duration::from_secs(120) {
            break;
        }
    }
}

#[test]
fn acknowledged_records_survive_sigkill() {
    let dir = scratch("sigkill");
    let path = dir.join("nested").join("decisions.jsonl");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the child writer");
    let stdout = child.stdout.take().unwrap();
    let mut acked = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read the child's stdout");
        if let Some(n) = line.strip_prefix("ack ") {
            acked.push(n.trim().parse::<u64>().expect("an ack is a step number"));
            if acked.len() as u64 >= ACKS_BEFORE_KILL {
                break;
            }
        }
    }
    if (acked.len() as u64) < ACKS_BEFORE_KILL {
        let out = child.wait_with_output().unwrap();
        panic!("the child stopped after {} acks: {}", acked.len(), String::from_utf8_lossy(&out.stderr));
    }
    // Kill while it is still writing (std's kill is SIGKILL on unix).
    child.kill().expect("SIGKILL the child");
    let status = child.wait().unwrap();
    assert!(!status.success(), "the child was killed, not finished: {status:?}");
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
    }

    // Every complete line parses (read_log errors on a corrupt complete line); at most the
    // last, unterminated line is a torn fragment.
    let contents = AuditLog::read_log(&path).expect("every complete line parses");
    assert!(contents.skipped <= 1, "at most one torn tail, got {:?}", contents.skipped_lines);
    let steps: Vec<u64> = contents.records.iter().map(|r| r.step).collect();
    // Records are in write order, none lost or duplicated.
    assert_eq!(steps, (0..steps.len() as u64).collect::<Vec<_>>());
    for &a in &acked {
        assert!(steps.contains(&a), "acknowledged step {a} missing from the log ({} records)", steps.len());
    }
    assert!(steps.len() >= acked.len());
    // The chain verifies up to the last complete record; at most a cut last line follows.
    let chain = verify_chain(&path).expect("the log reads");
    assert_eq!(chain.records as usize, contents.records.len(), "every complete record verifies: {:?}", chain.broken);
    match &chain.broken {
        None => assert_eq!(contents.skipped, 0),
        Some(b) => {
            assert_eq!((b.kind, contents.skipped), (BreakKind::Truncated, 1), "{b}");
            assert_eq!(b.line, contents.skipped_lines[0]);
        }
    }
    // A new writer closes the torn tail and continues the chain, which then verifies whole.
    {
        let mut log = AuditLog::open(&path).unwrap();
        log.record(&record(steps.len() as u64, "conv1")).unwrap();
    }
    let chain = verify_chain(&path).unwrap();
    assert_eq!((chain.broken.clone(), chain.records as usize), (None, contents.records.len() + 1), "{:?}", chain.broken);
    assert_eq!(chain.torn, contents.skipped);
    // The records read back equal what was written (bar the clock, and floats to the last
    // bit: serde_json without its `float_roundtrip` feature may parse 1 ulp off).
    for r in &contents.records {
        let mut expected = record(r.step, "conv1");
        expected.time_unix_ms = r.time_unix_ms;
        let (v, e) = (r.value.unwrap(), expected.value.unwrap());
        assert!((v - e).abs() <= 2.0 * f64::EPSILON * e.abs(), "value {v} vs {e}");
        expected.value = r.value;
        assert_eq!(r, &expected);
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn reopening_appends_and_does_not_truncate() {
    let dir = scratch("reopen");
    let path = dir.join("a").join("b").join("log.jsonl");
    {
        let mut log = AuditLog::open(&path).unwrap();
        for s in 0..3 {
            log.record(&record(s, "conv1")).unwrap();
        }
    }
    assert_eq!(AuditLog::read_all(&path).unwrap().len(), 3);
    {
        let mut log = AuditLog::open(&path).unwrap();
        for s in 3..5 {
            log.record(&record(s, "*")).unwrap();
        }
    }
    let records = AuditLog::read_all(&path).unwrap();
    assert_eq!(records.iter().map(|r| r.step).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    assert_eq!(records[4].layer, "*");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 5);
    assert!(text.ends_with('\n'));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn torn_tail_is_skipped_and_reported_and_the_next_record_starts_a_line() {
    let dir = scratch("torn");
    let path = dir.join("log.jsonl");
    {
        let mut log = AuditLog::open(&path).unwrap();
        log.record(&record(0, "conv1")).unwrap();
        log.record(&record(1, "conv1")).unwrap();
    }
    // Simulate a process killed mid-write: half a record, no newline.
    let full = serde_json::to_string(&record(2, "conv1")).unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(&full.as_bytes()[..full.len() / 2])
        .unwrap();
    let contents = AuditLog::read_log(&path).unwrap();
    assert_eq!(contents.records.len(), 2);
    assert_eq!((contents.skipped, contents.skipped_lines.clone()), (1, vec![3]));
    assert_eq!(AuditLog::read_all(&path).unwrap().len(), 2);

    // Reopening closes the fragment (without removing it) and appends after it.
    let before = std::fs::read(&path).unwrap();
    {
        let mut log = AuditLog::open(&path).unwrap();
        log.record(&record(3, "conv2")).unwrap();
    }
    let after = std::fs::read(&path).unwrap();
    assert!(after.starts_with(&before), "nothing already in the file is rewritten");
    let contents = AuditLog::read_log(&path).unwrap();
    assert_eq!(contents.records.iter().map(|r| r.step).collect::<Vec<_>>(), vec![0, 1, 3]);
    assert_eq!((contents.skipped, contents.skipped_lines), (1, vec![3]));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_corrupt_complete_line_is_an_error_naming_path_and_line() {
    let dir = scratch("corrupt");
    let path = dir.join("log.jsonl");
    {
        let mut log = AuditLog::open(&path).unwrap();
        log.record(&record(0, "conv1")).unwrap();
    }
    std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"step\": \"not a record\"}\n").unwrap();
    let err = AuditLog::read_all(&path).unwrap_err();
    assert!(matches!(err, AuditError::Corrupt { line: 2, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("log.jsonl") && msg.contains("line 2"), "{msg}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn record_format_is_one_snake_case_json_object_per_line() {
    let dir = scratch("format");
    let path = dir.join("log.jsonl");
    let mut log = AuditLog::open(&path).unwrap();
    let mut r = record(7, "*");
    r.outcome = Outcome::Blocked;
    r.value = None;
    log.record(&r).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
    assert_eq!(v["outcome"], "blocked");
    assert_eq!(v["layer"], "*");
    assert!(v["value"].is_null());
    assert_eq!(text.matches('\n').count(), 1);
    let missing = AuditLog::read_all(dir.join("absent.jsonl")).unwrap_err();
    assert!(matches!(missing, AuditError::Read { .. }) && missing.to_string().contains("absent.jsonl"));
    std::fs::remove_dir_all(&dir).ok();
}
