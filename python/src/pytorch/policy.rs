//! The policy a PyTorch guard enforces: the policy file's text (or none: measure only) with the
//! `settings` dict's keys laid over its `[settings]` table, validated as a file's would be.
use crate::errors::PolicyError;
use gradguard_guard::{Policy, Settings};
use pyo3::prelude::*;

/// `policy` (TOML text and where it came from) under `settings` (a JSON object of
/// `[settings]` keys). A bad policy or an unknown or ill-typed setting is a `PolicyError`.
pub(crate) fn policy_with(policy: Option<(String, String)>, settings: Option<String>) -> PyResult<Policy> {
    let bad = |e: String| PolicyError::new_err(e);
    let base = match &policy {
        Some((text, origin)) => Policy::from_toml_str(text, origin).map_err(|e| bad(e.to_string()))?,
        None => Policy::permissive(),
    };
    let Some(settings) = settings else { return Ok(base) };
    let given: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&settings).map_err(|e| bad(format!("settings must be a dict of the policy's [settings] keys: {e}")))?;
    let mut merged = serde_json::to_value(base.settings()).map_err(|e| bad(format!("settings: {e}")))?;
    let Some(table) = merged.as_object_mut() else { return Err(bad("settings: not a table".into())) };
    for (key, value) in given {
        table.insert(key, value);
    }
    let settings: Settings = serde_json::from_value(merged).map_err(|e| bad(format!("settings: {e}")))?;
    let policy = match policy {
        Some(_) => base.with_settings(settings),
        None => Policy::permissive_with(settings),
    };
    policy.map_err(|e| bad(e.to_string()))
}
