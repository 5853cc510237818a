//! The batch the guard inspects: inputs, targets and optional private attribute labels.
use crate::error::{GuardError, Result};
use crate::tensors::to_f64_vec;
use tch::{Kind, Tensor};

/// One training batch as the guard sees it. The tensors are borrowed, never copied.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub inputs: &'a Tensor,
    pub targets: &'a Tensor,
    /// Per-sample private attribute labels (integers), needed for M2.
    pub attribute: Option<&'a Tensor>,
}

impl<'a> Batch<'a> {
    pub fn new(inputs: &'a Tensor, targets: &'a Tensor) -> Self {
        Self { inputs, targets, attribute: None }
    }

    pub fn with_attribute(mut self, attribute: &'a Tensor) -> Self {
        self.attribute = Some(attribute);
        self
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
        Ok(n as usize)
    }

    /// Per-sample shape (inputs without the batch dimension).
    pub fn sample_shape(&self) -> Vec<i64> {
        self.inputs.size()[1..].to_vec()
    }

    /// The attribute labels on the host, if given.
    pub fn attribute_values(&self) -> Result<Option<Vec<i64>>> {
        match self.attribute {
            None => Ok(None),
            Some(a) => Ok(Some(to_f64_vec(a)?.into_iter().map(|v| v as i64).collect())),
        }
    }
}
