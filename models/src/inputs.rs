//! The audited data: .npy files checked against each other and against the model, or the
//! shipped digits for a built-in model.
use crate::data::Digits;
use crate::error::{ModelError, Result};
use crate::npy::{read_npy, NpyArray, NpyData};
use crate::source::{AuditModel, LossKind};
use gradguard_tch::first_line;
use std::path::PathBuf;
use tch::{Device, Kind, TchError, Tensor};

/// Where the audited data come from.
#[derive(Clone, Debug, Default)]
pub struct DataSpec {
    /// Inputs, .npy float32/float64 [n, ...], or integer token ids for a model with an
    /// embedding split. None: the shipped digits (built-in models only).
    pub inputs: Option<PathBuf>,
    /// Labels, .npy: integer class ids [n] (cross-entropy) or floats shaped like the model's
    /// output (mse). Required with `inputs`.
    pub labels: Option<PathBuf>,
    /// Private attribute, .npy integers [n]; enables M2 and M3.
    pub attribute: Option<PathBuf>,
    /// Audit only the first N samples (None: all).
    pub samples: Option<usize>,
    /// The loss, which decides what the labels must be.
    pub loss: LossKind,
    /// Integer inputs for a model without an embedding split: taken as they are (training,
    /// where the guard then measures no M1 and says why) instead of refused (the audit, whose
    /// M1 needs continuous inputs or a split).
    pub token_ids_without_split: bool,
}

/// The audited data as tensors on the model's device, inputs in the parameters' dtype (token
/// ids as int64).
pub struct AuditData {
    /// Inputs [n, ...].
    pub x: Tensor,
    /// Labels [n] (class ids) or targets [n, ...] (mse).
    pub y: Tensor,
    /// The private attribute, one integer per sample.
    pub attribute: Option<Vec<i64>>,
    /// Samples audited.
    pub n: usize,
    /// How reports describe the data.
    pub source: String,
    /// The loss the labels were checked for.
    pub loss: LossKind,
}

fn tensor_from(values: &[f64], shape: &[i64], kind: Kind, device: Device) -> Result<Tensor, TchError> {
    Tensor::f_from_slice(values)?.f_reshape(shape)?.f_to_kind(kind)?.f_to_device(device)
}

/// The first `n` samples of a float array, as a tensor of `kind` on `device`.
fn first_samples(values: &[f64], array: &NpyArray, n: usize, kind: Kind, device: Device) -> Result<Tensor> {
    let per = values.len() / array.samples();
    let mut shape = array.shape.clone();
    shape[0] = n as i64;
    Ok(tensor_from(&values[..n * per], &shape, kind, device)?)
}

/// An error unless every value is finite: names the count and the first bad sample.
fn check_finite(values: &[f64], array: &NpyArray, what: &'static str) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(bad) => {
            let per = (values.len() / array.samples()).max(1);
            Err(ModelError::NonFinite { what, path: array.path.clone(), count: values.iter().filter(|v| !v.is_finite()).count(), sample: bad / per })
        }
    }
}

impl AuditData {
    /// Loads and checks the data for `model`: dtypes, shapes, sample counts, finiteness, label
    /// ranges, and that the model runs on the inputs. Every error names the file.
    pub fn load(spec: &DataSpec, model: &AuditModel, device: Device) -> Result<Self> {
        match &spec.inputs {
            None => Self::shipped(spec, model, device),
            Some(_) => Self::from_files(spec, model, device),
        }
    }

    fn shipped(spec: &DataSpec, model: &AuditModel, device: Device) -> Result<Self> {
        if !model.is_builtin() {
            return Err(ModelError::Usage("--inputs and --labels are required with a TorchScript model".into()));
        }
        if spec.labels.is_some() || spec.attribute.is_some() {
            return Err(ModelError::Usage("--labels and --attribute need --inputs".into()));
        }
        let digits = Digits::embedded()?;
        let n = spec.samples.unwrap_or(digits.len()).min(digits.len());
        let idx: Vec<usize> = (0..n).collect();
        let (x, y, a) = digits.batch(&idx, device)?;
        let attribute = gradguard_guard::measure::to_f64_vec(&a)?.into_iter().map(|v| v as i64).collect();
        Ok(Self { x: x.f_to_kind(model.kind())?, y, attribute: Some(attribute), n, source: format!("shipped digits (first {n}, stroke-weight attribute)"), loss: spec.loss })
    }

    fn from_files(spec: &DataSpec, model: &AuditModel, device: Device) -> Result<Self> {
        let (Some(inputs_path), Some(labels_path)) = (&spec.inputs, &spec.labels) else {
            return Err(ModelError::Usage("--labels is required with --inputs".into()));
        };
        let inputs = read_npy(inputs_path, "inputs")?;
        let labels = read_npy(labels_path, "labels")?;
        let attribute = spec.attribute.as_deref().map(|p| read_npy(p, "attribute")).transpose()?;

        let total = inputs.samples();
        if labels.samples() != total {
            return Err(ModelError::Shape {
                what: "labels",
                path: labels.path.clone(),
                why: format!("{} samples along dimension 0, but inputs {} has {total}", labels.shape[0], inputs.path.display()),
            });
        }
        let n = spec.samples.unwrap_or(total).min(total);
        if n == 0 {
            return Err(ModelError::Usage("--samples must be at least 1".into()));
        }
        let kind = model.kind();
        let x = match &inputs.data {
            NpyData::Float(xv, _) => {
                check_finite(xv, &inputs, "inputs")?;
                first_samples(xv, &inputs, n, kind, device)?
            }
            // Token ids: M1 is measured on the model's embeddings.
            NpyData::Int(ids, _) if model.has_embedding() || spec.token_ids_without_split => {
                let per = ids.len() / total;
                let mut shape = inputs.shape.clone();
                shape[0] = n as i64;
                Tensor::f_from_slice(&ids[..n * per])?.f_reshape(shape.as_slice())?.f_to_device(device)?
            }
            NpyData::Int(..) => {
                let why = format!(
                    "dtype {}: inputs must be float32 or float64 (integer token ids need a TorchScript model that exports embed and forward_embedded)",
                    inputs.dtype_name()
                );
                return Err(ModelError::Dtype { what: "inputs", path: inputs.path.clone(), why });
            }
        };

        // Does the model take these inputs, and what does it output?
        let fit = |why: String| ModelError::ModelFit { path: inputs.path.display().to_string(), shape: inputs.shape[1..].to_vec(), model: model.label(), why };
        let probe = x.f_narrow(0, 0, n.min(2) as i64)?;
        let out = tch::no_grad(|| model.forward(&probe)).map_err(|e| fit(first_line(&e)))?;
        if model.has_embedding() {
            check_split(model, &probe, &out).map_err(fit)?;
        }
        let y = match spec.loss {
            LossKind::CrossEntropy => {
                let classes = (out.dim() == 2).then(|| out.size()[1]);
                let ids = class_ids(&labels, n, classes)?;
                if classes.is_none() {
                    return Err(fit(format!("cross-entropy needs outputs [n, classes], the model returns shape {:?}", out.size())));
                }
                Tensor::f_from_slice(&ids)?.f_to_device(device)?
            }
            LossKind::Mse => {
                let NpyData::Float(yv, _) = &labels.data else {
                    return Err(ModelError::Dtype { what: "labels", path: labels.path.clone(), why: format!("dtype {}: mse needs float targets", labels.dtype_name()) });
                };
                let out_size = out.size();
                if out_size.is_empty() {
                    return Err(fit("mse needs outputs [n, ...], the model returns a scalar".into()));
                }
                if labels.shape[1..] != out_size[1..] {
                    return Err(ModelError::Shape {
                        what: "labels",
                        path: labels.path.clone(),
                        why: format!("per-sample shape {:?}, but the model outputs {:?} per sample", &labels.shape[1..], &out_size[1..]),
                    });
                }
                check_finite(yv, &labels, "labels")?;
                first_samples(yv, &labels, n, kind, device)?
            }
        };
        let attribute = attribute.map(|a| attribute_values(&a, &inputs, n)).transpose()?;
        Ok(Self { x, y, attribute, n, source: format!("{} ({} of {total} samples)", inputs.path.display(), n), loss: spec.loss })
    }
}

/// Checks forward(x) == forward_embedded(embed(x)) on the probe batch (METRICS.md: the split
/// must be exact), to a relative 1e-4.
fn check_split(model: &AuditModel, probe: &Tensor, out: &Tensor) -> Result<(), String> {
    let split = tch::no_grad(|| model.embed(probe).and_then(|e| model.forward_embedded(&e))).map_err(|e| format!("the embedding split fails: {}", first_line(&e)))?;
    let gap = |a: &Tensor, b: &Tensor| -> Result<(f64, f64), TchError> {
        let diff = a.f_sub(b)?.f_abs()?.f_max()?.f_double_value(&[])?;
        Ok((diff, a.f_abs()?.f_max()?.f_double_value(&[])?))
    };
    if split.size() != out.size() {
        return Err(format!("forward_embedded(embed(x)) has shape {:?}, forward(x) {:?}", split.size(), out.size()));
    }
    let (diff, scale) = gap(out, &split).map_err(|e| first_line(&e))?;
    if !(diff <= 1e-4 * scale.max(1.0)) {
        return Err(format!("forward(x) and forward_embedded(embed(x)) differ by up to {diff:.3e}: the embedding split must give the same function"));
    }
    Ok(())
}

/// The first `n` class ids, checked: integers, shape [n], and (given the model's class count)
/// within 0..classes.
fn class_ids(labels: &NpyArray, n: usize, classes: Option<i64>) -> Result<Vec<i64>> {
    let NpyData::Int(yv, _) = &labels.data else {
        return Err(ModelError::Dtype {
            what: "labels",
            path: labels.path.clone(),
            why: format!("dtype {}: cross-entropy needs integer class ids (use --loss mse for float targets)", labels.dtype_name()),
        });
    };
    if labels.shape.len() != 1 {
        return Err(ModelError::Shape { what: "labels", path: labels.path.clone(), why: format!("shape {:?}: cross-entropy needs one class id per sample, shape [n]", labels.shape) });
    }
    if let Some(classes) = classes {
        if let Some((index, &value)) = yv[..n].iter().enumerate().find(|(_, &v)| v < 0 || v >= classes) {
            return Err(ModelError::LabelRange { path: labels.path.clone(), value, index, classes });
        }
    }
    Ok(yv[..n].to_vec())
}

/// The first `n` attribute values, checked: integers, one per input sample.
fn attribute_values(a: &NpyArray, inputs: &NpyArray, n: usize) -> Result<Vec<i64>> {
    let NpyData::Int(av, _) = &a.data else {
        return Err(ModelError::Dtype { what: "attribute", path: a.path.clone(), why: format!("dtype {}: attribute labels must be integers", a.dtype_name()) });
    };
    let total = inputs.samples();
    if a.shape.len() != 1 || a.samples() != total {
        return Err(ModelError::Shape {
            what: "attribute",
            path: a.path.clone(),
            why: format!("shape {:?}: expected one integer per sample, [{total}] like inputs {}", a.shape, inputs.path.display()),
        });
    }
    Ok(av[..n].to_vec())
}
