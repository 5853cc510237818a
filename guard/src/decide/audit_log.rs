//! The audit log: the guard's records as JSON lines in append-only files, each line linked to
//! the one before it by a hash, rotated by size.
//!
//! # The chain
//! Each line starts with `seq` (0, 1, 2, ... across files and runs) and `prev`, the sha256
//! (hex) of the previous line's bytes; the chain's first line carries its own policy hash.
//! [`AuditLog::open`] never truncates: it finds the chain's last complete line (in the base
//! file or the last rotated one) and continues from it. A file that reaches
//! [`LogOptions::max_file_bytes`] ends with a `rotated` record naming the next file
//! (`audit.jsonl` -> `audit.1.jsonl` -> `audit.2.jsonl` ...). `verify_files` checks it all.
//! What the guard writes, and what it only counts, is `audit_trail.rs`'s business.
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
//! disk round trip (often milliseconds, far more on network storage) per record, inside the
//! training loop. The default
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
use super::audit_files::{chain_files, segment_path};
use super::audit_read::lines;
use super::audit_record::{line_hash, ChainLink, ChainedLine};
pub use super::audit_record::{unix_ms_now, Checkpoint, DecisionRecord, LayerTally, Outcome};
use crate::error::AuditError;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Where a rotated file ends by default: 64 MiB.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 64 << 20;

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

/// How a log is written: durability of each record and where a file is rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// How far each acknowledged record survives.
    pub durability: Durability,
    /// A file that reaches this size ends with a `rotated` record and the chain goes on in the
    /// next file (`audit.1.jsonl`, ...). A file exceeds it by at most one record.
    pub max_file_bytes: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self { durability: Durability::default(), max_file_bytes: DEFAULT_MAX_FILE_BYTES }
    }
}

/// An append-only, hash-chained JSON-lines log, rotated by size.
#[derive(Debug)]
pub struct AuditLog {
    base: PathBuf,
    index: u32,
    path: PathBuf,
    file: File,
    size: u64,
    options: LogOptions,
    /// The next record's place in the chain and the hash it links to (None: the chain is
    /// empty and starts from the first record's policy hash).
    seq: u64,
    head: Option<String>,
    buf: Vec<u8>,
}

impl AuditLog {
    /// Opens (creating it and its parent folders if needed) the chain that starts at `path`
    /// for appending, with [`Durability::Process`] and the default rotation size. Existing
    /// records are kept: the new records continue the chain in its last file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, AuditError> {
        Self::open_options(path, LogOptions::default())
    }

    /// Like [`AuditLog::open`], with the given durability of each acknowledged record.
    pub fn open_with(path: impl AsRef<Path>, durability: Durability) -> Result<Self, AuditError> {
        Self::open_options(path, LogOptions { durability, ..LogOptions::default() })
    }

    /// Like [`AuditLog::open`], with every option given.
    pub fn open_options(path: impl AsRef<Path>, options: LogOptions) -> Result<Self, AuditError> {
        let base = path.as_ref().to_path_buf();
        if options.max_file_bytes == 0 {
            return Err(AuditError::Open { path: base, source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "max_file_bytes must be at least 1") });
        }
        if let Some(dir) = base.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| AuditError::CreateDir { path: base.clone(), source })?;
        }
        let files = chain_files(&base);
        // The chain continues after its last complete record, wherever that is.
        let mut seq = 0;
        let mut head = None;
        for file in files.iter().rev() {
            let bytes = std::fs::read(file).map_err(|source| AuditError::Read { path: file.clone(), source })?;
            if let Some((link, hash)) = last_link(&bytes) {
                seq = link.seq + 1;
                head = Some(hash);
                break;
            }
        }
        let index = files.last().map_or(0, |f| super::audit_files::split_segment(f).1);
        let (path, file, size) = open_segment(&base, index, options.durability)?;
        Ok(Self { base, index, path, file, size, options, seq, head, buf: Vec::with_capacity(512) })
    }

    /// The file being written now (the base file, or the latest rotated one).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The chain's base file (what the log was opened with).
    pub fn base_path(&self) -> &Path {
        &self.base
    }

    /// How far each acknowledged record survives.
    pub fn durability(&self) -> Durability {
        self.options.durability
    }

    /// The hash of the last record written: publish it (the run's summary prints it) so that
    /// `gradguard log verify --head` catches an edit of the last record too.
    pub fn head(&self) -> Option<&str> {
        self.head.as_deref()
    }

    /// Appends one record as one line, linked to the one before. Returns `Ok` only once the
    /// whole line is in the file (see the module documentation for what survives what); a
    /// file that reached its size limit is then closed with a `rotated` record and the chain
    /// goes on in the next file.
    pub fn record(&mut self, record: &DecisionRecord) -> Result<(), AuditError> {
        self.write_line(record)?;
        if self.size >= self.options.max_file_bytes {
            self.rotate(record)?;
        }
        Ok(())
    }

    fn write_line(&mut self, record: &DecisionRecord) -> Result<(), AuditError> {
        let prev = self.head.clone().unwrap_or_else(|| record.policy_hash.clone());
        let line = ChainedLine { link: ChainLink { seq: self.seq, prev }, record };
        self.buf.clear();
        serde_json::to_writer(&mut self.buf, &line).map_err(|source| AuditError::Encode {
            path: self.path.clone(),
            step: record.step,
            layer: record.layer.clone(),
            source,
        })?;
        let hash = line_hash(&self.buf);
        self.buf.push(b'\n');
        let write_err = |source| AuditError::Write { path: self.path.clone(), step: record.step, layer: record.layer.clone(), source };
        self.file.write_all(&self.buf).map_err(write_err)?;
        self.file.flush().map_err(write_err)?;
        if self.options.durability == Durability::Disk {
            self.file.sync_data().map_err(write_err)?;
        }
        self.size += self.buf.len() as u64;
        self.seq += 1;
        self.head = Some(hash);
        Ok(())
    }

    fn rotate(&mut self, last: &DecisionRecord) -> Result<(), AuditError> {
        let next = segment_path(&self.base, self.index + 1);
        let name = next.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let marker = DecisionRecord::event(last.step, Outcome::Rotated, &last.policy_hash, Some(format!("continued in {name}")));
        self.write_line(&marker)?;
        let (path, file, size) = open_segment(&self.base, self.index + 1, self.options.durability)?;
        self.index += 1;
        (self.path, self.file, self.size) = (path, file, size);
        Ok(())
    }
}

/// The chain link and hash of the last complete chained line of a file, if it has one.
fn last_link(bytes: &[u8]) -> Option<(ChainLink, String)> {
    let mut last = None;
    for line in lines(bytes) {
        if !line.terminated {
            continue;
        }
        if let Ok(link) = serde_json::from_slice::<ChainLink>(line.bytes) {
            last = Some((link, line_hash(line.bytes)));
        }
    }
    last
}

/// Opens the `index`-th file of the chain for appending, closing a torn tail left by a
/// process killed mid-write so that the next record starts on its own line (appending only:
/// the fragment stays, readers skip it). Returns the path, the file and its size.
fn open_segment(base: &Path, index: u32, durability: Durability) -> Result<(PathBuf, File, u64), AuditError> {
    let path = segment_path(base, index);
    let existed = path.exists();
    let open_err = |source| AuditError::Open { path: path.clone(), source };
    let mut file = OpenOptions::new().read(true).append(true).create(true).open(&path).map_err(open_err)?;
    let mut len = file.metadata().map_err(open_err)?.len();
    if len > 0 {
        let mut last = [0u8; 1];
        file.seek(SeekFrom::Start(len - 1)).and_then(|_| std::io::Read::read_exact(&mut file, &mut last)).map_err(open_err)?;
        if last[0] != b'\n' {
            file.write_all(b"\n").map_err(open_err)?;
            len += 1;
            if durability == Durability::Disk {
                file.sync_data().map_err(open_err)?;
            }
        }
    }
    if durability == Durability::Disk && !existed {
        // The new file's directory entry must reach the disk too.
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(dir).and_then(|d| d.sync_all()).map_err(open_err)?;
        }
    }
    Ok((path, file, len))
}
