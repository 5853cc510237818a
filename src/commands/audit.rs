//! `gradguard audit`: the offline audit of one model on data. Per layer, every metric of
//! METRICS.md (M1 sensitivity, M2 subspace distance, M3 usable latent information, and with
//! `--invert` M4 usable original information), printed as a table, written as JSON and drawn
//! as an SVG of per-layer bars.
//!
//! ```text
//! gradguard audit --model model.pt --inputs X.npy --labels Y.npy --attribute A.npy \
//!     --json audit.json --plot audit.svg [--invert]
//! gradguard audit --model cnn --train-steps 300 --invert      # built-in model, shipped digits
//! ```
use anyhow::Context;
use gradguard::data::Digits;
use gradguard::guard::inversion::{estimate_original_information, Inversion, InversionPlan, InversionSettings};
use gradguard::guard::per_sample::per_sample_gradients;
use gradguard::guard::report::{JvpMethod, Metric, Sensitivity, Subspace};
use gradguard::guard::sensitivity::{estimate_sensitivity, SensitivitySettings};
use gradguard::guard::subspace::{estimate_subspace, SubspaceSettings};
use gradguard::guard::usable::{usable_information_layers, UsableInformation, UsableSettings};
use gradguard::guard::{parse_device, LayerMap};
use gradguard::hooks::torchscript::{first_line, TorchScriptError, TorchScriptModel};
use gradguard::models::{DigitsCnn, Mlp};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{nn, nn::OptimizerConfig, Device, Kind, TchError, Tensor};

#[derive(clap::Args)]
pub struct AuditArgs {
    /// `cnn` (gradguard's digits CNN), `mlp` (widths 64-128-64-10) or a TorchScript file
    /// (torch.jit.script or torch.jit.trace output saved with torch.jit.save).
    #[arg(long)]
    model: String,
    /// Inputs, .npy float32/float64 [n, ...]. Default with a built-in model: the shipped digits.
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// Labels, .npy: integer class ids [n] (cross-entropy) or floats shaped like the model's
    /// output (mse).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Private attribute, .npy integers [n]; enables M2 and M3.
    #[arg(long)]
    attribute: Option<PathBuf>,
    /// Samples in the released batch for M1 (the first N samples; at most n).
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Probes K of the M1 estimator.
    #[arg(long, default_value_t = 8)]
    probes: usize,
    /// Exact M1 (enumerate a basis): small models only.
    #[arg(long)]
    exact: bool,
    /// Seed of every random choice (probes, splits, projections, attack starts, built-in init).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value_t = LossKind::CrossEntropy)]
    loss: LossKind,
    /// Audit only the first N samples (default: all).
    #[arg(long)]
    samples: Option<usize>,
    /// Run the M4 inversion attack (slow).
    #[arg(long)]
    invert: bool,
    /// M4: releases attacked (consecutive batches from the start of the data).
    #[arg(long, default_value_t = 8)]
    invert_releases: usize,
    /// M4: samples per attacked release.
    #[arg(long, default_value_t = 1)]
    invert_batch_size: usize,
    /// M4: Adam steps of the attack.
    #[arg(long, default_value_t = 300)]
    invert_iterations: usize,
    /// M4: Adam step size of the attack, in units of the inputs' standard deviation.
    #[arg(long, default_value_t = 0.1)]
    invert_lr: f64,
    /// M3: L2 penalty of the attacker.
    #[arg(long, default_value_t = 1e-2)]
    l2: f64,
    /// Built-in models only: Adam steps (lr 1e-3, batches of 64) on the audited data first.
    #[arg(long, default_value_t = 0)]
    train_steps: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Write the JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the SVG plot here.
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    CrossEntropy,
    Mse,
}

/// What is wrong with the audit's input; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{what} {path}: no such file")]
    NotFound { what: &'static str, path: PathBuf },
    #[error("{what} {path} is not a .npy file: {why}")]
    NotNpy { what: &'static str, path: PathBuf, why: String },
    #[error("{what} {path}: {why}")]
    Dtype { what: &'static str, path: PathBuf, why: String },
    #[error("{what} {path}: {why}")]
    Shape { what: &'static str, path: PathBuf, why: String },
    #[error("{what} {path}: {count} non-finite value(s) (NaN or infinity), the first at sample {sample}")]
    NonFinite { what: &'static str, path: PathBuf, count: usize, sample: usize },
    #[error("labels {path}: value {value} at index {index} is outside 0..{classes} (the model has {classes} outputs)")]
    LabelRange { path: PathBuf, value: i64, index: usize, classes: i64 },
    #[error("inputs {path} (per-sample shape {shape:?}) do not fit the model {model}: {why}")]
    ModelFit { path: String, shape: Vec<i64>, model: String, why: String },
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    TorchScript(#[from] TorchScriptError),
}

// ---------------------------------------------------------------------------------------------
// .npy input

/// A .npy array read into host memory.
pub(crate) struct NpyArray {
    pub path: PathBuf,
    pub shape: Vec<i64>,
    pub data: NpyData,
}

pub(crate) enum NpyData {
    Float(Vec<f64>, Kind),
    Int(Vec<i64>, &'static str),
}

impl NpyArray {
    fn dtype_name(&self) -> String {
        match &self.data {
            NpyData::Float(_, Kind::Float) => "float32".into(),
            NpyData::Float(_, _) => "float64".into(),
            NpyData::Int(_, name) => name.to_string(),
        }
    }
}

pub(crate) fn read_npy(path: &Path, what: &'static str) -> Result<NpyArray, AuditError> {
    if !path.is_file() {
        return Err(AuditError::NotFound { what, path: path.to_path_buf() });
    }
    let bytes = std::fs::read(path).map_err(|e| AuditError::NotNpy { what, path: path.to_path_buf(), why: e.to_string() })?;
    let not_npy = |why: String| AuditError::NotNpy { what, path: path.to_path_buf(), why };
    let npy = npyz::NpyFile::new(&bytes[..]).map_err(|e| not_npy(e.to_string()))?;
    let shape: Vec<i64> = npy.shape().iter().map(|&d| d as i64).collect();
    if npy.order() == npyz::Order::Fortran {
        return Err(AuditError::Dtype { what, path: path.to_path_buf(), why: "Fortran-ordered array: save it with np.save(path, np.ascontiguousarray(a))".into() });
    }
    let dtype = npy.dtype();
    let npyz::DType::Plain(ts) = &dtype else {
        return Err(AuditError::Dtype { what, path: path.to_path_buf(), why: format!("structured dtype {dtype:?}: expected a plain numeric array") });
    };
    let bad_dtype = |why: String| AuditError::Dtype { what, path: path.to_path_buf(), why };
    let read_err = |e: std::io::Error| not_npy(format!("reading its data: {e}"));
    let size = ts.size_field();
    let data = match (ts.type_char(), size) {
        (npyz::TypeChar::Float, 4) => NpyData::Float(npy.into_vec::<f32>().map_err(read_err)?.into_iter().map(f64::from).collect(), Kind::Float),
        (npyz::TypeChar::Float, 8) => NpyData::Float(npy.into_vec::<f64>().map_err(read_err)?, Kind::Double),
        (npyz::TypeChar::Int, 1) => NpyData::Int(npy.into_vec::<i8>().map_err(read_err)?.into_iter().map(i64::from).collect(), "int8"),
        (npyz::TypeChar::Int, 2) => NpyData::Int(npy.into_vec::<i16>().map_err(read_err)?.into_iter().map(i64::from).collect(), "int16"),
        (npyz::TypeChar::Int, 4) => NpyData::Int(npy.into_vec::<i32>().map_err(read_err)?.into_iter().map(i64::from).collect(), "int32"),
        (npyz::TypeChar::Int, 8) => NpyData::Int(npy.into_vec::<i64>().map_err(read_err)?, "int64"),
        (npyz::TypeChar::Uint, 1) => NpyData::Int(npy.into_vec::<u8>().map_err(read_err)?.into_iter().map(i64::from).collect(), "uint8"),
        (npyz::TypeChar::Uint, 2) => NpyData::Int(npy.into_vec::<u16>().map_err(read_err)?.into_iter().map(i64::from).collect(), "uint16"),
        (npyz::TypeChar::Uint, 4) => NpyData::Int(npy.into_vec::<u32>().map_err(read_err)?.into_iter().map(i64::from).collect(), "uint32"),
        (npyz::TypeChar::Bool, _) => return Err(bad_dtype("dtype bool: expected numbers".into())),
        (c, s) => return Err(bad_dtype(format!("unsupported dtype {c:?} of {s} bytes: expected float32/float64 or integers"))),
    };
    let array = NpyArray { path: path.to_path_buf(), shape, data };
    let len = match &array.data {
        NpyData::Float(v, _) => v.len(),
        NpyData::Int(v, _) => v.len(),
    };
    if array.shape.is_empty() || array.shape[0] == 0 || len == 0 {
        return Err(AuditError::Shape { what, path: path.to_path_buf(), why: format!("shape {:?}: expected at least one sample along dimension 0", array.shape) });
    }
    Ok(array)
}

// ---------------------------------------------------------------------------------------------
// Models

/// The model being audited.
pub(crate) enum AuditModel {
    Cnn { vs: nn::VarStore, net: DigitsCnn },
    Mlp { vs: nn::VarStore, net: Mlp },
    Script(TorchScriptModel),
}

/// Widths of the built-in `mlp`.
pub(crate) const MLP_WIDTHS: [i64; 4] = [64, 128, 64, 10];

impl AuditModel {
    pub fn builtin(name: &str, seed: u64, device: Device) -> Option<Self> {
        tch::manual_seed(seed as i64);
        match name {
            "cnn" => {
                let vs = nn::VarStore::new(device);
                let net = DigitsCnn::new(&vs.root());
                Some(Self::Cnn { vs, net })
            }
            "mlp" => {
                let vs = nn::VarStore::new(device);
                let net = Mlp::new(&vs.root(), &MLP_WIDTHS);
                Some(Self::Mlp { vs, net })
            }
            _ => None,
        }
    }

    pub fn label(&self) -> String {
        match self {
            Self::Cnn { .. } => "cnn (gradguard::models::DigitsCnn)".into(),
            Self::Mlp { .. } => format!("mlp (gradguard::models::Mlp {MLP_WIDTHS:?})"),
            Self::Script(m) => format!("TorchScript {}", m.path().display()),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        match self {
            Self::Cnn { net, .. } => net.f_forward(x),
            Self::Mlp { net, .. } => net.f_forward(x),
            Self::Script(m) => m.f_forward(x),
        }
    }

    pub fn var_store(&self) -> &nn::VarStore {
        match self {
            Self::Cnn { vs, .. } | Self::Mlp { vs, .. } => vs,
            Self::Script(m) => m.var_store(),
        }
    }

    pub fn layers(&self) -> anyhow::Result<LayerMap> {
        Ok(match self {
            Self::Cnn { vs, .. } | Self::Mlp { vs, .. } => LayerMap::from_var_store(vs)?,
            Self::Script(m) => m.layer_map()?,
        })
    }

    /// The dtype of the parameters (inputs are converted to it).
    pub fn kind(&self) -> Kind {
        self.var_store().trainable_variables().first().map(|t| t.kind()).unwrap_or(Kind::Float)
    }

    pub fn loss(&self, loss: LossKind, x: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        let out = self.forward(x)?;
        match loss {
            LossKind::CrossEntropy => out.f_log_softmax(-1, None)?.f_nll_loss(y, None::<Tensor>, tch::Reduction::Mean, -100),
            LossKind::Mse => out.f_mse_loss(y, tch::Reduction::Mean),
        }
    }

    /// `steps` Adam steps (lr 1e-3) on seeded batches of `batch` samples drawn from `train`.
    pub fn train(&self, x: &Tensor, y: &Tensor, train: &[usize], steps: std::ops::Range<usize>, batch: usize, seed: u64, opt: &mut nn::Optimizer) -> anyhow::Result<()> {
        use rand::{seq::IndexedRandom, SeedableRng};
        for step in steps {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let idx: Vec<i64> = train.choose_multiple(&mut rng, batch.min(train.len())).map(|&i| i as i64).collect();
            let idx = Tensor::f_from_slice(&idx)?.f_to_device(x.device())?;
            let xb = x.f_index_select(0, &idx)?;
            let yb = y.f_index_select(0, &idx)?;
            let loss = self.loss(LossKind::CrossEntropy, &xb, &yb)?;
            opt.zero_grad();
            loss.f_backward()?;
            opt.step();
        }
        Ok(())
    }

    pub fn optimizer(&self) -> anyhow::Result<nn::Optimizer> {
        Ok(nn::Adam::default().build(self.var_store(), 1e-3)?)
    }
}

fn load_model(name: &str, seed: u64, device: Device) -> Result<AuditModel, AuditError> {
    if let Some(m) = AuditModel::builtin(name, seed, device) {
        return Ok(m);
    }
    let path = Path::new(name);
    if !path.exists() && !name.contains('.') && !name.contains('/') {
        return Err(AuditError::Usage(format!("unknown model {name:?}: expected `cnn`, `mlp` or the path of a TorchScript file")));
    }
    Ok(AuditModel::Script(TorchScriptModel::load(path, device)?))
}

// ---------------------------------------------------------------------------------------------
// Data

/// The audited data as tensors, checked against each other and against the model.
pub(crate) struct AuditData {
    pub x: Tensor,
    pub y: Tensor,
    pub attribute: Option<Vec<i64>>,
    pub n: usize,
    pub source: String,
}

fn tensor_from(values: &[f64], shape: &[i64], kind: Kind, device: Device) -> Result<Tensor, TchError> {
    Tensor::f_from_slice(values)?.f_reshape(shape)?.f_to_kind(kind)?.f_to_device(device)
}

fn load_data(args: &AuditArgs, model: &AuditModel, device: Device) -> anyhow::Result<AuditData> {
    let kind = model.kind();
    let Some(inputs_path) = &args.inputs else {
        if matches!(model, AuditModel::Script(_)) {
            return Err(AuditError::Usage("--inputs and --labels are required with a TorchScript model".into()).into());
        }
        if args.labels.is_some() || args.attribute.is_some() {
            return Err(AuditError::Usage("--labels and --attribute need --inputs".into()).into());
        }
        let digits = Digits::embedded()?;
        let n = args.samples.unwrap_or(digits.len()).min(digits.len());
        let idx: Vec<usize> = (0..n).collect();
        let (x, y, a) = digits.batch(&idx, device)?;
        let attribute = gradguard::guard::tensors::to_f64_vec(&a)?.into_iter().map(|v| v as i64).collect();
        return Ok(AuditData { x: x.f_to_kind(kind)?, y, attribute: Some(attribute), n, source: format!("shipped digits (first {n}, stroke-weight attribute)") });
    };
    let Some(labels_path) = &args.labels else {
        return Err(AuditError::Usage("--labels is required with --inputs".into()).into());
    };
    let inputs = read_npy(inputs_path, "inputs")?;
    let labels = read_npy(labels_path, "labels")?;
    let attribute = args.attribute.as_deref().map(|p| read_npy(p, "attribute")).transpose()?;

    let NpyData::Float(xv, _) = &inputs.data else {
        return Err(AuditError::Dtype {
            what: "inputs",
            path: inputs.path.clone(),
            why: format!("dtype {}: inputs must be float32 or float64", inputs.dtype_name()),
        }
        .into());
    };
    let total = inputs.shape[0] as usize;
    if let Some(bad) = xv.iter().position(|v| !v.is_finite()) {
        let per = xv.len() / total;
        return Err(AuditError::NonFinite { what: "inputs", path: inputs.path.clone(), count: xv.iter().filter(|v| !v.is_finite()).count(), sample: bad / per }.into());
    }
    if labels.shape[0] as usize != total {
        return Err(AuditError::Shape {
            what: "labels",
            path: labels.path.clone(),
            why: format!("{} samples along dimension 0, but inputs {} has {total}", labels.shape[0], inputs.path.display()),
        }
        .into());
    }
    let n = args.samples.unwrap_or(total).min(total);
    if n == 0 {
        return Err(AuditError::Usage("--samples must be at least 1".into()).into());
    }
    let per = xv.len() / total;
    let mut xshape = inputs.shape.clone();
    xshape[0] = n as i64;
    let x = tensor_from(&xv[..n * per], &xshape, kind, device)?;

    // Does the model take these inputs, and what does it output?
    let probe = x.f_narrow(0, 0, n.min(2) as i64)?;
    let out = tch::no_grad(|| model.forward(&probe)).map_err(|e| AuditError::ModelFit {
        path: inputs.path.display().to_string(),
        shape: inputs.shape[1..].to_vec(),
        model: model.label(),
        why: first_line(&e),
    })?;

    let y = match args.loss {
        LossKind::CrossEntropy => {
            let NpyData::Int(yv, _) = &labels.data else {
                return Err(AuditError::Dtype {
                    what: "labels",
                    path: labels.path.clone(),
                    why: format!("dtype {}: cross-entropy needs integer class ids (use --loss mse for float targets)", labels.dtype_name()),
                }
                .into());
            };
            if labels.shape.len() != 1 {
                return Err(AuditError::Shape { what: "labels", path: labels.path.clone(), why: format!("shape {:?}: cross-entropy needs one class id per sample, shape [n]", labels.shape) }.into());
            }
            if out.dim() != 2 {
                return Err(AuditError::ModelFit {
                    path: inputs.path.display().to_string(),
                    shape: inputs.shape[1..].to_vec(),
                    model: model.label(),
                    why: format!("cross-entropy needs outputs [n, classes], the model returns shape {:?}", out.size()),
                }
                .into());
            }
            let classes = out.size()[1];
            if let Some((index, &value)) = yv[..n].iter().enumerate().find(|(_, &v)| v < 0 || v >= classes) {
                return Err(AuditError::LabelRange { path: labels.path.clone(), value, index, classes }.into());
            }
            Tensor::f_from_slice(&yv[..n])?.f_to_device(device)?
        }
        LossKind::Mse => {
            let NpyData::Float(yv, _) = &labels.data else {
                return Err(AuditError::Dtype { what: "labels", path: labels.path.clone(), why: format!("dtype {}: mse needs float targets", labels.dtype_name()) }.into());
            };
            if labels.shape[1..] != out.size()[1..] {
                return Err(AuditError::Shape {
                    what: "labels",
                    path: labels.path.clone(),
                    why: format!("per-sample shape {:?}, but the model outputs {:?} per sample", &labels.shape[1..], &out.size()[1..]),
                }
                .into());
            }
            if let Some(bad) = yv.iter().position(|v| !v.is_finite()) {
                let per = yv.len() / total;
                return Err(AuditError::NonFinite { what: "labels", path: labels.path.clone(), count: yv.iter().filter(|v| !v.is_finite()).count(), sample: bad / per.max(1) }.into());
            }
            let per = yv.len() / total;
            let mut shape = labels.shape.clone();
            shape[0] = n as i64;
            tensor_from(&yv[..n * per], &shape, kind, device)?
        }
    };

    let attribute = match attribute {
        None => None,
        Some(a) => {
            let NpyData::Int(av, _) = &a.data else {
                return Err(AuditError::Dtype { what: "attribute", path: a.path.clone(), why: format!("dtype {}: attribute labels must be integers", a.dtype_name()) }.into());
            };
            if a.shape.len() != 1 || a.shape[0] as usize != total {
                return Err(AuditError::Shape {
                    what: "attribute",
                    path: a.path.clone(),
                    why: format!("shape {:?}: expected one integer per sample, [{total}] like inputs {}", a.shape, inputs.path.display()),
                }
                .into());
            }
            Some(av[..n].to_vec())
        }
    };
    Ok(AuditData { x, y, attribute, n, source: format!("{} ({} of {total} samples)", inputs.path.display(), n) })
}

// ---------------------------------------------------------------------------------------------
// Report

/// One layer of the JSON report: every metric under its METRICS.md name, null when absent
/// (with the reason under `absent`), and the full metric records under `details`.
#[derive(Serialize, Debug, Clone)]
pub(crate) struct LayerRow {
    pub name: String,
    pub params: usize,
    pub sensitivity: Option<f64>,
    pub sensitivity_se: Option<f64>,
    pub sensitivity_rms: Option<f64>,
    pub relative_sensitivity: Option<f64>,
    pub subspace_distance: Option<f64>,
    pub subspace_separation: Option<f64>,
    pub usable_information_bits: Option<f64>,
    pub attack_accuracy: Option<f64>,
    pub majority_accuracy: Option<f64>,
    pub usable_original_bits_per_dim: Option<f64>,
    pub psnr: Option<f64>,
    pub absent: BTreeMap<String, String>,
    pub details: LayerDetails,
}

#[derive(Serialize, Debug, Clone)]
pub(crate) struct LayerDetails {
    pub m1: Metric<Sensitivity>,
    pub m2: Metric<Subspace>,
    pub m3: Metric<UsableInformation>,
    pub m4: Metric<Inversion>,
}

impl LayerRow {
    pub fn new(name: String, params: usize, details: LayerDetails) -> Self {
        let mut absent = BTreeMap::new();
        let mut take = |metric: &str, value: Option<f64>, reason: Option<&str>| -> Option<f64> {
            if value.is_none() {
                absent.insert(metric.to_string(), reason.unwrap_or("not computed").to_string());
            }
            value
        };
        let s = details.m1.measured();
        let r1 = details.m1.absent_reason();
        let m2 = details.m2.measured();
        let r2 = details.m2.absent_reason();
        let m3 = details.m3.measured();
        let r3 = details.m3.absent_reason();
        let m4 = details.m4.measured();
        let r4 = details.m4.absent_reason();
        let relative_reason = if s.is_some() { Some("the layer's released gradient is exactly 0") } else { r1 };
        Self {
            sensitivity: take("sensitivity", s.map(|s| s.sensitivity), r1),
            sensitivity_se: take("sensitivity_se", s.filter(|s| !s.exact).map(|s| s.sensitivity_se), if s.is_some() { Some("exact mode: no standard error") } else { r1 }),
            sensitivity_rms: take("sensitivity_rms", s.map(|s| s.sensitivity_rms), r1),
            relative_sensitivity: take("relative_sensitivity", s.and_then(|s| s.relative_sensitivity), relative_reason),
            subspace_distance: take("subspace_distance", m2.map(|m| m.subspace_distance), r2),
            subspace_separation: take("subspace_separation", m2.map(|m| m.subspace_separation), r2),
            usable_information_bits: take("usable_information_bits", m3.map(|m| m.usable_information_bits), r3),
            attack_accuracy: take("attack_accuracy", m3.map(|m| m.attack_accuracy), r3),
            majority_accuracy: take("majority_accuracy", m3.map(|m| m.majority_accuracy), r3),
            usable_original_bits_per_dim: take("usable_original_bits_per_dim", m4.map(|m| m.usable_original_bits_per_dim), r4),
            psnr: take("psnr", m4.map(|m| m.psnr), r4),
            name,
            params,
            absent,
            details,
        }
    }

    /// The plotted metrics, in order: (METRICS.md name, value).
    pub fn plotted(&self) -> Vec<(&'static str, Option<f64>)> {
        vec![
            ("sensitivity", self.sensitivity),
            ("sensitivity_rms", self.sensitivity_rms),
            ("relative_sensitivity", self.relative_sensitivity),
            ("subspace_distance", self.subspace_distance),
            ("subspace_separation", self.subspace_separation),
            ("usable_information_bits", self.usable_information_bits),
            ("attack_accuracy", self.attack_accuracy),
            ("usable_original_bits_per_dim", self.usable_original_bits_per_dim),
            ("psnr", self.psnr),
        ]
    }
}

#[derive(Serialize)]
struct AuditReport {
    model: String,
    data: String,
    samples: usize,
    batch_size: usize,
    probes: Option<usize>,
    seed: u64,
    exact: bool,
    loss: LossKind,
    device: String,
    train_steps: usize,
    settings: Settings,
    seconds: BTreeMap<&'static str, f64>,
    layers: Vec<LayerRow>,
}

#[derive(Serialize)]
struct Settings {
    sensitivity: SensitivitySettings,
    subspace: SubspaceSettings,
    usable: UsableSettings,
    inversion: Option<(InversionPlan, InversionSettings)>,
}

pub fn run(args: AuditArgs) -> anyhow::Result<()> {
    if args.batch_size == 0 {
        return Err(AuditError::Usage("--batch-size must be at least 1".into()).into());
    }
    if !args.exact && args.probes < 2 {
        return Err(AuditError::Usage(format!("--probes must be at least 2 (for a standard error), got {}", args.probes)).into());
    }
    let device = parse_device(&args.device)?;
    let model = load_model(&args.model, args.seed, device)?;
    let data = load_data(&args, &model, device)?;
    let layers = model.layers()?;
    let names = layers.names();
    let started = Instant::now();
    let mut seconds = BTreeMap::new();

    if args.train_steps > 0 {
        if matches!(model, AuditModel::Script(_)) {
            return Err(AuditError::Usage("--train-steps is for the built-in models only".into()).into());
        }
        let all: Vec<usize> = (0..data.n).collect();
        let mut opt = model.optimizer()?;
        model.train(&data.x, &data.y, &all, 0..args.train_steps, 64, args.seed, &mut opt)?;
        seconds.insert("training", started.elapsed().as_secs_f64());
    }

    let loss_kind = args.loss;
    let loss_fn = |x: &Tensor, y: &Tensor| model.loss(loss_kind, x, y);
    let batch = args.batch_size.min(data.n);
    if batch < args.batch_size {
        eprintln!("note: --batch-size {} exceeds the {} audited samples; M1 uses a batch of {batch}", args.batch_size, data.n);
    }

    let t = Instant::now();
    let m1_settings = SensitivitySettings { probes: args.probes, method: JvpMethod::DoubleBackward, exact: args.exact };
    let xb = data.x.f_narrow(0, 0, batch as i64)?;
    let yb = data.y.f_narrow(0, 0, batch as i64)?;
    let m1 = estimate_sensitivity(&layers, &loss_fn, &xb, &yb, &m1_settings, args.seed, 0).context("M1 (sensitivity)")?;
    seconds.insert("m1", t.elapsed().as_secs_f64());

    let subspace_settings = SubspaceSettings::default();
    let usable_settings = UsableSettings { l2: args.l2, ..Default::default() };
    let absent_all = |reason: &str| -> Vec<String> { names.iter().map(|_| reason.to_string()).collect() };
    let (m2, m3): (Vec<Metric<Subspace>>, Vec<Metric<UsableInformation>>) = match &data.attribute {
        None => {
            let r = absent_all("no attribute labels given (--attribute)");
            (r.iter().map(Metric::absent).collect(), r.iter().map(Metric::absent).collect())
        }
        Some(attribute) => {
            let t = Instant::now();
            let m2 = estimate_subspace(&layers, &loss_fn, &data.x, &data.y, attribute, &subspace_settings, args.seed, 0).context("M2 (subspace distance)")?;
            seconds.insert("m2", t.elapsed().as_secs_f64());
            let t = Instant::now();
            let m3 = if data.n < usable_settings.min_samples {
                absent_all(&format!("insufficient samples: {} < {}", data.n, usable_settings.min_samples)).iter().map(Metric::absent).collect()
            } else {
                let grads = per_sample_gradients(&layers, &loss_fn, &data.x, &data.y).context("M3 (per-sample gradients)")?;
                usable_information_layers(&grads, attribute, &usable_settings, args.seed).context("M3 (usable information)")?
            };
            seconds.insert("m3", t.elapsed().as_secs_f64());
            (m2, m3)
        }
    };

    let inversion = args.invert.then(|| {
        (InversionPlan { batch_size: args.invert_batch_size, releases: args.invert_releases }, InversionSettings { iterations: args.invert_iterations, learning_rate: args.invert_lr, ..Default::default() })
    });
    let m4: Vec<Metric<Inversion>> = match &inversion {
        None => absent_all("not computed: pass --invert (the attack is slow)").iter().map(Metric::absent).collect(),
        Some((plan, settings)) => {
            let t = Instant::now();
            let m4 = estimate_original_information(&layers, &loss_fn, &data.x, &data.y, plan, settings, args.seed, None).context("M4 (inversion)")?;
            seconds.insert("m4", t.elapsed().as_secs_f64());
            m4
        }
    };

    let rows: Vec<LayerRow> = layers
        .layers()
        .iter()
        .zip(m1.into_iter().zip(m2).zip(m3).zip(m4))
        .map(|(layer, (((m1, m2), m3), m4))| LayerRow::new(layer.name.clone(), layer.numel(), LayerDetails { m1, m2, m3, m4 }))
        .collect();

    println!("gradguard audit: {}, data {}", model.label(), data.source);
    println!("M1 on the first {batch} samples ({}), seed {}", if args.exact { "exact".to_string() } else { format!("K = {} probes", args.probes) }, args.seed);
    print!("{}", table(&rows));
    let report = AuditReport {
        model: model.label(),
        data: data.source.clone(),
        samples: data.n,
        batch_size: batch,
        probes: (!args.exact).then_some(args.probes),
        seed: args.seed,
        exact: args.exact,
        loss: args.loss,
        device: args.device.clone(),
        train_steps: args.train_steps,
        settings: Settings { sensitivity: m1_settings, subspace: subspace_settings, usable: usable_settings, inversion },
        seconds,
        layers: rows,
    };
    if let Some(path) = &args.json {
        write_parent(path)?;
        std::fs::write(path, serde_json::to_string_pretty(&report)?).with_context(|| format!("writing the JSON report {}", path.display()))?;
        println!("JSON report: {}", path.display());
    }
    if let Some(path) = &args.plot {
        write_parent(path)?;
        let title = format!("gradguard audit: {} (n = {batch} for M1, {} samples)", model.label(), data.n);
        bar_panels_svg(path, &title, &report.layers)?;
        println!("SVG plot: {}", path.display());
    }
    Ok(())
}

pub(crate) fn write_parent(path: &Path) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    Ok(())
}

pub(crate) fn fmt(v: Option<f64>) -> String {
    match v {
        Some(v) if v != 0.0 && (v.abs() >= 1e4 || v.abs() < 1e-3) => format!("{v:.3e}"),
        Some(v) => format!("{v:.4}"),
        None => "-".into(),
    }
}

fn table(rows: &[LayerRow]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:>8} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>7} {:>9} {:>8}",
        "layer", "P_l", "S_l", "±se", "S_rms", "R_l", "d_betw", "separ", "M3 bits", "acc", "M4 b/dim", "PSNR"
    );
    for r in rows {
        let name = if r.name.chars().count() > 16 { format!("{}~", r.name.chars().take(15).collect::<String>()) } else { r.name.clone() };
        let _ = writeln!(
            out,
            "{:<16} {:>8} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>7} {:>9} {:>8}",
            name,
            r.params,
            fmt(r.sensitivity),
            fmt(r.sensitivity_se),
            fmt(r.sensitivity_rms),
            fmt(r.relative_sensitivity),
            fmt(r.subspace_distance),
            fmt(r.subspace_separation),
            fmt(r.usable_information_bits),
            fmt(r.attack_accuracy),
            fmt(r.usable_original_bits_per_dim),
            fmt(r.psnr),
        );
    }
    let absent: Vec<String> = rows
        .first()
        .map(|r| {
            let mut reasons: BTreeMap<&String, Vec<&String>> = BTreeMap::new();
            for (metric, reason) in &r.absent {
                reasons.entry(reason).or_default().push(metric);
            }
            reasons.into_iter().map(|(reason, metrics)| format!("  {}: {reason}", metrics.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", "))).collect()
        })
        .unwrap_or_default();
    if !absent.is_empty() {
        let _ = writeln!(out, "absent (first layer):\n{}", absent.join("\n"));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// SVG plots (plotters, SVG backend: text is SVG <text>, readable in any SVG viewer)

const PALETTE: [plotters::style::RGBColor; 8] = [
    plotters::style::RGBColor(31, 119, 180),
    plotters::style::RGBColor(255, 127, 14),
    plotters::style::RGBColor(44, 160, 44),
    plotters::style::RGBColor(214, 39, 40),
    plotters::style::RGBColor(148, 103, 189),
    plotters::style::RGBColor(140, 86, 75),
    plotters::style::RGBColor(227, 119, 194),
    plotters::style::RGBColor(127, 127, 127),
];

fn plot_err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("drawing {}: {e}", path.display())
}

/// One panel per metric, one bar per layer in model order; an absent value is marked "absent".
pub(crate) fn bar_panels_svg(path: &Path, title: &str, rows: &[LayerRow]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let names: Vec<String> = rows.iter().map(|r| r.name.clone()).collect();
    let metrics: Vec<(&str, Vec<Option<f64>>)> = match rows.first() {
        None => vec![],
        Some(first) => first.plotted().iter().enumerate().map(|(k, (name, _))| (*name, rows.iter().map(|r| r.plotted()[k].1).collect())).collect(),
    };
    let cols = 3;
    let panel_rows = metrics.len().div_ceil(cols).max(1);
    let err = plot_err(path);
    let root = SVGBackend::new(path, (1200, 60 + 300 * panel_rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(&err)?;
    let panels = root.split_evenly((panel_rows, cols));
    let n = names.len();
    for (panel, (metric, values)) in panels.iter().zip(&metrics) {
        let finite: Vec<f64> = values.iter().flatten().copied().filter(|v| v.is_finite()).collect();
        let lo = finite.iter().copied().fold(0.0f64, f64::min);
        let hi = finite.iter().copied().fold(0.0f64, f64::max);
        let (lo, hi) = if hi - lo > 0.0 { (lo - 0.05 * (hi - lo).abs() * (lo < 0.0) as i32 as f64, hi * 1.12 + 1e-300) } else { (0.0, 1.0) };
        let mut chart = ChartBuilder::on(panel)
            .caption(*metric, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), lo..hi)
            .map_err(&err)?;
        let names_ref = &names;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n.max(1))
            .x_label_formatter(&|v: &f64| {
                let i = v.round();
                if (v - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names_ref.len() {
                    names_ref[i as usize].clone()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|v: &f64| short(*v))
            .light_line_style(WHITE)
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(&err)?;
        for (i, v) in values.iter().enumerate() {
            match v {
                Some(v) if v.is_finite() => {
                    let color = PALETTE[i % PALETTE.len()];
                    chart
                        .draw_series(std::iter::once(Rectangle::new([(i as f64 - 0.35, 0.0), (i as f64 + 0.35, *v)], color.filled())))
                        .map_err(&err)?;
                    chart
                        .draw_series(std::iter::once(Text::new(short(*v), (i as f64 - 0.3, v.max(0.0) + 0.04 * (hi - lo)), ("sans-serif", 11))))
                        .map_err(&err)?;
                }
                _ => {
                    chart
                        .draw_series(std::iter::once(Text::new("absent", (i as f64 - 0.25, lo + 0.05 * (hi - lo)), ("sans-serif", 12).into_font().color(&RED))))
                        .map_err(&err)?;
                }
            }
        }
    }
    root.present().map_err(&err)?;
    Ok(())
}

/// A compact number for axis and bar labels.
pub(crate) fn short(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1e4 || v.abs() < 1e-2 {
        format!("{v:.1e}")
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// One panel of a [`line_panels_svg`] figure.
pub(crate) struct Panel {
    pub title: String,
    pub log_y: bool,
    /// (legend label, points)
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

/// A grid of line plots sharing an x axis (log when `log_x`); non-positive values are dropped
/// from a log axis, non-finite ones always.
pub(crate) fn line_panels_svg(path: &Path, title: &str, x_label: &str, panels: &[Panel], log_x: bool) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let err = plot_err(path);
    let cols = 3usize.min(panels.len().max(1));
    let rows = panels.len().div_ceil(cols).max(1);
    let root = SVGBackend::new(path, (420 * cols as u32, 60 + 340 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(&err)?;
    for (area, panel) in root.split_evenly((rows, cols)).iter().zip(panels) {
        let log_y = panel.log_y;
        let keep = |(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && (!log_x || *x > 0.0) && (!log_y || *y > 0.0);
        let series: Vec<(String, Vec<(f64, f64)>)> = panel.series.iter().map(|(l, p)| (l.clone(), p.iter().copied().filter(keep).collect())).collect();
        let all: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
        let (mut x0, mut x1) = all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (x, _)| (a.min(*x), b.max(*x)));
        let (mut y0, mut y1) = all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (_, y)| (a.min(*y), b.max(*y)));
        if !x0.is_finite() {
            (x0, x1, y0, y1) = (1.0, 2.0, 1.0, 2.0);
        }
        if x1 <= x0 {
            x1 = x0 * 2.0 + 1.0;
        }
        if log_y {
            if y1 <= y0 {
                y1 = y0 * 10.0;
            }
            y0 /= 1.5;
            y1 *= 1.5;
        } else {
            let pad = if y1 > y0 { 0.08 * (y1 - y0) } else { 0.5 * y0.abs().max(1e-3) };
            y0 = if y0 >= 0.0 && y0 - pad < 0.0 { 0.0 } else { y0 - pad };
            y1 += pad;
        }
        let mut builder = ChartBuilder::on(area);
        builder.caption(&panel.title, ("sans-serif", 15)).margin(10).x_label_area_size(38).y_label_area_size(62);
        macro_rules! draw {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc(x_label)
                    .x_label_formatter(&|v| short(*v))
                    .y_label_formatter(&|v| short(*v))
                    .light_line_style(WHITE)
                    .label_style(("sans-serif", 11))
                    .draw()
                    .map_err(&err)?;
                for (k, (label, points)) in series.iter().enumerate() {
                    let color = PALETTE[k % PALETTE.len()];
                    chart
                        .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
                        .map_err(&err)?
                        .label(label.as_str())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
                    chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(&err)?;
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 11))
                    .position(SeriesLabelPosition::UpperRight)
                    .draw()
                    .map_err(&err)?;
            }};
        }
        // On a log x axis, ticks at the data's own x values (plotters' default log ticks crowd).
        let mut ticks: Vec<f64> = all.iter().map(|p| p.0).collect();
        ticks.sort_by(f64::total_cmp);
        ticks.dedup();
        match (log_x, log_y) {
            (false, false) => draw!(builder.build_cartesian_2d(x0..x1, y0..y1).map_err(&err)?),
            (true, false) => draw!(builder.build_cartesian_2d((x0 / 1.1..x1 * 1.1).log_scale().with_key_points(ticks), y0..y1).map_err(&err)?),
            (false, true) => draw!(builder.build_cartesian_2d(x0..x1, (y0..y1).log_scale()).map_err(&err)?),
            (true, true) => draw!(builder.build_cartesian_2d((x0 / 1.1..x1 * 1.1).log_scale().with_key_points(ticks), (y0..y1).log_scale()).map_err(&err)?),
        }
    }
    root.present().map_err(&err)?;
    Ok(())
}
