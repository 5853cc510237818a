//! The audit log: every decision of the guard as one JSON line in an append-only file.
//!
//! # Acknowledgement
//! [`AuditLog::record`] serialises the record into one buffer (the JSON text plus `'\n'`) and
//! hands it to the kernel with a single `write_all` on a file opened with `O_APPEND`, then
//! flushes, before it returns. A returned `Ok` therefore means the record is in the file: it
//! survives the process being killed (SIGKILL, a panic with `abort`, an OOM kill) at any later
//! point, because the bytes are in the kernel's page cache, which belongs to the file and not
//! to the process.
//!
//! # Why `sync_data` is not the default
//! Surviving an operating-system crash or a power loss needs `fsync`/`fdatasync`, which costs a
//! disk round trip (often milliseconds, far more on network storage) per record; the guard
//! writes one record per layer per decision, inside the training loop. The default
//! ([`Durability::Process`]) protects against the failure the log is mostly for (the training
//! process dying) at the cost of a system call. [`Durability::Disk`] (via
//! [`AuditLog::open_with`]) adds `sync_data` after every record, and syncs the parent folder
//! when the file is created, for deployments that must keep decisions across a machine crash.
//!
//! # Torn records
//! A process killed in the middle of a write can leave an unterminated fragment at the end of
//! the file. Such a fragment was never acknowledged. Readers skip it and report it
//! ([`LogContents::skipped`]); [`AuditLog::open`] terminates it with a `'\n'` before appending,
//! so the next record starts on its own line. No byte of the file is ever rewritten or removed.
//! A terminated line that is a torn record (valid JSON cut short) is skipped and counted as
//! well; any other line that does not parse is corruption and an error.
//!
//! One writer per file: two processes appending to the same log are not supported.
use crate::error::AuditError;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// What happened to a layer (or to the whole release, layer `"*"`) at a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Released without protection.
    Released,
    /// Released with the protection in force (unchanged level).
    Protected,
    /// The protection level went up.
    Escalated,
    /// The protection level went down.
    Relaxed,
    /// The layer was left out of the release.
    Withheld,
    /// Nothing released yet (e.g. accumulating samples up to the aggregation floor).
    Pending,
    /// The whole release was refused.
    Blocked,
}

impl Outcome {
    /// The outcome's name as written in the log, e.g. `"withheld"`.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Released => "released",
            Outcome::Protected => "protected",
            Outcome::Escalated => "escalated",
            Outcome::Relaxed => "relaxed",
            Outcome::Withheld => "withheld",
            Outcome::Pending => "pending",
            Outcome::Blocked => "blocked",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One decision of the guard: one line of the audit log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DecisionRecord {
    /// Wall-clock time of the decision, milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    /// Training step.
    pub step: u64,
    /// Layer name, or `"*"` for a release-wide decision.
    pub layer: String,
    /// The policy rule that decided, if any.
    pub rule: Option<String>,
    /// METRICS.md name of the metric, e.g. `"sensitivity_rms"`.
    pub metric: Option<String>,
    /// Measured value, on the release after the action; `None` if not measured. Written with
    /// the shortest representation that round-trips; serde_json reads it back exactly only
    /// with its `float_roundtrip` feature (otherwise possibly 1 ulp off).
    pub value: Option<f64>,
    /// The rule's threshold the value was compared with (act_above, or relax_below when relaxing).
    pub threshold: Option<f64>,
    /// Ladder rung in force (0 = unprotected).
    pub level: usize,
    /// The action applied, e.g. `"clip(max_norm=1)"`, `"none"`, `"withhold"`,
    /// `"aggregate(factor=2)"`, `"block"`.
    pub action: String,
    /// What the decision did to the layer (or the release).
    pub outcome: Outcome,
    /// Why, where the outcome needs explaining (an absent metric, an exhausted ladder, a block).
    pub reason: Option<String>,
    /// sha256 (hex) of the policy text in force.
    pub policy_hash: String,
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}


/// How far an acknowledged record survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// In the kernel before `record` returns: survives the process being killed, not an OS
    /// crash or a power loss. One system call per record.
    #[default]
    Process,
    /// `sync_data` after every record: survives an OS crash or a power loss too, at the cost
    /// of a disk round trip per record.
    Disk,
}

/// What a reader found in a log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogContents {
    /// The complete records, in file order.
    pub records: Vec<DecisionRecord>,
    /// Torn (never acknowledged) records that were skipped: an unterminated last line, or a
    /// terminated line that is valid JSON cut short (a torn tail that a later `open` closed).
    pub skipped: usize,
    /// 1-based line numbers of the skipped fragments.
    pub skipped_lines: Vec<usize>,
}

/// An append-only JSON-lines decision log.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    durability: Durability,
    buf: Vec<u8>,
}

impl AuditLog {
    /// Opens (creating it and its parent folders if needed) `path` for appending, with
    /// [`Durability::Process`]. Existing records are kept.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, AuditError> {
        Self::open_with(path, Durability::default())
    }

    /// Like [`AuditLog::open`], with the given durability of each acknowledged record.
    pub fn open_with(path: impl AsRef<Path>, durability: Durability) -> Result<Self, AuditError> {
        let path = path.as_ref().to_path_buf();
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(dir) = parent {
            std::fs::create_dir_all(dir).map_err(|source| AuditError::CreateDir { path: path.clone(), source })?;
        }
        let existed = path.exists();
        let open_err = |source| AuditError::Open { path: path.clone(), source };
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(&path).map_err(open_err)?;
        // Close a torn tail left by a process killed mid-write, so the next record starts on
        // its own line. Appending only: the fragment stays, readers skip it.
        let len = file.metadata().map_err(open_err)?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1)).and_then(|_| file.read_exact(&mut last)).map_err(open_err)?;
            if last[0] != b'\n' {
                file.write_all(b"\n").map_err(open_err)?;
                if durability == Durability::Disk {
                    file.sync_data().map_err(open_err)?;
                }
            }
        }
        if durability == Durability::Disk && !existed {
            // The new file's directory entry must reach the disk too.
            if let Some(dir) = parent {
                File::open(dir).and_then(|d| d.sync_all()).map_err(open_err)?;
            }
        }
        Ok(Self { path, file, durability, buf: Vec::with_capacity(512) })
    }

    /// The log file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How far each acknowledged record survives.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Appends one record as one line. Returns `Ok` only once the whole line is in the file
    /// (see the module documentation for what survives what).
    pub fn record(&mut self, record: &DecisionRecord) -> Result<(), AuditError> {
        self.buf.clear();
        serde_json::to_writer(&mut self.buf, record).map_err(|source| AuditError::Encode {
            path: self.path.clone(),
            step: record.step,
            layer: record.layer.clone(),
            source,
        })?;
        self.buf.push(b'\n');
        let write_err = |source| AuditError::Write {
            path: self.path.clone(),
            step: record.step,
            layer: record.layer.clone(),
            source,
        };
        self.file.write_all(&self.buf).map_err(write_err)?;
        self.file.flush().map_err(write_err)?;
        if self.durability == Durability::Disk {
            self.file.sync_data().map_err(write_err)?;
        }
        Ok(())
    }

    /// Every complete record of the log at `path`, skipping torn fragments (see
    /// [`AuditLog::read_log`] for how many were skipped).
    pub fn read_all(path: impl AsRef<Path>) -> Result<Vec<DecisionRecord>, AuditError> {
        Ok(Self::read_log(path)?.records)
    }

    /// Reads the log: complete records plus the number of torn fragments skipped. A complete
    /// line that is not a record (and not a torn one) is an [`AuditError::Corrupt`].
    pub fn read_log(path: impl AsRef<Path>) -> Result<LogContents, AuditError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| AuditError::Read { path: path.to_path_buf(), source })?;
        let mut contents = LogContents { records: Vec::new(), skipped: 0, skipped_lines: Vec::new() };
        let mut rest: &[u8] = &bytes;
        let mut line_no = 0;
        while !rest.is_empty() {
            line_no += 1;
            let (line, terminated) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let line = &rest[..i];
                    rest = &rest[i + 1..];
                    (line, true)
                }
                None => {
                    let line = rest;
                    rest = &[];
                    (line, false)
                }
            };
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            match serde_json::from_slice::<DecisionRecord>(line) {
                Ok(r) => contents.records.push(r),
                // The unterminated last line, whatever it holds, was never acknowledged.
                Err(_) if !terminated => {
                    contents.skipped += 1;
                    contents.skipped_lines.push(line_no);
                }
                // A terminated torn record: JSON cut short, closed by a later `open`.
                Err(e) if e.is_eof() => {
                    contents.skipped += 1;
                    contents.skipped_lines.push(line_no);
                }
                Err(e) => {
                    return Err(AuditError::Corrupt { path: path.to_path_buf(), line: line_no, why: e.to_string() });
                }
            }
        }
        Ok(contents)
    }
}
