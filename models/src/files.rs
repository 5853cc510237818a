//! Writing outputs: folders created as needed, errors that name the file.
use crate::error::{ModelError, Result};
use std::path::Path;

/// Creates the parent folder of `path` (if it has one).
pub fn create_parent(path: &Path) -> Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => create_dir(parent),
        None => Ok(()),
    }
}

/// Creates `dir` and its parents.
pub fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io { action: "creating", path: dir.to_path_buf(), source })
}

/// Writes `contents` to `path`, creating its parent folder first.
pub fn write_file(path: &Path, contents: &str, action: &'static str) -> Result<()> {
    create_parent(path)?;
    std::fs::write(path, contents).map_err(|source| ModelError::Io { action, path: path.to_path_buf(), source })
}
