//! The user's Python loss as the engine's [`LossFn`]: the engine runs without the GIL and calls
//! back into Python for each forward it needs (the training step's, the probes', the per-sample
//! passes'), re-acquiring the GIL for the call only. The tensors cross without a copy, so the
//! graph the Python forward builds is the one the engine differentiates.
//!
//! An exception raised by the Python function cannot travel through libtorch's error type: it is
//! kept here (the first one of the step) and the engine sees a `TchError` with its message; the
//! caller then raises an `InputError` whose cause is the original exception.
use super::tensors::{unpack, wrap};
use gradguard_guard::{EmbeddingSplit, LossFn};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use std::sync::{Arc, Mutex};
use tch::{TchError, Tensor};

/// The first Python exception raised in a callback since the last [`Failure::take`].
#[derive(Clone, Default)]
pub(crate) struct Failure(Arc<Mutex<Option<PyErr>>>);

impl Failure {
    fn keep(&self, e: PyErr) {
        if let Ok(mut slot) = self.0.lock() {
            slot.get_or_insert(e);
        }
    }

    /// The kept exception, emptying the slot.
    pub(crate) fn take(&self) -> Option<PyErr> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }
}

/// One Python callable returning a tensor, called with tensors.
struct Callback {
    f: Py<PyAny>,
    /// How errors name it: `loss_fn`, `embed_fn`, `loss_from_embeddings_fn`.
    name: &'static str,
    failure: Failure,
}

impl Callback {
    fn call(&self, args: &[&Tensor]) -> Result<Tensor, TchError> {
        Python::attach(|py| {
            let called = (|| -> PyResult<Tensor> {
                let args = args.iter().map(|t| wrap(py, t)).collect::<PyResult<Vec<_>>>()?;
                let out = self.f.bind(py).call1(PyTuple::new(py, args)?)?;
                unpack(&out, &format!("what {} returned", self.name))
            })();
            called.map_err(|e| {
                let message = format!("{} raised {}", self.name, e);
                self.failure.keep(e);
                TchError::Torch(message)
            })
        })
    }
}

/// The user's loss, with its embedding split when one was declared.
pub(crate) struct PyLoss {
    loss: Callback,
    split: Option<PySplit>,
    failure: Failure,
}

/// `embedding=(embed_fn, loss_from_embeddings_fn)`.
struct PySplit {
    embed: Callback,
    from_embedded: Callback,
}

impl PyLoss {
    /// `loss_fn(inputs, targets)`, split at `embedding` when given.
    pub(crate) fn new(loss: Py<PyAny>, embedding: Option<(Py<PyAny>, Py<PyAny>)>) -> Self {
        let failure = Failure::default();
        let callback = |f, name| Callback { f, name, failure: failure.clone() };
        let split = embedding.map(|(e, l)| PySplit { embed: callback(e, "embed_fn"), from_embedded: callback(l, "loss_from_embeddings_fn") });
        Self { loss: callback(loss, "loss_fn"), split, failure }
    }

    /// Where the callbacks' exceptions are kept.
    pub(crate) fn failure(&self) -> &Failure {
        &self.failure
    }
}

impl LossFn for PyLoss {
    fn loss(&self, inputs: &Tensor, targets: &Tensor) -> Result<Tensor, TchError> {
        self.loss.call(&[inputs, targets])
    }

    fn embedding(&self) -> Option<&dyn EmbeddingSplit> {
        self.split.as_ref().map(|s| s as &dyn EmbeddingSplit)
    }
}

impl EmbeddingSplit for PySplit {
    fn embed(&self, inputs: &Tensor) -> Result<Tensor, TchError> {
        self.embed.call(&[inputs])
    }

    fn loss_from_embedded(&self, embedded: &Tensor, targets: &Tensor) -> Result<Tensor, TchError> {
        self.from_embedded.call(&[embedded, targets])
    }
}
