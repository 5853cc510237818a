//! Reading an audit log back: the records of one file or of a whole chain, torn fragments
//! skipped and counted, any other line that does not parse an error naming file and line.
use super::audit_files::chain_files;
use super::audit_log::{AuditLog, LogContents};
use super::audit_record::DecisionRecord;
use crate::error::AuditError;
use std::path::Path;

impl AuditLog {
    /// Every complete record of the one file at `path`, skipping torn fragments (see
    /// [`AuditLog::read_log`] for how many were skipped).
    pub fn read_all(path: impl AsRef<Path>) -> Result<Vec<DecisionRecord>, AuditError> {
        Ok(Self::read_log(path)?.records)
    }

    /// Every complete record of the chain that starts at `base`: the base file and the files
    /// it was rotated into, in order.
    pub fn read_chain(base: impl AsRef<Path>) -> Result<Vec<DecisionRecord>, AuditError> {
        let files = chain_files(base.as_ref());
        if files.is_empty() {
            // Reading the absent base names it in the error.
            return Self::read_all(base);
        }
        let mut out = Vec::new();
        for f in files {
            out.extend(Self::read_all(f)?);
        }
        Ok(out)
    }

    /// Reads one file: complete records plus the number of torn fragments skipped. A complete
    /// line that is not a record (and not a torn one) is an [`AuditError::Corrupt`].
    pub fn read_log(path: impl AsRef<Path>) -> Result<LogContents, AuditError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| AuditError::Read { path: path.to_path_buf(), source })?;
        let mut contents = LogContents { records: Vec::new(), skipped: 0, skipped_lines: Vec::new() };
        for line in lines(&bytes) {
            if line.blank() {
                continue;
            }
            match serde_json::from_slice::<DecisionRecord>(line.bytes) {
                Ok(r) => contents.records.push(r),
                // The unterminated last line, whatever it holds, was never acknowledged; a
                // terminated torn record is JSON cut short, closed by a later `open`.
                Err(e) if !line.terminated || e.is_eof() => {
                    contents.skipped += 1;
                    contents.skipped_lines.push(line.number);
                }
                Err(e) => {
                    return Err(AuditError::Corrupt { path: path.to_path_buf(), line: line.number, why: e.to_string() });
                }
            }
        }
        Ok(contents)
    }
}

/// One line of a log file.
pub(crate) struct Line<'a> {
    /// 1-based.
    pub number: usize,
    /// Without the `'\n'`.
    pub bytes: &'a [u8],
    /// Whether a `'\n'` ended it (an unterminated last line is a torn write).
    pub terminated: bool,
}

impl Line<'_> {
    pub(crate) fn blank(&self) -> bool {
        self.bytes.iter().all(|b| b.is_ascii_whitespace())
    }
}

/// The lines of a file's bytes.
pub(crate) fn lines(bytes: &[u8]) -> impl Iterator<Item = Line<'_>> {
    let mut rest = bytes;
    let mut number = 0;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        number += 1;
        Some(match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let line = Line { number, bytes: &rest[..i], terminated: true };
                rest = &rest[i + 1..];
                line
            }
            None => {
                let line = Line { number, bytes: rest, terminated: false };
                rest = &[];
                line
            }
        })
    })
}

