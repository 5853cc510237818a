//! Checking an audit chain: every line links to the one before it (`prev` is the hash of the
//! previous line's bytes, the first line's is its own policy hash) and the sequence numbers
//! run 0, 1, 2, ... across the chain's files. The first line that breaks either names what
//! happened: an edit, a removal, a reordering, a truncation.
//!
//! The hash is not keyed: someone who rewrites every line from an edit onwards, recomputing
//! the chain, is caught only by comparing the head with one published earlier (`--head`; the
//! run's summary prints it).
use super::audit_files::{chain_files, split_segment};
use super::audit_read::lines;
use super::audit_record::{line_hash, ChainLink, DecisionRecord, Outcome};
use crate::error::AuditError;
use std::path::{Path, PathBuf};

/// What broke the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakKind {
    /// A line's bytes no longer hash to what the next line holds, or a line does not parse.
    Edited,
    /// Sequence numbers are missing: records were removed.
    Removed,
    /// A sequence number comes after a higher one: records were moved.
    Reordered,
    /// The chain ends in a cut line, or says it goes on in a file that is not there.
    Truncated,
    /// The expected head (`--head`) is not the chain's last hash.
    HeadMismatch,
}

/// The first place the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    /// What happened.
    pub kind: BreakKind,
    /// The file of the first bad record.
    pub file: PathBuf,
    /// Its 1-based line (0: the file as a whole).
    pub line: usize,
    /// What was found, for a person.
    pub detail: String,
}

impl std::fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} line {}: {}", self.file.display(), self.line, self.detail)
    }
}

/// The result of checking a chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Verification {
    /// The files checked, in chain order.
    pub files: Vec<PathBuf>,
    /// Records that verified (up to the first break).
    pub records: u64,
    /// Torn lines left by a writer killed mid-record and closed by the next run (skipped:
    /// never acknowledged, and the chain goes on from the record before them).
    pub torn: usize,
    /// Hash of the last verified record.
    pub head: Option<String>,
    /// Whether the last verified record is a `closed` one (the last run ended cleanly).
    pub closed: bool,
    /// The first break, if any.
    pub broken: Option<ChainBreak>,
}

/// Checks the chain formed by `files` (each expanded to its whole chain when it is a chain's
/// base; sorted into chain order; duplicates dropped). `expected_head`, when given, must be
/// the last record's hash.
pub fn verify_files(files: &[PathBuf], expected_head: Option<&str>) -> Result<Verification, AuditError> {
    let mut ordered: Vec<(PathBuf, u32, PathBuf)> = Vec::new();
    for f in files {
        let listed = if split_segment(f).1 == 0 { chain_files(f) } else { vec![f.clone()] };
        let listed = if listed.is_empty() { vec![f.clone()] } else { listed };
        for p in listed {
            let (base, index) = split_segment(&p);
            if !ordered.iter().any(|(_, _, q)| *q == p) {
                ordered.push((base, index, p));
            }
        }
    }
    ordered.sort();
    let files: Vec<PathBuf> = ordered.into_iter().map(|(_, _, p)| p).collect();
    let mut v = Verification { files: files.clone(), records: 0, torn: 0, head: None, closed: false, broken: None };
    // Every sequence number in the files, to tell a record moved from one removed.
    let mut present = std::collections::HashSet::new();
    for file in &files {
        let bytes = std::fs::read(file).map_err(|source| AuditError::Read { path: file.clone(), source })?;
        present.extend(lines(&bytes).filter_map(|l| serde_json::from_slice::<ChainLink>(l.bytes).ok()).map(|l| l.seq));
    }
    let mut expected_seq = 0u64;
    let mut continued_in: Option<String> = None;
    'files: for (i, file) in files.iter().enumerate() {
        let bytes = std::fs::read(file).map_err(|source| AuditError::Read { path: file.clone(), source })?;
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some(next) = continued_in.take() {
            if next != name {
                v.broken = Some(ChainBreak { kind: BreakKind::Truncated, file: file.clone(), line: 1, detail: format!("the chain went on in {next}, which is missing (found {name} next)") });
                break;
            }
        }
        let last_file = i + 1 == files.len();
        let mut all = lines(&bytes).peekable();
        while let Some(line) = all.next() {
            if line.blank() {
                continue;
            }
            let at = |kind, detail: String| Some(ChainBreak { kind, file: file.clone(), line: line.number, detail });
            let parsed = serde_json::from_slice::<ChainLink>(line.bytes).and_then(|link| serde_json::from_slice::<DecisionRecord>(line.bytes).map(|r| (link, r)));
            let (link, record) = match parsed {
                Ok(x) => x,
                Err(_) if !line.terminated && last_file && all.peek().is_none() => {
                    v.broken = at(BreakKind::Truncated, "the last line is cut short (a writer killed mid-record, or the file was cut)".into());
                    break 'files;
                }
                // A torn write closed by the next run: the chain goes on from the line before.
                Err(e) if e.is_eof() => {
                    v.torn += 1;
                    continue;
                }
                Err(e) => {
                    v.broken = at(BreakKind::Edited, format!("not a chained record ({e})"));
                    break 'files;
                }
            };
            if link.seq > expected_seq && present.contains(&expected_seq) {
                v.broken = at(BreakKind::Reordered, format!("record {} comes before record {expected_seq}, which is further on (moved)", link.seq));
                break 'files;
            }
            if link.seq > expected_seq {
                let detail = if expected_seq + 1 == link.seq { format!("record {expected_seq} is missing (removed)") } else { format!("records {expected_seq}..{} are missing (removed)", link.seq - 1) };
                v.broken = at(BreakKind::Removed, detail);
                break 'files;
            }
            if link.seq < expected_seq {
                v.broken = at(BreakKind::Reordered, format!("record {} comes after record {} (moved)", link.seq, expected_seq - 1));
                break 'files;
            }
            let expected_prev = v.head.clone().unwrap_or_else(|| record.policy_hash.clone());
            if link.prev != expected_prev {
                let detail = match v.head {
                    Some(_) => format!("record {} does not link to the line before it: that line (record {}) or this one was edited", link.seq, link.seq.saturating_sub(1)),
                    None => "the chain's first record does not start from its policy hash (edited)".to_string(),
                };
                v.broken = at(BreakKind::Edited, detail);
                break 'files;
            }
            v.head = Some(line_hash(line.bytes));
            v.records += 1;
            v.closed = record.outcome == Outcome::Closed;
            expected_seq += 1;
            continued_in = (record.outcome == Outcome::Rotated).then(|| record.reason.as_deref().and_then(|r| r.strip_prefix("continued in ")).unwrap_or("").to_string());
        }
    }
    if v.broken.is_none() {
        if let (Some(next), Some(last)) = (continued_in, files.last()) {
            v.broken = Some(ChainBreak { kind: BreakKind::Truncated, file: last.clone(), line: 0, detail: format!("the chain goes on in {next}, which was not given or is missing") });
        }
    }
    if v.broken.is_none() {
        if let Some(want) = expected_head {
            if v.head.as_deref() != Some(want) {
                let file = files.last().cloned().unwrap_or_default();
                v.broken = Some(ChainBreak { kind: BreakKind::HeadMismatch, file, line: 0, detail: format!("the chain's head is {}, expected {want}: its last records were edited or removed", v.head.as_deref().unwrap_or("(empty)")) });
            }
        }
    }
    Ok(v)
}

/// [`verify_files`] of the one chain that starts at `base`.
pub fn verify_chain(base: &Path) -> Result<Verification, AuditError> {
    verify_files(&[base.to_path_buf()], None)
}
