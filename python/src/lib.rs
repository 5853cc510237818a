//! `gradguard._native`: the native half of the Python package `gradguard` (its Python half is
//! `python/gradguard/`, which checks the torch version before loading this module).
//!
//! Two front ends share it. The PyTorch one (`pytorch`, `gradguard.wrap`) guards a user's own
//! PyTorch loop with the engine's step. The federated one (`gradguard.fl`, also importable as
//! `gradguard_fl`) is the guarded local training step of the Flower app in `federated/` (docs
//! in `docs/FEDERATED.md`), described below.
//!
//! Everything that decides what leaves a client stays in Rust: local training with tch on the
//! client's partition of the digits data, the leakage metrics, the policy and the defences
//! (`Guard::release`). Python only moves arrays and JSON.
//!
//! What is released: the round's **mean gradient** `(w_global - w_local) / (lr * local_steps)`,
//! per parameter. With plain SGD it is exactly the mean of the local mini-batch gradients, the
//! gradient-scale quantity METRICS.md defines (with one local step over the whole partition it
//! is G(B) itself), so the policy's absolute thresholds (clip norms, noise) mean the same as in
//! a training loop. The guard measures the leakage on the round's samples (the union of its
//! mini-batches, with their stroke-weight attribute for M2) at the **global** parameters: what
//! the server, and an attacker there, know. The server applies
//! `w <- w - lr * local_steps * mean(released mean gradients)`.
//!
//! No panic crosses into Python: every entry point runs under `catch_unwind`, and every error
//! is a subclass of `gradguard.GradguardError` carrying the message.
//!
//! Modules: `errors` (the exception classes, panics caught), `params` (numpy <-> tch),
//! `model` (the digits CNN or a TorchScript file, with the run's loss), `partition` (the
//! shipped digits, dealt non-IID), `node_data` (a node's own .npy folder), `config` (the
//! round's config), `train` (the guarded local step), `metrics_sidecar` (a node's /metrics);
//! `pytorch` (the PyTorch front end).
mod config;
mod errors;
mod metrics_sidecar;
mod model;
mod node_data;
mod params;
mod partition;
mod pytorch;
mod resume;
mod train;

pub(crate) use errors::{FlError, FlResult, InternalError};

use config::{read_config, TrainConfig, CONFIG_KEYS};
use errors::{guarded, AuditError, ConfigError, InputError, DataError, GradguardError, ModelError, ParameterError, PolicyError, StateError};
use gradguard_guard::{Guard, Policy};
use model::{LocalModel, ModelSpec, MODEL_SEED};
use node_data::{score, DataDir, Source};
use params::{params_to_dict, read_params, type_name};
use partition::{digits, Partition};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use tch::Device;
use train::{train_impl, TrainResult};


/// A node's data argument: a digits `Partition` or a `DataDir`.
fn source_of(data: &Bound<'_, PyAny>) -> PyResult<Source> {
    if let Ok(p) = data.cast::<Partition>() {
        return Ok(Source::Digits(p.get().clone()));
    }
    if let Ok(d) = data.cast::<DataDir>() {
        return Ok(Source::Files(d.get().clone()));
    }
    Err(pyo3::exceptions::PyTypeError::new_err(format!("the node's data must be a gradguard.fl.Partition or gradguard.fl.DataDir, got {}", type_name(data))))
}

/// The guarded local training step of one federated round.
///
/// `global_params`: `{name: ndarray}` of every parameter of the local model (see
/// `parameter_shapes()`). `config`: `local-steps`, `lr`, `batch-size`, `seed`, `server-round`,
/// `threads`, `model-path` (a TorchScript file; default the digits CNN), `loss`
/// (`cross-entropy` or `mse`), and the privacy policy as `policy` (TOML text) or `policy-path`
/// (exactly one; unknown keys are an error). `data`: the node's `Partition` or `DataDir`.
/// `state`: the `state` of the node's previous `TrainResult` (JSON), so the guard's levels and
/// step count go on from there. `audit_log`: a file the guard appends its decisions to; the
/// guard's state is then also kept beside it (`<audit_log>.state.json`, written atomically
/// after every release, its hash in the log) and restored from there at the start of the
/// call, in preference to `state`: a node that restarts goes on with its levels, step and
/// ledger, and the log records `restarted`. A state file that is missing after a logged save,
/// rolled back, altered or unreadable raises `StateError`: nothing is trained or released
/// until an operator resets it (`gradguard log reset-state LOG`).
///
/// Returns a `TrainResult`: the protected update (released layers only), the manifest, the
/// report and the guard's state after the release, or `blocked=True` with the reason (and
/// still the manifest, the report and the state). Raises a `GradguardError` subclass on bad
/// input; file errors name the file.
#[pyfunction(name = "train")]
#[pyo3(signature = (global_params, config, data, state = None, audit_log = None))]
fn train_round(
    py: Python<'_>,
    global_params: &Bound<'_, PyAny>,
    config: &Bound<'_, PyAny>,
    data: &Bound<'_, PyAny>,
    state: Option<String>,
    audit_log: Option<String>,
) -> PyResult<TrainResult> {
    let given = read_params(global_params)?;
    let entries = read_config(config)?;
    let source = source_of(data)?;
    guarded(py, "training and releasing", move || {
        let cfg = TrainConfig::parse(&entries)?;
        train_impl(&given, &cfg, &source, state.as_deref(), audit_log.as_deref())
    })
}

/// Accuracy (None for mse) and mean loss of `params` on held-out data: without `data`, the
/// whole held-out split of the shipped digits (the server's evaluation of the digits CNN); with
/// a `Partition`, its held-out digits; with a `DataDir`, the node's held-out share.
#[pyfunction]
#[pyo3(signature = (params, partition = None, seed = 0, test_fraction = 0.2, model_path = None, loss = "cross-entropy".to_string()))]
fn evaluate<'py>(
    py: Python<'py>,
    params: &Bound<'py, PyAny>,
    partition: Option<&Bound<'py, PyAny>>,
    seed: i64,
    test_fraction: f64,
    model_path: Option<String>,
    loss: String,
) -> PyResult<Bound<'py, PyDict>> {
    let given = read_params(params)?;
    let source = partition.map(source_of).transpose()?;
    let (accuracy, loss, n) = guarded(py, "evaluating", move || {
        let model = LocalModel::new(&ModelSpec::new(model_path, &loss)?, MODEL_SEED)?;
        model.load(&given)?;
        let (x, y) = match &source {
            Some(source) => source.load(&model)?.held_out()?,
            None => {
                if seed < 0 || !(test_fraction > 0.0 && test_fraction < 1.0) {
                    return Err(FlError::Data(format!("bad split: seed {seed}, test_fraction {test_fraction}")));
                }
                let data = digits()?;
                let (x, y, _) = data.batch(&data.split(test_fraction, seed as u64).1, Device::Cpu)?;
                (x, y)
            }
        };
        let n = x.size()[0] as usize;
        let (accuracy, loss) = score(&model, &x, &y)?;
        Ok((accuracy, loss, n))
    })?;
    let out = PyDict::new(py);
    out.set_item("accuracy", accuracy)?;
    out.set_item("loss", loss)?;
    out.set_item("num_examples", n)?;
    Ok(out)
}

fn spec(model_path: Option<String>) -> FlResult<ModelSpec> {
    ModelSpec::new(model_path, "cross-entropy")
}

/// The server's starting point: freshly initialised parameters of the digits CNN (seeded), or
/// the parameters saved in the TorchScript file `model_path`.
#[pyfunction]
#[pyo3(signature = (seed = 0, model_path = None))]
fn initial_parameters<'py>(py: Python<'py>, seed: i64, model_path: Option<String>) -> PyResult<Bound<'py, PyDict>> {
    let params = guarded(py, "initialising the model", move || LocalModel::new(&spec(model_path)?, seed as u64)?.snapshot())?;
    params_to_dict(py, &params)
}

/// `{parameter name: shape}` of the model, in model order.
#[pyfunction]
#[pyo3(signature = (model_path = None))]
fn parameter_shapes<'py>(py: Python<'py>, model_path: Option<String>) -> PyResult<Bound<'py, PyDict>> {
    let shapes = guarded(py, "listing parameters", move || Ok(LocalModel::new(&spec(model_path)?, MODEL_SEED)?.shapes()))?;
    let out = PyDict::new(py);
    for (name, shape) in shapes {
        out.set_item(name, PyTuple::new(py, shape)?)?;
    }
    Ok(out)
}

/// The model's layers as the guard names them (the CNN: `conv1`, `conv2`, `fc1`, `fc2`).
#[pyfunction]
#[pyo3(signature = (model_path = None))]
fn layer_names<'py>(py: Python<'py>, model_path: Option<String>) -> PyResult<Bound<'py, PyList>> {
    let names = guarded(py, "listing layers", move || Ok(LocalModel::new(&spec(model_path)?, MODEL_SEED)?.layer_map()?.names()))?;
    PyList::new(py, names)
}

/// The layer a parameter belongs to, as the guard names it (its name without the last
/// component, and a top-level name without its `__N` duplicate suffix): `conv1.weight` ->
/// `conv1`, `scale__2` -> `scale`.
#[pyfunction]
fn layer_of(param: &str) -> String {
    gradguard_guard::measure::layer_name(param)
}

/// `{layer: [parameter names]}`: the names grouped into layers as the guard groups a model's
/// parameters (`layer_of`), the layers in the order of their first parameter, each with its
/// parameters in the given order.
#[pyfunction]
fn group_layers<'py>(py: Python<'py>, params: Vec<String>) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    for (layer, names) in gradguard_guard::measure::group_by_layer(params.into_iter().map(|p| (p, ()))) {
        out.set_item(layer, PyList::new(py, names.into_iter().map(|(name, ())| name))?)?;
    }
    Ok(out)
}

/// What happened to a release, from its manifest (JSON): `released`, `protected`, `held` or
/// `blocked`, the guard's one vocabulary (`ReleaseKind::of`, the rule of `Manifest::kind`),
/// read from the manifest's outcome and its layers' actions only, so that the server names
/// what any client's manifest says. A ValueError names a manifest that cannot be read.
#[pyfunction]
fn release_kind(manifest: &str) -> PyResult<&'static str> {
    #[derive(serde::Deserialize)]
    struct Layer {
        #[serde(default)]
        actions: Vec<serde_json::Value>,
    }
    #[derive(serde::Deserialize)]
    struct Outcome {
        outcome: gradguard_guard::report::ReleaseOutcome,
        #[serde(default)]
        layers: Vec<Layer>,
    }
    let m: Outcome = serde_json::from_str(manifest).map_err(|e| pyo3::exceptions::PyValueError::new_err(format!("unreadable manifest: {e}")))?;
    Ok(gradguard_guard::ReleaseKind::of(&m.outcome, m.layers.iter().any(|l| !l.actions.is_empty())).name())
}

/// The report (JSON) as a client shares it: the gradient statistics of the layers not in
/// `released` replaced by an absent metric with the reason (they stay on the client).
#[pyfunction]
fn shared_report(report: &str, released: Vec<String>) -> PyResult<String> {
    let report: gradguard_guard::Report = serde_json::from_str(report).map_err(|e| pyo3::exceptions::PyValueError::new_err(format!("unreadable report: {e}")))?;
    Ok(train::shared(&report, &released)?)
}

/// Validates a policy (TOML text) against the model: `{"hash", "version", "rules", "floor"}`,
/// or a PolicyError naming what is wrong.
#[pyfunction]
#[pyo3(signature = (text, origin = "policy".to_string(), model_path = None))]
fn check_policy<'py>(py: Python<'py>, text: String, origin: String, model_path: Option<String>) -> PyResult<Bound<'py, PyDict>> {
    let (hash, version, rules, floor) = guarded(py, "checking the policy", move || {
        let policy = Policy::from_toml_str(&text, &origin).map_err(|e| FlError::Policy(e.to_string()))?;
        let model = LocalModel::new(&spec(model_path)?, MODEL_SEED)?;
        let guard = Guard::new(model.layer_map()?, policy)?;
        let p = guard.policy();
        Ok((p.hash().to_string(), p.version(), p.rules().len(), p.settings().aggregation_floor))
    })?;
    let out = PyDict::new(py);
    out.set_item("hash", hash)?;
    out.set_item("version", version)?;
    out.set_item("rules", rules)?;
    out.set_item("aggregation_floor", floor)?;
    Ok(out)
}

#[pymodule]
#[pyo3(name = "_native")]
fn gradguard_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("GradguardError", py.get_type::<GradguardError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("ParameterError", py.get_type::<ParameterError>())?;
    m.add("DataError", py.get_type::<DataError>())?;
    m.add("PolicyError", py.get_type::<PolicyError>())?;
    m.add("ModelError", py.get_type::<ModelError>())?;
    m.add("InternalError", py.get_type::<InternalError>())?;
    m.add("StateError", py.get_type::<StateError>())?;
    m.add("InputError", py.get_type::<InputError>())?;
    m.add("AuditError", py.get_type::<AuditError>())?;
    m.add_class::<pytorch::TorchGuard>()?;
    m.add_class::<pytorch::StepReport>()?;
    m.add("CONFIG_KEYS", CONFIG_KEYS.iter().map(|k| k.replace('_', "-")).collect::<Vec<_>>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Partition>()?;
    m.add_class::<DataDir>()?;
    m.add_class::<TrainResult>()?;
    m.add_function(wrap_pyfunction!(train_round, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(initial_parameters, m)?)?;
    m.add_function(wrap_pyfunction!(parameter_shapes, m)?)?;
    m.add_function(wrap_pyfunction!(layer_names, m)?)?;
    m.add_function(wrap_pyfunction!(layer_of, m)?)?;
    m.add_function(wrap_pyfunction!(group_layers, m)?)?;
    m.add_function(wrap_pyfunction!(release_kind, m)?)?;
    m.add_function(wrap_pyfunction!(check_policy, m)?)?;
    m.add_function(wrap_pyfunction!(shared_report, m)?)?;
    m.add_function(wrap_pyfunction!(metrics_sidecar::serve_metrics, m)?)?;
    Ok(())
}
