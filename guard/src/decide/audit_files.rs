//! The files of one audit chain: the base file the log was opened with (`audit.jsonl`) and the
//! files rotation continued it in (`audit.1.jsonl`, `audit.2.jsonl`, ...), in chain order.
use std::path::{Path, PathBuf};

/// The name of the `index`-th file of the chain that starts at `base` (0: `base` itself).
pub fn segment_path(base: &Path, index: u32) -> PathBuf {
    if index == 0 {
        return base.to_path_buf();
    }
    let stem = base.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name = match base.extension() {
        Some(ext) => format!("{stem}.{index}.{}", ext.to_string_lossy()),
        None => format!("{stem}.{index}"),
    };
    base.with_file_name(name)
}

/// The chain's base file and rotation index of `path`: `audit.3.jsonl` is (`audit.jsonl`, 3),
/// any other name is its own base (index 0).
pub(crate) fn split_segment(path: &Path) -> (PathBuf, u32) {
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else { return (path.to_path_buf(), 0) };
    let parts: Vec<&str> = name.split('.').collect();
    // stem.N.ext or stem.N
    let candidates = [(parts.len() >= 3).then(|| parts.len() - 2), (parts.len() >= 2).then(|| parts.len() - 1)];
    for at in candidates.into_iter().flatten() {
        if let Ok(n) = parts[at].parse::<u32>() {
            if n > 0 && !parts[at].starts_with('0') {
                let mut kept: Vec<&str> = parts.clone();
                kept.remove(at);
                return (path.with_file_name(kept.join(".")), n);
            }
        }
    }
    (path.to_path_buf(), 0)
}

/// The chain's existing files, in chain order: `base` (if it exists) and every rotated file
/// beside it, sorted by index. Gaps are kept out of the listing, not filled: a verifier finds
/// them through the chain.
pub fn chain_files(base: &Path) -> Vec<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = Vec::new();
    if base.is_file() {
        found.push((0, base.to_path_buf()));
    }
    let dir = match base.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("."),
    };
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let path = base.with_file_name(entry.file_name());
            let (b, index) = split_segment(&path);
            if index > 0 && b == base && path.is_file() {
                found.push((index, path));
            }
        }
    }
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip() {
        let base = Path::new("out/audit.jsonl");
        assert_eq!(segment_path(base, 0), base);
        assert_eq!(segment_path(base, 3), Path::new("out/audit.3.jsonl"));
        assert_eq!(split_segment(Path::new("out/audit.3.jsonl")), (base.to_path_buf(), 3));
        assert_eq!(split_segment(base), (base.to_path_buf(), 0));
        assert_eq!(split_segment(Path::new("log.12")), (PathBuf::from("log"), 12));
        assert_eq!(split_segment(Path::new("v1.0.jsonl")), (PathBuf::from("v1.0.jsonl"), 0));
    }
}
