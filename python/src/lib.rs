//! `gradguard_fl`: gradguard's guarded local training step as a Python extension module, for
//! federated clients (the Flower app in `federated/`, docs in `docs/FEDERATED.md`).
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
//! is a subclass of `gradguard_fl.GradguardError` carrying the message.
mod metrics_sidecar;

use gradguard::data::{Digits, CLASSES};
use gradguard::audit::{AuditModel, LossKind, ModelSource};
use gradguard_guard::{Batch, Guard, GuardError, LayerMap, Policy, Release};
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{IntoPyArray, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;
use tch::{nn::VarStore, Device, Kind, Tensor};

create_exception!(gradguard_fl, GradguardError, PyException, "Base class of every gradguard_fl error.");
create_exception!(gradguard_fl, ConfigError, GradguardError, "The round's config has an unknown key or a bad value.");
create_exception!(
    gradguard_fl,
    ParameterError,
    GradguardError,
    "The given parameters do not match the local model (names, shapes, dtypes, values)."
);
create_exception!(gradguard_fl, DataError, GradguardError, "The client's data partition cannot be used (empty, bad spec).");
create_exception!(gradguard_fl, PolicyError, GradguardError, "The privacy policy is invalid or does not fit the model.");
create_exception!(gradguard_fl, InternalError, GradguardError, "A libtorch failure or a caught panic inside the extension.");

/// The extension's errors before they become Python exceptions.
#[derive(Debug)]
pub(crate) enum FlError {
    Config(String),
    Parameter(String),
    Data(String),
    Policy(String),
    Internal(String),
}

impl From<FlError> for PyErr {
    fn from(e: FlError) -> PyErr {
        match e {
            FlError::Config(m) => ConfigError::new_err(m),
            FlError::Parameter(m) => ParameterError::new_err(m),
            FlError::Data(m) => DataError::new_err(m),
            FlError::Policy(m) => PolicyError::new_err(m),
            FlError::Internal(m) => InternalError::new_err(m),
        }
    }
}

impl From<tch::TchError> for FlError {
    fn from(e: tch::TchError) -> Self {
        FlError::Internal(format!("libtorch: {e}"))
    }
}

impl From<gradguard::data::DataError> for FlError {
    fn from(e: gradguard::data::DataError) -> Self {
        FlError::Data(e.to_string())
    }
}

impl From<GuardError> for FlError {
    fn from(e: GuardError) -> Self {
        match e {
            GuardError::Policy(_) | GuardError::PolicyRejected { .. } => FlError::Policy(e.to_string()),
            GuardError::UnknownParameter { .. } | GuardError::ParameterShape { .. } => FlError::Parameter(e.to_string()),
            GuardError::EmptyBatch | GuardError::BatchMismatch { .. } | GuardError::InputShape { .. } => FlError::Data(e.to_string()),
            GuardError::Config { .. } => FlError::Config(e.to_string()),
            other => FlError::Internal(other.to_string()),
        }
    }
}

type FlResult<T> = Result<T, FlError>;

/// Runs `f` without the GIL and turns a panic into an `InternalError`.
fn guarded<T: Send>(py: Python<'_>, what: &str, f: impl FnOnce() -> FlResult<T> + Send) -> PyResult<T> {
    let out = py.detach(|| catch_unwind(AssertUnwindSafe(f)));
    match out {
        Ok(result) => result.map_err(PyErr::from),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            Err(InternalError::new_err(format!("internal error while {what} (a Rust panic, caught): {msg}")))
        }
    }
}

/// The digits data set, parsed once per process.
fn digits() -> FlResult<&'static Digits> {
    static DIGITS: OnceLock<Result<Digits, String>> = OnceLock::new();
    DIGITS.get_or_init(|| Digits::embedded().map_err(|e| e.to_string())).as_ref().map_err(|e| FlError::Data(e.clone()))
}

// ---------------------------------------------------------------------------------------------
// Parameters: numpy <-> tch

/// One named parameter on the host.
#[derive(Debug, Clone)]
pub(crate) struct HostArray {
    name: String,
    shape: Vec<i64>,
    data: Vec<f32>,
}

impl HostArray {
    fn to_tensor(&self) -> FlResult<Tensor> {
        Ok(Tensor::f_from_slice(&self.data)?.f_reshape(self.shape.as_slice())?)
    }

    fn from_tensor(name: &str, t: &Tensor) -> FlResult<Self> {
        let shape = t.size();
        let flat = t.f_detach()?.f_to_kind(Kind::Float)?.f_contiguous()?.f_reshape([-1])?;
        Ok(Self { name: name.to_string(), shape, data: Vec::<f32>::try_from(&flat)? })
    }

    fn to_numpy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let shape: Vec<usize> = self.shape.iter().map(|&d| d as usize).collect();
        let array = ArrayD::from_shape_vec(IxDyn(&shape), self.data.clone())
            .map_err(|e| InternalError::new_err(format!("parameter {}: {e}", self.name)))?;
        Ok(array.into_pyarray(py).into_any())
    }
}

/// Reads `{name: ndarray}` (float32 or float64, any layout) into host arrays.
fn read_params(params: &Bound<'_, PyAny>) -> PyResult<Vec<HostArray>> {
    let dict = params
        .cast::<PyDict>()
        .map_err(|_| ParameterError::new_err(format!("parameters must be a dict of name -> numpy array, got {}", type_name(params))))?;
    let mut out = Vec::with_capacity(dict.len());
    for (key, value) in dict.iter() {
        let name: String = key
            .extract()
            .map_err(|_| ParameterError::new_err(format!("parameter names must be strings, got {}", type_name(&key))))?;
        let (shape, data) = if let Ok(a) = value.extract::<PyReadonlyArrayDyn<'_, f32>>() {
            (a.shape().to_vec(), a.as_array().iter().copied().collect::<Vec<f32>>())
        } else if let Ok(a) = value.extract::<PyReadonlyArrayDyn<'_, f64>>() {
            (a.shape().to_vec(), a.as_array().iter().map(|&v| v as f32).collect::<Vec<f32>>())
        } else {
            let dtype = value.getattr("dtype").map(|d| d.to_string()).unwrap_or_else(|_| type_name(&value));
            return Err(ParameterError::new_err(format!("parameter {name}: expected a float32 (or float64) numpy array, got {dtype}")));
        };
        out.push(HostArray { name, shape: shape.iter().map(|&d| d as i64).collect(), data });
    }
    Ok(out)
}

fn type_name(v: &Bound<'_, PyAny>) -> String {
    v.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

fn params_to_dict<'py>(py: Python<'py>, params: &[HostArray]) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for p in params {
        dict.set_item(&p.name, p.to_numpy(py)?)?;
    }
    Ok(dict)
}

/// The local model: DigitsCnn in a VarStore on the CPU, with its parameter names in creation
/// order.
/// The initialisation seed where it does not matter (every parameter is then loaded, or only
/// names and shapes are read).
const MODEL_SEED: u64 = 0;

struct LocalModel {
    model: AuditModel,
    names: Vec<String>,
}

impl LocalModel {
    /// The federated model, from the same model sources as the audit and `policy check`,
    /// initialised from libtorch's generator seeded with `seed`.
    fn new(seed: u64) -> FlResult<Self> {
        let model = ModelSource::Cnn.load(seed, Device::Cpu).map_err(|e| FlError::Internal(e.to_string()))?;
        let layers = model.layers().map_err(|e| FlError::Internal(e.to_string()))?;
        let names = layers.layers().iter().flat_map(|l| l.params.iter().map(|p| p.name.clone())).collect();
        Ok(Self { model, names })
    }

    fn vs(&self) -> &VarStore {
        self.model.var_store()
    }

    fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor, tch::TchError> {
        self.model.loss(LossKind::CrossEntropy, x, y)
    }

    fn variable(&self, name: &str) -> FlResult<Tensor> {
        self.vs().variables().remove(name).ok_or_else(|| FlError::Internal(format!("the model lost parameter {name}")))
    }

    fn shapes(&self) -> FlResult<Vec<(String, Vec<i64>)>> {
        self.names.iter().map(|n| Ok((n.clone(), self.variable(n)?.size()))).collect()
    }

    /// Copies `given` into the model; every parameter must be given once, with its shape, finite.
    fn load(&self, given: &[HostArray]) -> FlResult<()> {
        let shapes = self.shapes()?;
        let mut problems = Vec::new();
        let mut seen = BTreeSet::new();
        for p in given {
            if !seen.insert(p.name.as_str()) {
                problems.push(format!("{} is given twice", p.name));
            }
            match shapes.iter().find(|(n, _)| *n == p.name) {
                None => problems.push(format!("unknown parameter {:?}", p.name)),
                Some((_, shape)) if *shape != p.shape => {
                    problems.push(format!("{} has shape {:?}, the local model {:?}", p.name, p.shape, shape))
                }
                Some(_) if p.data.iter().any(|v| !v.is_finite()) => problems.push(format!("{} holds non-finite values", p.name)),
                Some(_) => {}
            }
        }
        for (name, _) in &shapes {
            if !given.iter().any(|p| p.name == *name) {
                problems.push(format!("missing parameter {name}"));
            }
        }
        if !problems.is_empty() {
            let expected: Vec<String> = shapes.iter().map(|(n, s)| format!("{n} {s:?}")).collect();
            return Err(FlError::Parameter(format!(
                "the parameters do not match the local model: {}; the model has {}",
                problems.join("; "),
                expected.join(", ")
            )));
        }
        tch::no_grad(|| -> FlResult<()> {
            for p in given {
                let mut var = self.variable(&p.name)?;
                var.f_copy_(&p.to_tensor()?)?;
            }
            Ok(())
        })
    }

    fn snapshot(&self) -> FlResult<Vec<HostArray>> {
        self.names.iter().map(|n| HostArray::from_tensor(n, &self.variable(n)?)).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The client's data partition

/// A client's share of the digits data: non-IID by label. The seeded 80/20 train/test split of
/// the whole data set is the same for every client and the server (the server evaluates on the
/// whole test part: held-out digits no client trains on). Each sample of digit `c` goes to
/// partition `c mod num_partitions` with probability `label_skew`, else to a partition drawn
/// uniformly: `label_skew = 0` is IID, `1` gives each partition only its own digits.
#[pyclass(frozen, module = "gradguard_fl")]
#[derive(Debug, Clone)]
struct Partition {
    #[pyo3(get)]
    partition_id: usize,
    #[pyo3(get)]
    num_partitions: usize,
    #[pyo3(get)]
    label_skew: f64,
    #[pyo3(get)]
    seed: u64,
    #[pyo3(get)]
    test_fraction: f64,
    train: Vec<usize>,
    test: Vec<usize>,
}

fn assign(indices: &[usize], labels: &[i64], parts: usize, skew: f64, rng: &mut ChaCha8Rng, wanted: usize) -> Vec<usize> {
    let mut sorted = indices.to_vec();
    sorted.sort_unstable();
    let mut out = Vec::new();
    for i in sorted {
        let to = if rng.random::<f64>() < skew { labels[i] as usize % parts } else { rng.random_range(0..parts) };
        if to == wanted {
            out.push(i);
        }
    }
    out
}

impl Partition {
    fn build(partition_id: i64, num_partitions: i64, label_skew: f64, seed: i64, test_fraction: f64) -> FlResult<Self> {
        if num_partitions < 1 {
            return Err(FlError::Data(format!("num_partitions must be at least 1, got {num_partitions}")));
        }
        if partition_id < 0 || partition_id >= num_partitions {
            return Err(FlError::Data(format!("partition_id must be in 0..{num_partitions}, got {partition_id}")));
        }
        if !(0.0..=1.0).contains(&label_skew) {
            return Err(FlError::Data(format!("label_skew must be in [0, 1], got {label_skew}")));
        }
        if seed < 0 {
            return Err(FlError::Data(format!("seed must be >= 0, got {seed}")));
        }
        if !(test_fraction > 0.0 && test_fraction < 1.0) {
            return Err(FlError::Data(format!("test_fraction must be in (0, 1), got {test_fraction}")));
        }
        let data = digits()?;
        let (train_all, test_all) = data.split(test_fraction, seed as u64);
        let parts = num_partitions as usize;
        let id = partition_id as usize;
        let mut rng = ChaCha8Rng::seed_from_u64(seed as u64 ^ 0x9a77_17e0_0000_0001);
        let train = assign(&train_all, data.labels(), parts, label_skew, &mut rng, id);
        let mut rng = ChaCha8Rng::seed_from_u64(seed as u64 ^ 0x9a77_17e0_0000_0002);
        let test = assign(&test_all, data.labels(), parts, label_skew, &mut rng, id);
        Ok(Self { partition_id: id, num_partitions: parts, label_skew, seed: seed as u64, test_fraction, train, test })
    }

    fn counts(indices: &[usize]) -> FlResult<Vec<usize>> {
        let labels = digits()?.labels();
        let mut c = vec![0; CLASSES as usize];
        for &i in indices {
            c[labels[i] as usize] += 1;
        }
        Ok(c)
    }
}

#[pymethods]
impl Partition {
    #[new]
    #[pyo3(signature = (partition_id, num_partitions, label_skew = 0.8, seed = 0, test_fraction = 0.2))]
    fn new(py: Python<'_>, partition_id: i64, num_partitions: i64, label_skew: f64, seed: i64, test_fraction: f64) -> PyResult<Self> {
        guarded(py, "building the partition", || Partition::build(partition_id, num_partitions, label_skew, seed, test_fraction))
    }

    /// Training samples in this partition (may be 0: training on it is then a DataError).
    #[getter]
    fn num_train(&self) -> usize {
        self.train.len()
    }

    /// Held-out samples with this partition's label mix (client-side evaluation).
    #[getter]
    fn num_test(&self) -> usize {
        self.test.len()
    }

    /// Training samples per digit 0..9.
    fn label_counts(&self, py: Python<'_>) -> PyResult<Vec<usize>> {
        guarded(py, "counting labels", || Partition::counts(&self.train))
    }

    fn __repr__(&self) -> String {
        format!(
            "Partition(partition_id={}, num_partitions={}, label_skew={}, seed={}, num_train={}, num_test={})",
            self.partition_id,
            self.num_partitions,
            self.label_skew,
            self.seed,
            self.train.len(),
            self.test.len()
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The round's config

#[derive(Debug, Clone)]
enum ConfigValue {
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
const CONFIG_KEYS: [&str; 8] = ["local_steps", "lr", "batch_size", "seed", "server_round", "policy", "policy_path", "threads"];

#[derive(Debug, Clone)]
struct TrainConfig {
    local_steps: usize,
    lr: f64,
    batch_size: usize,
    seed: u64,
    server_round: u64,
    policy_text: String,
    policy_origin: String,
    threads: i32,
}

fn read_config(config: &Bound<'_, PyAny>) -> PyResult<Vec<(String, ConfigValue)>> {
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
    fn parse(entries: &[(String, ConfigValue)]) -> FlResult<Self> {
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

// ---------------------------------------------------------------------------------------------
// The guarded local training step

/// What `train` returns: the protected update or the block, with the manifest and the report.
#[pyclass(frozen, module = "gradguard_fl")]
struct TrainResult {
    /// True when the guard refused the whole release: `update` is then empty.
    #[pyo3(get)]
    blocked: bool,
    /// Why the release was blocked (None when released).
    #[pyo3(get)]
    reason: Option<String>,
    /// The manifest of the release (JSON): per layer, released or not, the defences applied and
    /// the rule checks. Carries no gradient value.
    #[pyo3(get)]
    manifest: String,
    /// The guard's report of this release (JSON): per-layer metrics (METRICS.md M1, M2,
    /// gradient statistics) with what each was computed on.
    #[pyo3(get)]
    report: String,
    /// The report as the client shares it with the server (JSON): the gradient statistics of
    /// every layer that is not released are removed (they would describe the withheld update).
    /// Empty when blocked: a blocked client shares only the manifest.
    #[pyo3(get)]
    shared_report: String,
    /// Distinct samples the round trained on (the release covers them).
    #[pyo3(get)]
    num_examples: usize,
    #[pyo3(get)]
    local_steps: usize,
    #[pyo3(get)]
    lr: f64,
    /// Mean training loss over the local steps.
    #[pyo3(get)]
    train_loss: f64,
    #[pyo3(get)]
    policy_hash: String,
    #[pyo3(get)]
    released_layers: Vec<String>,
    #[pyo3(get)]
    withheld_layers: Vec<String>,
    update: Vec<HostArray>,
}

#[pymethods]
impl TrainResult {
    /// The protected update: `{parameter name: float32 ndarray}` of the released layers only
    /// (the round's mean gradient after the policy's defences). Empty when blocked.
    #[getter]
    fn update<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        params_to_dict(py, &self.update)
    }

    fn __repr__(&self) -> String {
        match &self.reason {
            Some(reason) => format!("TrainResult(blocked=True, reason={reason:?})"),
            None => format!(
                "TrainResult(blocked=False, released={:?}, withheld={:?}, num_examples={})",
                self.released_layers, self.withheld_layers, self.num_examples
            ),
        }
    }
}

struct Trained {
    blocked: Option<String>,
    manifest: String,
    report: String,
    shared_report: String,
    num_examples: usize,
    train_loss: f64,
    policy_hash: String,
    released: Vec<String>,
    withheld: Vec<String>,
    update: Vec<HostArray>,
}

fn derive_seed(parts: &[u64]) -> u64 {
    // splitmix64 over the parts: distinct rounds and clients get unrelated streams.
    let mut z: u64 = 0x6a09_e667_f3bc_c909;
    for &p in parts {
        z = z.wrapping_add(p).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
    }
    z
}

fn train_impl(given: &[HostArray], cfg: &TrainConfig, partition: &Partition) -> FlResult<Trained> {
    if partition.train.is_empty() {
        return Err(FlError::Data(format!(
            "partition {} of {} holds no training samples (label_skew {}, seed {}): nothing to train on",
            partition.partition_id, partition.num_partitions, partition.label_skew, partition.seed
        )));
    }
    let policy = Policy::from_toml_str(&cfg.policy_text, &cfg.policy_origin).map_err(|e| FlError::Policy(e.to_string()))?;
    let data = digits()?;
    tch::set_num_threads(cfg.threads);
    let seed = derive_seed(&[cfg.seed, cfg.server_round, partition.partition_id as u64]);
    let model = LocalModel::new(seed >> 1)?;
    model.load(given)?;
    // The guard is built (and the policy checked against the model) before any training.
    let mut guard = Guard::new(LayerMap::from_var_store(model.vs())?, policy)?;
    let global = model.snapshot()?;
    let params: Vec<Tensor> = model.names.iter().map(|n| model.variable(n)).collect::<FlResult<_>>()?;

    // Local training: plain SGD (no momentum), so the mean gradient below is exact.
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order = partition.train.clone();
    order.shuffle(&mut rng);
    let mut pos = 0;
    let mut used = BTreeSet::new();
    let mut loss_sum = 0.0;
    let batch_size = cfg.batch_size.min(order.len());
    for _ in 0..cfg.local_steps {
        let mut idx = Vec::with_capacity(batch_size);
        while idx.len() < batch_size {
            if pos == order.len() {
                order.shuffle(&mut rng);
                pos = 0;
            }
            idx.push(order[pos]);
            pos += 1;
        }
        used.extend(idx.iter().copied());
        let (x, y, _) = data.batch(&idx, Device::Cpu)?;
        let loss = model.loss(&x, &y)?;
        loss_sum += loss.f_double_value(&[])?;
        let grads = Tensor::f_run_backward(&[&loss], &params, false, false)?;
        tch::no_grad(|| -> FlResult<()> {
            for (p, g) in params.iter().zip(&grads) {
                if g.defined() {
                    let mut p = p.shallow_clone();
                    let _ = p.f_sub_(&g.f_mul_scalar(cfg.lr)?)?;
                }
            }
            Ok(())
        })?;
    }
    let local = model.snapshot()?;
    // The round's mean gradient, then back to the global parameters for the measurement.
    let scale = 1.0 / (cfg.lr * cfg.local_steps as f64);
    let mut update = Vec::with_capacity(global.len());
    for (g, l) in global.iter().zip(&local) {
        let t = g.to_tensor()?.f_sub(&l.to_tensor()?)?.f_mul_scalar(scale)?;
        update.push((g.name.clone(), t));
    }
    model.load(&global)?;

    let used: Vec<usize> = used.into_iter().collect();
    let (x, y, a) = data.batch(&used, Device::Cpu)?;
    let batch = Batch::new(&x, &y).with_attribute(&a);
    let loss_fn = |x: &Tensor, y: &Tensor| model.loss(x, y);
    let policy_hash = guard.policy().hash().to_string();
    let (blocked, tensors, manifest, report) = match guard.release(&update, &batch, &loss_fn)? {
        Release::Released { update, manifest, report } => (None, update, manifest, report),
        Release::Blocked { reason, manifest, report } => (Some(format!("release blocked at step {}: {reason}", manifest.step)), vec![], manifest, report),
        Release::Held { manifest, .. } => return Err(FlError::Internal(format!("the explicit release was held: {:?}", manifest.outcome))),
    };
    let released: Vec<String> = manifest.layers.iter().filter(|l| l.released).map(|l| l.name.clone()).collect();
    let withheld: Vec<String> = manifest.layers.iter().filter(|l| !l.released).map(|l| l.name.clone()).collect();
    let update = tensors.iter().map(|(n, t)| HostArray::from_tensor(n, t)).collect::<FlResult<Vec<_>>>()?;
    let shared_report = match &blocked {
        None => shared(&report, &released)?,
        Some(_) => String::new(),
    };
    Ok(Trained {
        shared_report,
        blocked,
        manifest: serde_json::to_string(&manifest).map_err(|e| FlError::Internal(e.to_string()))?,
        report: report.to_json(),
        num_examples: used.len(),
        train_loss: loss_sum / cfg.local_steps as f64,
        policy_hash,
        released,
        withheld,
        update,
    })
}

/// The report without the gradient statistics of the layers that are not released.
fn shared(report: &gradguard_guard::Report, released: &[String]) -> FlResult<String> {
    let mut value = serde_json::to_value(report).map_err(|e| FlError::Internal(e.to_string()))?;
    if let Some(layers) = value.get_mut("layers").and_then(|l| l.as_array_mut()) {
        for layer in layers {
            let name = layer.get("name").and_then(|n| n.as_str()).unwrap_or_default().to_string();
            if !released.contains(&name) {
                layer["gradient"] = serde_json::json!({
                    "status": "absent",
                    "reason": "layer not released: its gradient statistics stay on the client"
                });
            }
        }
    }
    serde_json::to_string(&value).map_err(|e| FlError::Internal(e.to_string()))
}

/// The guarded local training step of one federated round.
///
/// `global_params`: `{name: ndarray}` of every parameter of the local model (`conv1.weight`, ...;
/// see `parameter_shapes()`). `config`: `local-steps`, `lr`, `batch-size`, `seed`,
/// `server-round`, `threads`, and the privacy policy as `policy` (TOML text) or `policy-path`
/// (exactly one; unknown keys are an error). `partition`: the client's `Partition`.
///
/// Returns a `TrainResult`: the protected update (released layers only), the manifest and the
/// report, or `blocked=True` with the reason (and still the manifest and the report). Raises a
/// `GradguardError` subclass on bad input.
#[pyfunction]
fn train(py: Python<'_>, global_params: &Bound<'_, PyAny>, config: &Bound<'_, PyAny>, partition: &Partition) -> PyResult<TrainResult> {
    let given = read_params(global_params)?;
    let entries = read_config(config)?;
    let partition = partition.clone();
    let (cfg, t) = guarded(py, "training and releasing", move || {
        let cfg = TrainConfig::parse(&entries)?;
        let t = train_impl(&given, &cfg, &partition)?;
        Ok((cfg, t))
    })?;
    Ok(TrainResult {
        blocked: t.blocked.is_some(),
        reason: t.blocked,
        manifest: t.manifest,
        report: t.report,
        shared_report: t.shared_report,
        num_examples: t.num_examples,
        local_steps: cfg.local_steps,
        lr: cfg.lr,
        train_loss: t.train_loss,
        policy_hash: t.policy_hash,
        released_layers: t.released,
        withheld_layers: t.withheld,
        update: t.update,
    })
}

/// Accuracy and mean loss of `params` on held-out digits: the whole held-out split (the server's
/// evaluation) or, with `partition`, the held-out samples with that partition's label mix.
#[pyfunction]
#[pyo3(signature = (params, partition = None, seed = 0, test_fraction = 0.2))]
fn evaluate<'py>(
    py: Python<'py>,
    params: &Bound<'py, PyAny>,
    partition: Option<&Partition>,
    seed: i64,
    test_fraction: f64,
) -> PyResult<Bound<'py, PyDict>> {
    let given = read_params(params)?;
    let partition = partition.cloned();
    let (accuracy, loss, n) = guarded(py, "evaluating", move || {
        let indices = match &partition {
            Some(p) => p.test.clone(),
            None => {
                if seed < 0 || !(test_fraction > 0.0 && test_fraction < 1.0) {
                    return Err(FlError::Data(format!("bad split: seed {seed}, test_fraction {test_fraction}")));
                }
                digits()?.split(test_fraction, seed as u64).1
            }
        };
        if indices.is_empty() {
            return Err(FlError::Data("no held-out samples to evaluate on (empty partition)".into()));
        }
        let model = LocalModel::new(MODEL_SEED)?;
        model.load(&given)?;
        let data = digits()?;
        let accuracy = data.accuracy(&indices, Device::Cpu, |x| model.model.forward(x))?;
        let (x, y, _) = data.batch(&indices, Device::Cpu)?;
        let loss = tch::no_grad(|| model.loss(&x, &y))?.f_double_value(&[])?;
        Ok((accuracy, loss, indices.len()))
    })?;
    let out = PyDict::new(py);
    out.set_item("accuracy", accuracy)?;
    out.set_item("loss", loss)?;
    out.set_item("num_examples", n)?;
    Ok(out)
}

/// Freshly initialised parameters of the model (seeded): the server's starting point.
#[pyfunction]
#[pyo3(signature = (seed = 0))]
fn initial_parameters<'py>(py: Python<'py>, seed: i64) -> PyResult<Bound<'py, PyDict>> {
    let params = guarded(py, "initialising the model", move || {
        LocalModel::new(seed as u64)?.snapshot()
    })?;
    params_to_dict(py, &params)
}

/// `{parameter name: shape}` of the model, in creation order.
#[pyfunction]
fn parameter_shapes<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
    let shapes = guarded(py, "listing parameters", || LocalModel::new(MODEL_SEED)?.shapes())?;
    let out = PyDict::new(py);
    for (name, shape) in shapes {
        out.set_item(name, PyTuple::new(py, shape)?)?;
    }
    Ok(out)
}

/// The model's layers as the guard names them (`conv1`, `conv2`, `fc1`, `fc2`).
#[pyfunction]
fn layer_names<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
    let names = guarded(py, "listing layers", || Ok(LayerMap::from_var_store(LocalModel::new(MODEL_SEED)?.vs())?.names()))?;
    PyList::new(py, names)
}

/// Validates a policy (TOML text) against the model: `{"hash", "version", "rules", "floor"}`,
/// or a PolicyError naming what is wrong.
#[pyfunction]
#[pyo3(signature = (text, origin = "policy".to_string()))]
fn check_policy<'py>(py: Python<'py>, text: String, origin: String) -> PyResult<Bound<'py, PyDict>> {
    let (hash, version, rules, floor) = guarded(py, "checking the policy", move || {
        let policy = Policy::from_toml_str(&text, &origin).map_err(|e| FlError::Policy(e.to_string()))?;
        let model = LocalModel::new(MODEL_SEED)?;
        let guard = Guard::new(LayerMap::from_var_store(model.vs())?, policy)?;
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
fn gradguard_fl(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("GradguardError", py.get_type::<GradguardError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("ParameterError", py.get_type::<ParameterError>())?;
    m.add("DataError", py.get_type::<DataError>())?;
    m.add("PolicyError", py.get_type::<PolicyError>())?;
    m.add("InternalError", py.get_type::<InternalError>())?;
    m.add("CONFIG_KEYS", CONFIG_KEYS.iter().map(|k| k.replace('_', "-")).collect::<Vec<_>>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Partition>()?;
    m.add_class::<TrainResult>()?;
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(initial_parameters, m)?)?;
    m.add_function(wrap_pyfunction!(parameter_shapes, m)?)?;
    m.add_function(wrap_pyfunction!(layer_names, m)?)?;
    m.add_function(wrap_pyfunction!(check_policy, m)?)?;
    m.add_function(wrap_pyfunction!(metrics_sidecar::serve_metrics, m)?)?;
    Ok(())
}
