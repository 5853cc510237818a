//! [`TorchGuard`]: one guard over a PyTorch model, the engine's steps called without the GIL.
use super::errors::to_py;
use super::loss::PyLoss;
use super::policy::policy_with;
use super::report::StepReport;
use super::tensors::{unpack, unpack_named, wrap};
use crate::errors::{AuditError, ConfigError, InputError, InternalError, StateError};
use crate::resume::go_on;
use gradguard_guard::decide::{LogOptions, DEFAULT_CHECKPOINT_EVERY};
use gradguard_guard::{AuditLog, Batch, BlockReason, Guard, GuardError, LayerMap, Release};
use pyo3::prelude::*;
use pyo3::types::PyList;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard, TryLockError};
use tch::Tensor;

/// A guard over a PyTorch model's parameters (`gradguard.Guard` holds one).
#[pyclass(module = "gradguard._native")]
pub(crate) struct TorchGuard {
    /// Behind a lock: a pyclass must be `Sync` (Python threads may share it), the engine is not.
    guard: Mutex<Guard>,
    loss: PyLoss,
    optimizer: Py<PyAny>,
    /// The exporter's server (`metrics=`), stopped when the guard is dropped.
    _metrics: Option<gradguard_exporter::MetricsServer>,
    /// Where the guard went on from ("fresh", "restored (step N)", ...).
    origin: String,
}

/// A decided release for Python: its kind (`released`, `held`, `blocked`), the block's reason,
/// whether it was blocked for non-finite gradients, the report and, for the explicit form, the
/// protected update.
type Decided<'py> = (&'static str, Option<String>, bool, StepReport, Vec<(String, Bound<'py, PyAny>)>);

/// The batch's tensors, owned (a `Batch` borrows them; tensors are `Send`, borrows are not, so
/// the batch is put together on the engine's side of the GIL release).
struct Owned {
    x: Tensor,
    y: Tensor,
    attribute: Option<Tensor>,
    sample_ids: Option<Tensor>,
}

impl Owned {
    fn read(x: &Bound<'_, PyAny>, y: &Bound<'_, PyAny>, attribute: Option<&Bound<'_, PyAny>>, sample_ids: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        Ok(Self {
            x: unpack(x, "the inputs")?,
            y: unpack(y, "the targets")?,
            attribute: attribute.map(|a| unpack(a, "attribute")).transpose()?,
            sample_ids: sample_ids.map(|s| unpack(s, "sample_ids")).transpose()?,
        })
    }

    fn batch(&self) -> Batch<'_> {
        let mut batch = Batch::new(&self.x, &self.y);
        if let Some(a) = &self.attribute {
            batch = batch.with_attribute(a);
        }
        if let Some(s) = &self.sample_ids {
            batch = batch.with_sample_ids(s);
        }
        batch
    }
}

/// The name and the payload of a caught panic.
fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "(no message)".into())
}

impl TorchGuard {
    /// Runs `f` on the guard without the GIL (the loss re-acquires it for its calls), a panic
    /// caught; the error typed, with the exception a callback raised as its cause.
    fn engine<T: Send>(&self, py: Python<'_>, what: &str, f: impl FnOnce(&mut Guard, &PyLoss) -> Result<T, GuardError> + Send) -> PyResult<T> {
        let mut guard = self.lock()?;
        let (guard, loss) = (&mut *guard, &self.loss);
        let out = py.detach(|| catch_unwind(AssertUnwindSafe(|| f(guard, loss))));
        let raised = self.loss.failure().take();
        match out {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(to_py(py, what, e, raised)),
            Err(panic) => Err(InternalError::new_err(format!("internal error while {what} (a Rust panic, caught): {}", panic_message(panic)))),
        }
    }

    /// The guard, unless another call holds it (a loss function that calls back into its own
    /// guard, or a second thread): then an error, never a deadlock.
    fn lock(&self) -> PyResult<MutexGuard<'_, Guard>> {
        match self.guard.try_lock() {
            Ok(guard) => Ok(guard),
            Err(TryLockError::WouldBlock) => Err(InputError::new_err("the guard is busy with another call (from the loss function, or another thread): one step at a time")),
            // A panic was caught while the guard was held: its state may be half-updated.
            Err(TryLockError::Poisoned(_)) => Err(InternalError::new_err("the guard failed inside an earlier call (a caught panic): build a new one")),
        }
    }

    /// The release for Python; the optimizer steps when it is released and `step` says so.
    fn decided<'py>(&self, py: Python<'py>, release: Release, step: bool) -> PyResult<Decided<'py>> {
        let (kind, reason, non_finite, update, report) = match release {
            Release::Released { update, report } => ("released", None, false, update, report),
            Release::Held { report } => ("held", None, false, Vec::new(), report),
            Release::Blocked { reason, report } => ("blocked", Some(reason.to_string()), matches!(reason, BlockReason::NonFinite { .. }), Vec::new(), report),
        };
        if step && kind == "released" {
            self.optimizer.bind(py).call_method0("step")?;
        }
        let update = update.iter().map(|(n, t)| Ok((n.clone(), wrap(py, t)?))).collect::<PyResult<_>>()?;
        Ok((kind, reason, non_finite, StepReport(report), update))
    }
}

#[pymethods]
impl TorchGuard {
    /// Built by `gradguard.wrap` (see there): the parameters and buffers in module order with
    /// their dotted names, whether the model mixes the samples of a batch (batch norm in
    /// training mode), the optimizer, the loss and its embedding split, the policy text and
    /// its origin, the settings (JSON), the metrics address, the audit log, a state kept by the
    /// caller (JSON; the one saved beside the audit log wins) and, for tests and audits only,
    /// the noise key.
    #[new]
    #[pyo3(signature = (params, buffers, coupled, optimizer, loss_fn, embedding, policy, settings, metrics, audit_log, state, noise_key))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        params: Vec<(String, Bound<'_, PyAny>)>,
        buffers: Vec<(String, Bound<'_, PyAny>)>,
        coupled: bool,
        optimizer: Py<PyAny>,
        loss_fn: Py<PyAny>,
        embedding: Option<(Py<PyAny>, Py<PyAny>)>,
        policy: Option<(String, String)>,
        settings: Option<String>,
        metrics: Option<String>,
        audit_log: Option<String>,
        state: Option<String>,
        noise_key: Option<u64>,
    ) -> PyResult<Self> {
        let params = unpack_named(&params, "parameter")?;
        let buffers = unpack_named(&buffers, "buffer")?;
        let layers = LayerMap::from_named_params(params).map(|m| m.with_buffers(buffers)).map_err(|e| to_py(py, "mapping the model's layers", e, None))?;
        let layers = if coupled { layers.with_coupled_samples() } else { layers };
        let policy = policy_with(policy, settings)?;
        let mut guard = Guard::new(layers, policy).map_err(|e| to_py(py, "building the guard", e, None))?;
        if let Some(key) = noise_key {
            guard.set_noise_key(key);
        }
        // Before the log is opened: its `started` record carries the step the guard goes on from.
        let (origin, restarted) = go_on(&mut guard, state.as_deref(), audit_log.as_deref())?;
        if let Some(path) = audit_log {
            let log = AuditLog::open_options(&path, LogOptions::default()).map_err(|e| AuditError::new_err(e.to_string()))?;
            guard.set_audit_log_every(log, DEFAULT_CHECKPOINT_EVERY).map_err(|e| to_py(py, "opening the audit log", e, None))?;
            if restarted {
                // This process did not save the state it goes on from: a restart, on the record.
                guard.record_restart(format!("went on from the state saved beside the log: {origin}")).map_err(|e| to_py(py, "recording the restart", e, None))?;
            }
        }
        let metrics = match metrics {
            Some(addr) => Some(gradguard_exporter::attach(&mut guard, addr.as_str()).map_err(|e| ConfigError::new_err(format!("metrics: {e}")))?),
            None => None,
        };
        Ok(Self { guard: Mutex::new(guard), loss: PyLoss::new(loss_fn, embedding), optimizer, _metrics: metrics, origin })
    }

    /// After the user's backward: measure when due, protect `.grad` in place, step the
    /// optimizer when released.
    #[pyo3(signature = (x, y, attribute = None, sample_ids = None))]
    fn step<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>, y: &Bound<'py, PyAny>, attribute: Option<&Bound<'py, PyAny>>, sample_ids: Option<&Bound<'py, PyAny>>) -> PyResult<Decided<'py>> {
        let owned = Owned::read(x, y, attribute, sample_ids)?;
        let release = self.engine(py, "guarding the step", move |guard, loss| guard.after_backward(&owned.batch(), loss))?;
        self.decided(py, release, true)
    }

    /// The fast path: zero_grad, one forward and backward shared with the estimate, protect,
    /// step when released.
    #[pyo3(signature = (x, y, attribute = None, sample_ids = None))]
    fn train_step<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>, y: &Bound<'py, PyAny>, attribute: Option<&Bound<'py, PyAny>>, sample_ids: Option<&Bound<'py, PyAny>>) -> PyResult<Decided<'py>> {
        let owned = Owned::read(x, y, attribute, sample_ids)?;
        self.optimizer.bind(py).call_method0("zero_grad")?;
        let release = self.engine(py, "guarding the training step", move |guard, loss| guard.train_step(&owned.batch(), loss))?;
        self.decided(py, release, true)
    }

    /// The explicit form (a federated client's update): `update` is not edited; the protected
    /// tensors of the released layers come back. The optimizer is not touched.
    #[pyo3(signature = (update, x, y, attribute = None, sample_ids = None))]
    fn release<'py>(
        &self,
        py: Python<'py>,
        update: Vec<(String, Bound<'py, PyAny>)>,
        x: &Bound<'py, PyAny>,
        y: &Bound<'py, PyAny>,
        attribute: Option<&Bound<'py, PyAny>>,
        sample_ids: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Decided<'py>> {
        let update = unpack_named(&update, "update")?;
        let owned = Owned::read(x, y, attribute, sample_ids)?;
        let release = self.engine(py, "releasing the update", move |guard, loss| guard.release(&update, &owned.batch(), loss))?;
        self.decided(py, release, false)
    }

    /// Estimates now on a batch (an audit of the model as it is): the report (JSON). Nothing
    /// is decided, `.grad` is not read, the step does not advance.
    #[pyo3(signature = (x, y, attribute = None))]
    fn estimate(&self, py: Python<'_>, x: &Bound<'_, PyAny>, y: &Bound<'_, PyAny>, attribute: Option<&Bound<'_, PyAny>>) -> PyResult<String> {
        let owned = Owned::read(x, y, attribute, None)?;
        let report = self.engine(py, "estimating", move |guard, loss| guard.estimate(&owned.batch(), loss))?;
        serde_json::to_string(&report).map_err(|e| InternalError::new_err(format!("writing the report: {e}")))
    }

    /// Vets the parameters as they are now (set from outside: a federated round's global model)
    /// on a batch the caller would train on: the refusal's reason (None: accepted) and the
    /// vetting (JSON). Nothing is trained or stepped; a refusal is logged before it returns.
    #[pyo3(signature = (x, y))]
    fn vet(&self, py: Python<'_>, x: &Bound<'_, PyAny>, y: &Bound<'_, PyAny>) -> PyResult<(Option<String>, String)> {
        let owned = Owned::read(x, y, None, None)?;
        let vetting = self.engine(py, "vetting the parameters", move |guard, loss| guard.vet_parameters(&owned.batch(), loss))?;
        let json = serde_json::to_string(&vetting).map_err(|e| InternalError::new_err(format!("writing the vetting: {e}")))?;
        Ok((vetting.refusal(), json))
    }

    /// Where the guard went on from when it was built.
    fn state_origin(&self) -> String {
        self.origin.clone()
    }

    /// Saves the state beside the audit log (its hash in the log): the next guard built on this
    /// log goes on from here. The file's SHA-256; None without an audit log.
    fn save_state(&self, py: Python<'_>) -> PyResult<Option<String>> {
        self.lock()?.save_state().map_err(|e| to_py(py, "saving the guard state", e, None))
    }

    /// Ends the audit log (a last checkpoint and a `closed` record); the guard logs nothing
    /// after. Dropping the guard does the same.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.lock()?.close_audit_log().map_err(|e| to_py(py, "closing the audit log", e, None))
    }

    /// The layers as the guard names them, in module order.
    fn layer_names<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.lock()?.layers().names())
    }

    /// The policy's hash (of the text, or of the text and the settings laid over it).
    fn policy_hash(&self) -> PyResult<String> {
        Ok(self.lock()?.policy().hash().to_string())
    }

    /// The settings in force (JSON).
    fn settings(&self) -> PyResult<String> {
        serde_json::to_string(self.lock()?.policy().settings()).map_err(|e| InternalError::new_err(e.to_string()))
    }

    /// Where the metrics endpoint listens (`host:port`; the port chosen when `metrics` asked
    /// for port 0), or None without one.
    fn metrics_address(&self) -> Option<String> {
        self._metrics.as_ref().map(|m| m.local_addr().to_string())
    }

    /// Steps decided so far.
    fn steps(&self) -> PyResult<u64> {
        Ok(self.lock()?.step())
    }

    /// The guard's state (JSON: levels, step count, ledger), to go on in another process.
    fn state(&self) -> PyResult<String> {
        serde_json::to_string(&self.lock()?.state()).map_err(|e| InternalError::new_err(e.to_string()))
    }

    /// Goes on from a saved state (`state()`'s JSON): the protection levels, the step count and
    /// the ledger. A state of another policy or of other layers is a `StateError`; on an error
    /// nothing changes.
    fn restore_state(&self, state: &str) -> PyResult<()> {
        let state: gradguard_guard::GuardState = serde_json::from_str(state).map_err(|e| StateError::new_err(format!("unreadable guard state: {e}")))?;
        self.lock()?.restore_state(&state).map_err(|e| StateError::new_err(format!("restoring the guard state: {e}")))
    }

    /// The per-layer table of a step's report with this guard's thresholds.
    fn table(&self, report: &StepReport) -> PyResult<String> {
        Ok(self.lock()?.table(&report.0))
    }
}
