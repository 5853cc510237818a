//! The batch the guard inspects: inputs, targets and optional private attribute labels.
use super::tensors::to_f64_vec;
use crate::error::{GuardError, Result};
use tch::{Kind, Tensor};

/// One training batch as the guard sees it. The tensors are borrowed, never copied.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    inputs: &'a Tensor,
    targets: &'a Tensor,
    attribute: Option<&'a Tensor>,
    sample_ids: Option<&'a Tensor>,
}

impl<'a> Batch<'a> {
    /// Inputs (samples along dimension 0) and their targets. Checked when the guard reads
    /// the batch ([`Batch::validate`]), not here.
    pub fn new(inputs: &'a Tensor, targets: &'a Tensor) -> Self {
        Self { inputs, targets, attribute: None, sample_ids: None }
    }

    /// Adds per-sample private attribute labels (integers, one per sample): M2 and M3 need
    /// them.
    pub fn with_attribute(mut self, attribute: &'a Tensor) -> Self {
        self.attribute = Some(attribute);
        self
    }

    /// Adds each sample's id in the data set (integers, one per sample): the run ledger then
    /// sums M5's Fisher information per sample, exactly over the releases that contained it.
    pub fn with_sample_ids(mut self, ids: &'a Tensor) -> Self {
        self.sample_ids = Some(ids);
        self
    }

    /// The sample ids, if given.
    pub fn sample_ids(&self) -> Option<&'a Tensor> {
        self.sample_ids
    }

    /// The inputs.
    pub fn inputs(&self) -> &'a Tensor {
        self.inputs
    }

    /// The targets.
    pub fn targets(&self) -> &'a Tensor {
        self.targets
    }

    /// The attribute labels, if given.
    pub fn attribute(&self) -> Option<&'a Tensor> {
        self.attribute
    }

    /// Number of samples n; errors on an empty or mismatched batch.
    pub fn validate(&self) -> Result<usize> {
        if !self.inputs.defined() || self.inputs.dim() == 0 {
            return Err(GuardError::EmptyBatch);
        }
        let n = self.inputs.size()[0];
        if n == 0 {
            return Err(GuardError::EmptyBatch);
        }
        let first = |t: &Tensor| if t.defined() && t.dim() > 0 { t.size()[0] } else { -1 };
        if first(self.targets) != n {
            return Err(GuardError::BatchMismatch { what: "targets", inputs: n, got: first(self.targets) });
        }
        if let Some(a) = self.attribute {
            if !a.defined() || a.numel() as i64 != n {
                let got = if a.defined() { a.numel() as i64 } else { 0 };
                return Err(GuardError::BatchMismatch { what: "attribute labels", inputs: n, got });
            }
            if !matches!(a.kind(), Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8) {
                return Err(GuardError::AttributeKind(format!("{:?}", a.kind())));
            }
        }
        if let Some(ids) = self.sample_ids {
            if !ids.defined() || ids.numel() as i64 != n {
                let got = if ids.defined() { ids.numel() as i64 } else { 0 };
                return Err(GuardError::BatchMismatch { what: "sample ids", inputs: n, got });
            }
            if !matches!(ids.kind(), Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8) {
                return Err(GuardError::SampleIdKind(format!("{:?}", ids.kind())));
            }
        }
        Ok(n as usize)
    }

    /// Per-sample shape (inputs without the batch dimension; empty for undefined or 0-d
    /// inputs, which [`Batch::validate`] rejects).
    pub fn sample_shape(&self) -> Vec<i64> {
        if !self.inputs.defined() {
            return vec![];
        }
        self.inputs.size().get(1..).map(<[i64]>::to_vec).unwrap_or_default()
    }

    /// The sample ids on the host, if given.
    pub fn sample_id_values(&self) -> Result<Option<Vec<i64>>> {
        match self.sample_ids {
            None => Ok(None),
            Some(ids) => {
                use crate::error::TorchContext;
                let flat = ids.f_reshape([-1]).and_then(|t| t.f_to_kind(Kind::Int64)).and_then(|t| t.f_to_device(tch::Device::Cpu)).during("reading sample ids")?;
                Ok(Some(Vec::<i64>::try_from(&flat).during("reading sample ids")?))
            }
        }
    }

    /// The attribute labels on the host, if given.
    pub fn attribute_values(&self) -> Result<Option<Vec<i64>>> {
        match self.attribute {
            None => Ok(None),
            Some(a) => Ok(Some(to_f64_vec(a)?.into_iter().map(|v| v as i64).collect())),
        }
    }
}

/// A batch that owns its tensors: a run's step data, or micro-batches joined for the
/// aggregation floor. [`OwnedBatch::batch`] lends it as the [`Batch`] the guard reads.
#[derive(Debug)]
pub struct OwnedBatch {
    /// Inputs, samples along dimension 0.
    pub inputs: Tensor,
    /// Their targets.
    pub targets: Tensor,
    /// Per-sample private attribute labels (M2, M3), if any.
    pub attribute: Option<Tensor>,
    /// Each sample's id in the data set (the run ledger counts per sample with them), if any.
    pub sample_ids: Option<Tensor>,
}

impl OwnedBatch {
    /// Inputs and targets, without attribute or ids.
    pub fn new(inputs: Tensor, targets: Tensor) -> Self {
        Self { inputs, targets, attribute: None, sample_ids: None }
    }

    /// The batch the guard reads.
    pub fn batch(&self) -> Batch<'_> {
        let batch = Batch::new(&self.inputs, &self.targets);
        let batch = match &self.attribute {
            Some(a) => batch.with_attribute(a),
            None => batch,
        };
        match &self.sample_ids {
            Some(ids) => batch.with_sample_ids(ids),
            None => batch,
        }
    }
}
