//! A node's own data: a folder with `x.npy`, `y.npy` and optionally `attribute.npy` (the
//! private attribute, for M2), loaded and checked against the model by the audit crate's
//! loaders. The held-out share is `x_test.npy`/`y_test.npy` when the folder has them, else a
//! seeded fraction of `x.npy`'s samples. The shipped digits partitions are the other source.
use crate::errors::{guarded, FlError, FlResult};
use crate::model::LocalModel;
use crate::partition::{digits, Partition};
use gradguard_models::{AuditData, DataSpec};
use pyo3::prelude::*;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// A node's data folder (checked for `x.npy` and `y.npy` when built; the arrays are read,
/// and checked against the model, by `train` and `evaluate`).
#[pyclass(frozen, module = "gradguard.fl")]
#[derive(Debug, Clone)]
pub(crate) struct DataDir {
    #[pyo3(get)]
    pub(crate) path: String,
    #[pyo3(get)]
    test_fraction: f64,
    #[pyo3(get)]
    seed: u64,
}

impl DataDir {
    pub(crate) fn build(path: &str, test_fraction: f64, seed: i64) -> FlResult<Self> {
        let dir = Path::new(path);
        if !dir.is_dir() {
            return Err(FlError::Data(format!("data-dir {path}: no such folder")));
        }
        for file in ["x.npy", "y.npy"] {
            if !dir.join(file).is_file() {
                return Err(FlError::Data(format!("data-dir {path}: {file} is missing (a node's data is x.npy, y.npy and optionally attribute.npy)")));
            }
        }
        if !(test_fraction > 0.0 && test_fraction < 1.0) {
            return Err(FlError::Data(format!("test_fraction must be in (0, 1), got {test_fraction}")));
        }
        if seed < 0 {
            return Err(FlError::Data(format!("seed must be >= 0, got {seed}")));
        }
        Ok(Self { path: path.to_string(), test_fraction, seed: seed as u64 })
    }

    fn file(&self, name: &str) -> PathBuf {
        Path::new(&self.path).join(name)
    }

    fn has_test_files(&self) -> bool {
        self.file("x_test.npy").is_file() && self.file("y_test.npy").is_file()
    }
}

#[pymethods]
impl DataDir {
    #[new]
    #[pyo3(signature = (path, test_fraction = 0.2, seed = 0))]
    fn new(py: Python<'_>, path: String, test_fraction: f64, seed: i64) -> PyResult<Self> {
        guarded(py, "opening the data folder", move || DataDir::build(&path, test_fraction, seed))
    }

    fn __repr__(&self) -> String {
        format!("DataDir(path={:?}, test_fraction={}, seed={})", self.path, self.test_fraction, self.seed)
    }
}

/// Where a node's samples come from.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    Digits(Partition),
    Files(DataDir),
}

/// A node's samples as tensors, with its train and held-out indices.
pub(crate) struct Samples {
    x: Tensor,
    y: Tensor,
    attribute: Option<Tensor>,
    pub(crate) train: Vec<usize>,
    /// Held-out indices into `test_x`/`test_y` (the same tensors when split from `x.npy`).
    pub(crate) test: Vec<usize>,
    test_x: Tensor,
    test_y: Tensor,
    /// How errors name the data.
    pub(crate) label: String,
}

impl Source {
    /// Loads the samples for `model`: every data error names its file.
    pub(crate) fn load(&self, model: &LocalModel) -> FlResult<Samples> {
        match self {
            Source::Digits(p) => {
                let data = digits()?;
                let all: Vec<usize> = (0..data.len()).collect();
                let (x, y, a) = data.batch(&all, Device::Cpu)?;
                let label = format!("partition {} of {}", p.partition_id, p.num_partitions);
                Ok(Samples { test_x: x.shallow_clone(), test_y: y.shallow_clone(), x, y, attribute: Some(a), train: p.train.clone(), test: p.test.clone(), label })
            }
            Source::Files(dir) => {
                let spec = |x: &str, y: &str, attribute: Option<PathBuf>| DataSpec {
                    inputs: Some(dir.file(x)),
                    labels: Some(dir.file(y)),
                    attribute,
                    samples: None,
                    loss: model.loss,
                    token_ids_without_split: false,
                };
                let attribute = Some(dir.file("attribute.npy")).filter(|p| p.is_file());
                let data = AuditData::load(&spec("x.npy", "y.npy", attribute), &model.model, Device::Cpu)?;
                let attribute = data.attribute.as_deref().map(Tensor::f_from_slice).transpose()?;
                let label = format!("data-dir {}", dir.path);
                if dir.has_test_files() {
                    let test = AuditData::load(&spec("x_test.npy", "y_test.npy", None), &model.model, Device::Cpu)?;
                    let n_test = test.n;
                    return Ok(Samples { x: data.x, y: data.y, attribute, train: (0..data.n).collect(), test: (0..n_test).collect(), test_x: test.x, test_y: test.y, label });
                }
                let mut order: Vec<usize> = (0..data.n).collect();
                order.shuffle(&mut ChaCha8Rng::seed_from_u64(dir.seed));
                let n_test = ((data.n as f64) * dir.test_fraction).round() as usize;
                let train = order.split_off(n_test.min(data.n));
                Ok(Samples { test_x: data.x.shallow_clone(), test_y: data.y.shallow_clone(), x: data.x, y: data.y, attribute, train, test: order, label })
            }
        }
    }
}

fn select(t: &Tensor, idx: &[usize]) -> FlResult<Tensor> {
    let idx: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    Ok(t.f_index_select(0, &Tensor::f_from_slice(&idx)?)?)
}

impl Samples {
    /// Training samples at `idx` (indices into the training data): inputs, labels, attribute.
    pub(crate) fn batch(&self, idx: &[usize]) -> FlResult<(Tensor, Tensor, Option<Tensor>)> {
        let a = self.attribute.as_ref().map(|a| select(a, idx)).transpose()?;
        Ok((select(&self.x, idx)?, select(&self.y, idx)?, a))
    }

    /// The held-out samples: inputs and labels.
    pub(crate) fn held_out(&self) -> FlResult<(Tensor, Tensor)> {
        if self.test.is_empty() {
            return Err(FlError::Data(format!("{}: no held-out samples to evaluate on", self.label)));
        }
        Ok((select(&self.test_x, &self.test)?, select(&self.test_y, &self.test)?))
    }
}

/// Accuracy (cross-entropy: argmax against the class ids; None for mse) and mean loss of the
/// model on `x`, `y`.
pub(crate) fn score(model: &LocalModel, x: &Tensor, y: &Tensor) -> FlResult<(Option<f64>, f64)> {
    tch::no_grad(|| -> FlResult<(Option<f64>, f64)> {
        let out = model.model.forward(x)?;
        let loss = model.model.loss(model.loss, x, y)?.f_double_value(&[])?;
        let accuracy = match model.loss {
            gradguard_models::LossKind::CrossEntropy => {
                Some(out.f_argmax(-1, false)?.f_eq_tensor(y)?.f_to_kind(Kind::Double)?.f_mean(Kind::Double)?.f_double_value(&[])?)
            }
            gradguard_models::LossKind::Mse => None,
        };
        Ok((accuracy, loss))
    })
}
