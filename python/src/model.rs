//! The local model: the digits CNN (the default) or the TorchScript file the run names
//! (`model-path`), with the run's loss. Parameters are read and written through the guard's
//! layer map, so both kinds are named as the guard and the server name them (`conv1.weight`,
//! PyTorch's dotted names for TorchScript).
use crate::errors::{FlError, FlResult};
use crate::params::HostArray;
use gradguard_models::{AuditModel, LossKind, ModelSource};
use gradguard_guard::LayerMap;
use std::collections::BTreeSet;
use std::path::PathBuf;
use tch::{Device, Tensor};

/// The initialisation seed where it does not matter (every parameter is then loaded, or only
/// names and shapes are read; a TorchScript model has its file's parameters anyway).
pub(crate) const MODEL_SEED: u64 = 0;

/// Which model a node trains and with which loss.
#[derive(Debug, Clone, Default)]
pub(crate) struct ModelSpec {
    /// A `torch.jit.save`d module; None: the digits CNN.
    pub(crate) path: Option<PathBuf>,
    pub(crate) loss: LossKind,
}

/// `cross-entropy` (or `cross_entropy`, `ce`) and `mse`.
pub(crate) fn parse_loss(text: &str) -> Result<LossKind, String> {
    match text.trim() {
        "cross-entropy" | "cross_entropy" | "ce" => Ok(LossKind::CrossEntropy),
        "mse" => Ok(LossKind::Mse),
        other => Err(format!("unknown loss {other:?}: cross-entropy or mse")),
    }
}

impl ModelSpec {
    pub(crate) fn new(path: Option<String>, loss: &str) -> FlResult<Self> {
        let loss = parse_loss(loss).map_err(FlError::Config)?;
        Ok(Self { path: path.filter(|p| !p.trim().is_empty()).map(PathBuf::from), loss })
    }

    fn source(&self) -> ModelSource {
        match &self.path {
            None => ModelSource::Cnn,
            Some(p) => ModelSource::TorchScript(p.clone()),
        }
    }
}

pub(crate) struct LocalModel {
    pub(crate) model: AuditModel,
    pub(crate) loss: LossKind,
    /// The layer map's parameters: names and tensors sharing the model's storage.
    params: Vec<(String, Tensor)>,
}

impl LocalModel {
    /// The model of `spec`: the CNN initialised from libtorch's generator seeded with `seed`,
    /// or the TorchScript file with its own parameters. A file that is missing or not
    /// TorchScript is a `ModelError` naming the file.
    pub(crate) fn new(spec: &ModelSpec, seed: u64) -> FlResult<Self> {
        let model = spec.source().load(seed, Device::Cpu).map_err(|e| FlError::Model(e.to_string()))?;
        let layers = model.layers().map_err(|e| FlError::Model(e.to_string()))?;
        let params = layers.layers().iter().flat_map(|l| l.params.iter().map(|p| (p.name.clone(), p.tensor.shallow_clone()))).collect();
        Ok(Self { model, loss: spec.loss, params })
    }

    pub(crate) fn layer_map(&self) -> FlResult<LayerMap> {
        self.model.layers().map_err(|e| FlError::Model(e.to_string()))
    }

    pub(crate) fn tensors(&self) -> Vec<Tensor> {
        self.params.iter().map(|(_, t)| t.shallow_clone()).collect()
    }

    pub(crate) fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor, tch::TchError> {
        self.model.loss(self.loss, x, y)
    }

    pub(crate) fn shapes(&self) -> Vec<(String, Vec<i64>)> {
        self.params.iter().map(|(n, t)| (n.clone(), t.size())).collect()
    }

    /// Copies `given` into the model; every parameter must be given once, with its shape, finite.
    pub(crate) fn load(&self, given: &[HostArray]) -> FlResult<()> {
        self.load_checked(given, true)
    }

    /// As `load`, but non-finite values are copied too: for parameters the guard vets before
    /// anything runs on them (`Guard::vet_parameters` refuses them, by name, in the guard's words).
    pub(crate) fn load_for_vetting(&self, given: &[HostArray]) -> FlResult<()> {
        self.load_checked(given, false)
    }

    fn load_checked(&self, given: &[HostArray], finite: bool) -> FlResult<()> {
        let shapes = self.shapes();
        let mut problems = Vec::new();
        let mut seen = BTreeSet::new();
        for p in given {
            if !seen.insert(p.name.as_str()) {
                problems.push(format!("{} is given twice", p.name));
            }
            match shapes.iter().find(|(n, _)| *n == p.name) {
                None => problems.push(format!("unknown parameter {:?}", p.name)),
                Some((_, shape)) if *shape != p.shape => problems.push(format!("{} has shape {:?}, the local model {:?}", p.name, p.shape, shape)),
                Some(_) if finite && p.data.iter().any(|v| !v.is_finite()) => problems.push(format!("{} holds non-finite values", p.name)),
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
                let (_, var) = self.params.iter().find(|(n, _)| *n == p.name).expect("checked above");
                let mut var = var.shallow_clone();
                var.f_copy_(&p.to_tensor()?)?;
            }
            Ok(())
        })
    }

    pub(crate) fn snapshot(&self) -> FlResult<Vec<HostArray>> {
        self.params.iter().map(|(n, t)| HostArray::from_tensor(n, t)).collect()
    }
}
