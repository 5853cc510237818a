//! The round's config: the keys `train` accepts, read from a Python dict and checked.
use crate::errors::{ConfigError, FlError, FlResult};
use crate::model::{parse_loss, ModelSpec};
use crate::params::type_name;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyString};
use std::collections::BTreeSet;

// ---------------------------------------------------------------------------------------------
// The round's config

#[derive(Debug, Clone)]
pub(crate) enum ConfigValue {
    /// No key takes a bool; kept apart from Int so that `True` is not read as 1.
    Bool,
    Int(i64),
    Float(f64),
    Str(String),
}

impl ConfigValue {
    fn kind(&self) -> &'static str {
        match self {
            ConfigValue::Bool => "a bool",
            ConfigValue::Int(_) => "an int",
            ConfigValue::Float(_) => "a float",
            ConfigValue::Str(_) => "a string",
        }
    }
}

/// The keys `train` accepts (`-` and `_` are the same: Flower configs use `local-steps`).
pub(crate) const CONFIG_KEYS: [&str; 10] =
    ["local_steps", "lr", "batch_size", "seed", "server_round", "policy", "policy_path", "threads", "model_path", "loss"];

#[derive(Debug, Clone)]
pub(crate) struct TrainConfig {
    pub(crate) local_steps: usize,
    pub(crate) lr: f64,
    pub(crate) batch_size: usize,
    pub(crate) seed: u64,
    pub(crate) server_round: u64,
    pub(crate) policy_text: String,
    pub(crate) policy_origin: String,
    pub(crate) threads: i32,
    /// The model to train: the digits CNN, or a TorchScript file (`model-path`).
    pub(crate) model: ModelSpec,
}

pub(crate) fn read_config(config: &Bound<'_, PyAny>) -> PyResult<Vec<(String, ConfigValue)>> {
    let dict = config
        .cast::<PyDict>()
        .map_err(|_| ConfigError::new_err(format!("the config must be a dict, got {}", type_name(config))))?;
    let mut out = Vec::new();
    for (k, v) in dict.iter() {
        let key: String =
            k.extract().map_err(|_| ConfigError::new_err(format!("config keys must be strings, got {}", type_name(&k))))?;
        let value = if v.is_instance_of::<PyBool>() {
            ConfigValue::Bool
        } else if v.is_instance_of::<PyInt>() {
            ConfigValue::Int(v.extract().map_err(|_| ConfigError::new_err(format!("config {key}: integer out of range")))?)
        } else if v.is_instance_of::<PyFloat>() {
            ConfigValue::Float(v.extract()?)
        } else if v.is_instance_of::<PyString>() {
            ConfigValue::Str(v.extract()?)
        } else {
            return Err(ConfigError::new_err(format!("config {key}: unsupported value type {}", type_name(&v))));
        };
        out.push((key, value));
    }
    Ok(out)
}

impl TrainConfig {
    pub(crate) fn parse(entries: &[(String, ConfigValue)]) -> FlResult<Self> {
        let bad = |key: &str, why: String| FlError::Config(format!("config {key}: {why}"));
        let mut cfg = TrainConfig {
            local_steps: 10,
            lr: 0.1,
            batch_size: 32,
            seed: 0,
            server_round: 0,
            policy_text: String::new(),
            policy_origin: String::new(),
            threads: 1,
            model: ModelSpec::default(),
        };
        let mut policy = None;
        let mut policy_path = None;
        let mut seen = BTreeSet::new();
        let int = |key: &str, v: &ConfigValue, lo: i64, hi: i64| -> FlResult<i64> {
            match v {
                ConfigValue::Int(i) if (lo..=hi).contains(i) => Ok(*i),
                ConfigValue::Int(i) => Err(bad(key, format!("must be in {lo}..={hi}, got {i}"))),
                other => Err(bad(key, format!("must be an integer, got {}", other.kind()))),
            }
        };
        for (raw, value) in entries {
            let key = raw.replace('-', "_");
            if !CONFIG_KEYS.contains(&key.as_str()) {
                let known: Vec<String> = CONFIG_KEYS.iter().map(|k| k.replace('_', "-")).collect();
                return Err(FlError::Config(format!("unknown config key {raw:?} (known: {})", known.join(", "))));
            }
            if !seen.insert(key.clone()) {
                return Err(FlError::Config(format!("config key {raw:?} is given twice (as - and _)")));
            }
            match key.as_str() {
                "local_steps" => cfg.local_steps = int(raw, value, 1, 100_000)? as usize,
                "batch_size" => cfg.batch_size = int(raw, value, 1, 4096)? as usize,
                "seed" => cfg.seed = int(raw, value, 0, i64::MAX)? as u64,
                "server_round" => cfg.server_round = int(raw, value, 0, i64::MAX)? as u64,
                "threads" => cfg.threads = int(raw, value, 1, 256)? as i32,
                "lr" => {
                    let lr = match value {
                        ConfigValue::Float(f) => *f,
                        ConfigValue::Int(i) => *i as f64,
                        other => return Err(bad(raw, format!("must be a number, got {}", other.kind()))),
                    };
                    if !(lr.is_finite() && lr > 0.0 && lr <= 100.0) {
                        return Err(bad(raw, format!("must be a finite number in (0, 100], got {lr}")));
                    }
                    cfg.lr = lr;
                }
                "model_path" | "loss" => {
                    let ConfigValue::Str(s) = value else {
                        return Err(bad(raw, format!("must be a string, got {}", value.kind())));
                    };
                    if key == "loss" {
                        cfg.model.loss = parse_loss(s).map_err(|why| bad(raw, why))?;
                    } else if !s.trim().is_empty() {
                        cfg.model.path = Some(s.into());
                    }
                }
                "policy" | "policy_path" => {
                    let ConfigValue::Str(s) = value else {
                        return Err(bad(raw, format!("must be a string, got {}", value.kind())));
                    };
                    if s.trim().is_empty() {
                        return Err(bad(raw, "is empty".into()));
                    }
                    if key == "policy" {
                        policy = Some(s.clone());
                    } else {
                        policy_path = Some(s.clone());
                    }
                }
                _ => unreachable!("every known key is handled"),
            }
        }
        match (policy, policy_path) {
            (Some(_), Some(_)) => return Err(FlError::Config("give either `policy` (TOML text) or `policy-path`, not both".into())),
            (None, None) => {
                return Err(FlError::Config(
                    "no privacy policy: give `policy` (TOML text) or `policy-path`; a client never releases unguarded".into(),
                ))
            }
            (Some(text), None) => {
                cfg.policy_text = text;
                cfg.policy_origin = "policy from the round config".into();
            }
            (None, Some(path)) => {
                cfg.policy_text = std::fs::read_to_string(&path)
                    .map_err(|e| FlError::Policy(format!("cannot read policy {path}: {e}")))?;
                cfg.policy_origin = path;
            }
        }
        Ok(cfg)
    }
}

