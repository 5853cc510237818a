//! The audit log's hash chain: `verify_chain` names the first record that was edited,
//! removed, reordered or cut, across rotated files; reopening continues the chain; rotation
//! bounds each file.
use gradguard_guard::{AuditLog, decide::{chain_files, line_hash, segment_path, verify_chain, verify_files, BreakKind, DecisionRecord, LogOptions, Outcome}};
use std::path::{Path, PathBuf};

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("chain-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const POLICY: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn record(step: u64) -> DecisionRecord {
    let mut r = DecisionRecord::event(step, Outcome::Escalated, POLICY, Some(format!("step {step}")));
    r.layer = "conv1".into();
    r.action = "clip(max_norm=1)".into();
    r.value = Some(0.25 + step as f64);
    r
}

fn write(path: &Path, steps: std::ops::Range<u64>, options: LogOptions) {
    let mut log = AuditLog::open_options(path, options).unwrap();
    for s in steps {
        log.record(&record(s)).unwrap();
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap().lines().map(String::from).collect()
}

fn rewrite(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

#[test]
fn an_intact_chain_verifies_from_the_policy_hash_and_reopening_continues_it() {
    let dir = scratch("intact");
    let path = dir.join("audit.jsonl");
    write(&path, 0..5, LogOptions::default());
    write(&path, 5..8, LogOptions::default());
    let v = verify_chain(&path).unwrap();
    assert_eq!((v.records, v.broken.clone()), (8, None));
    let all = lines(&path);
    assert_eq!(all.len(), 8, "the second writer appended");
    let first: serde_json::Value = serde_json::from_str(&all[0]).unwrap();
    assert_eq!((first["seq"].as_u64(), first["prev"].as_str()), (Some(0), Some(POLICY)));
    let second: serde_json::Value = serde_json::from_str(&all[1]).unwrap();
    assert_eq!(second["prev"].as_str().unwrap(), line_hash(all[0].as_bytes()));
    assert_eq!(v.head.as_deref(), Some(line_hash(all[7].as_bytes()).as_str()));
    // The published head catches an edit of the last record, which nothing after it links.
    assert!(verify_files(std::slice::from_ref(&path), v.head.as_deref()).unwrap().broken.is_none());
    let mut edited = all.clone();
    edited[7] = edited[7].replace("\"step 7\"", "\"step 70\"");
    rewrite(&path, &edited);
    assert!(verify_chain(&path).unwrap().broken.is_none(), "the unkeyed chain alone cannot see an edit of its last line");
    assert_eq!(verify_files(std::slice::from_ref(&path), v.head.as_deref()).unwrap().broken.unwrap().kind, BreakKind::HeadMismatch);
}

#[test]
fn an_edit_a_removal_a_reordering_and_a_cut_are_each_named_at_the_first_bad_record() {
    let dir = scratch("tamper");
    let path = dir.join("audit.jsonl");
    write(&path, 0..6, LogOptions::default());
    let all = lines(&path);
    let check = |changed: Vec<String>, kind: BreakKind, line: usize| {
        rewrite(&path, &changed);
        let v = verify_chain(&path).unwrap();
        let b = v.broken.clone().unwrap_or_else(|| panic!("{kind:?} not detected"));
        assert_eq!((b.kind, b.line), (kind, line), "{b}");
        assert!(b.to_string().contains("audit.jsonl line"), "{b}");
        assert_eq!(v.records as usize, line - 1, "the records before the break verify");
    };
    // Edited: a value changed in record 2 breaks the link from record 3.
    let mut edited = all.clone();
    edited[2] = edited[2].replace("\"value\":2.25", "\"value\":0.01");
    assert_ne!(edited[2], all[2]);
    check(edited, BreakKind::Edited, 4);
    // Removed: record 3 is gone; record 4 follows record 2.
    let mut removed = all.clone();
    removed.remove(3);
    check(removed, BreakKind::Removed, 4);
    // Reordered: records 3 and 4 swapped.
    let mut swapped = all.clone();
    swapped.swap(3, 4);
    check(swapped, BreakKind::Reordered, 4);
    let mut moved = all.clone();
    let r1 = moved.remove(1);
    moved.insert(4, r1);
    check(moved, BreakKind::Reordered, 2);
    let mut back = all.clone();
    back.push(all[2].clone());
    check(back, BreakKind::Reordered, 7);
    // The first record removed: the chain no longer starts at 0.
    check(all[1..].to_vec(), BreakKind::Removed, 1);
    // Cut: the last line ends mid-record.
    let mut text: String = all.iter().map(|l| format!("{l}\n")).collect();
    text.truncate(text.len() - 30);
    std::fs::write(&path, text).unwrap();
    let v = verify_chain(&path).unwrap();
    assert_eq!((v.broken.unwrap().kind, v.records), (BreakKind::Truncated, 5));
    // Garbage in place of a record.
    let mut garbage = all.clone();
    garbage[2] = "{\"seq\": \"two\"}".into();
    check(garbage, BreakKind::Edited, 3);
}

#[test]
fn rotation_bounds_each_file_and_the_chain_runs_across_files() {
    let dir = scratch("rotate");
    let path = dir.join("audit.jsonl");
    let options = LogOptions { max_file_bytes: 1200, ..LogOptions::default() };
    write(&path, 0..20, options);
    // A second run continues in the last file, it does not start the base file again.
    write(&path, 20..30, options);
    let files = chain_files(&path);
    assert!(files.len() >= 4, "rotated into {files:?}");
    assert_eq!(files[0], path);
    assert_eq!(files[1], segment_path(&path, 1));
    let one_record = lines(&path)[0].len() as u64 + 1;
    for f in &files {
        let size = std::fs::metadata(f).unwrap().len();
        // A file ends with the record that crossed the limit and the rotation marker.
        assert!(size <= 1200 + 2 * one_record + 200, "{} is {size} bytes", f.display());
        let records = AuditLog::read_all(f).unwrap();
        if f != files.last().unwrap() {
            assert_eq!(records.last().unwrap().outcome, Outcome::Rotated, "{}", f.display());
        }
    }
    let steps: Vec<u64> = AuditLog::read_chain(&path).unwrap().iter().filter(|r| r.outcome == Outcome::Escalated).map(|r| r.step).collect();
    assert_eq!(steps, (0..30).collect::<Vec<_>>(), "no record lost across files");
    let v = verify_chain(&path).unwrap();
    assert_eq!(v.broken, None);
    assert_eq!(v.files, files);
    // Any order of the files on the command line is the chain's order.
    let mut shuffled = files.clone();
    shuffled.reverse();
    assert_eq!(verify_files(&shuffled, None).unwrap().broken, None);
    // A middle file removed: the file after it does not continue the chain.
    std::fs::remove_file(&files[1]).unwrap();
    let b = verify_chain(&path).unwrap().broken.unwrap();
    assert_eq!(b.kind, BreakKind::Truncated, "{b}");
    assert!(b.detail.contains("audit.1.jsonl"), "{b}");
    // The last file removed: the chain says it went on.
    let dir2 = scratch("rotate-tail");
    let path2 = dir2.join("audit.jsonl");
    write(&path2, 0..20, options);
    let files2 = chain_files(&path2);
    std::fs::remove_file(files2.last().unwrap()).unwrap();
    let b = verify_chain(&path2).unwrap().broken.unwrap();
    assert_eq!(b.kind, BreakKind::Truncated, "{b}");
}
