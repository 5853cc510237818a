//! The guarded local training step of one federated round: train with plain SGD on the node's
//! samples, compute the round's mean gradient, and let the guard (restored from the node's
//! saved state, appending to the node's audit log) decide what of it may leave.
use crate::config::TrainConfig;
use crate::errors::{FlError, FlResult};
use crate::model::LocalModel;
use crate::node_data::Source;
use crate::params::{params_to_dict, HostArray};
use crate::resume::go_on;
use gradguard_guard::{AuditLog, Batch, Guard, Policy, Release};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeSet;
use tch::Tensor;

/// What `train` returns: the protected update or the block, with the manifest and the report.
#[pyclass(frozen, module = "gradguard.fl")]
pub(crate) struct TrainResult {
    /// True when the guard refused the whole release: `update` is then empty.
    #[pyo3(get)]
    pub(crate) blocked: bool,
    /// True when the node refused the round's global model before training on it
    /// (`Guard::vet_parameters`: non-finite parameters, a sample isolation rule, or the analytic
    /// attacks above `vetting.max_recovered_fraction`); `blocked` is then true too and `reason`
    /// says why, e.g. "refused: the global model isolates 27 of 32 samples in fc0 ...".
    #[pyo3(get)]
    pub(crate) refused: bool,
    /// The vetting of the round's global model (JSON of `Vetting`: M6 per layer, the analytic
    /// attacks on this node's first batch, the checks).
    #[pyo3(get)]
    vetting: String,
    /// What happened to the release, in the guard's one vocabulary (`Manifest::kind`):
    /// `released`, `protected` (defence actions or withheld layers) or `blocked`.
    #[pyo3(get)]
    kind: &'static str,
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
    /// The guard's state after this release (JSON of `GuardState`: the levels per rule and
    /// layer, the step count): what the next round restores.
    #[pyo3(get)]
    state: String,
    /// How this round's guard started: `fresh`, `restored (step N)`, or why a saved state
    /// was not used.
    #[pyo3(get)]
    state_origin: String,
    /// The step of this release (the guard's count, across rounds when the state is restored).
    #[pyo3(get)]
    step: u64,
    pub(crate) update: Vec<HostArray>,
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

/// A stable 64-bit hash (FNV-1a) of a node's data folder, to seed its shuffles apart from
/// other nodes' with the same run seed.
fn path_seed(path: &str) -> u64 {
    path.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

pub(crate) fn train_impl(given: &[HostArray], cfg: &TrainConfig, source: &Source, saved: Option<&str>, audit_log: Option<&str>) -> FlResult<TrainResult> {
    let policy = Policy::from_toml_str(&cfg.policy_text, &cfg.policy_origin).map_err(|e| FlError::Policy(e.to_string()))?;
    tch::set_num_threads(cfg.threads);
    let node = match source {
        Source::Digits(p) => p.partition_id as u64,
        Source::Files(dir) => path_seed(&dir.path),
    };
    let seed = derive_seed(&[cfg.seed, cfg.server_round, node]);
    let mut model = LocalModel::new(&cfg.model, seed >> 1)?;
    // The server's parameters: their structure checked here, their values vetted below.
    model.load_for_vetting(given)?;
    let samples = source.load(&model)?;
    if samples.train.is_empty() {
        return Err(FlError::Data(format!("{} holds no training samples: nothing to train on", samples.label)));
    }
    // The guard is built (and the policy checked against the model) before any training.
    let mut guard = Guard::new(model.layer_map()?, policy)?;
    let audit_log = audit_log.filter(|p| !p.trim().is_empty());
    let (state_origin, restarted) = go_on(&mut guard, saved, audit_log)?;
    if let Some(path) = audit_log {
        let log = AuditLog::open(path).map_err(|e| FlError::Config(format!("audit-log {path}: {e}")))?;
        guard.set_audit_log(log).map_err(|e| FlError::Config(format!("audit-log {path}: {e}")))?;
        if restarted {
            // This process did not save the state it goes on from: a restart, on the record.
            guard.record_restart(format!("went on from the state saved beside the log: {state_origin}"))?;
        }
    }
    let global = model.snapshot()?;
    let params = model.tensors();
    let policy_hash = guard.policy().hash().to_string();

    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order = samples.train.clone();
    order.shuffle(&mut rng);
    let batch_size = cfg.batch_size.min(order.len());
    // Parameters this node did not train are vetted on its first batch before anything is
    // trained or released on them (in eval mode, as releases are measured).
    let (x0, y0, _) = samples.batch(&order[..batch_size])?;
    let vetting = guard.vet_parameters(&Batch::new(&x0, &y0), &model.model.loss_fn(model.loss))?;
    let vetting_json = serde_json::to_string(&vetting).map_err(|e| FlError::Internal(e.to_string()))?;
    if let Some(why) = vetting.refusal() {
        guard.close_audit_log()?;
        return Ok(TrainResult::refused(why, vetting_json, policy_hash, cfg, &guard, state_origin)?);
    }

    // Local training: plain SGD (no momentum), so the mean gradient below is exact. TorchScript
    // models train in training mode (dropout, batch statistics) and are measured in eval mode.
    let mut pos = 0;
    let mut used = BTreeSet::new();
    let mut loss_sum = 0.0;
    model.model.set_training(true).map_err(|e| FlError::Model(e.to_string()))?;
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
        let (x, y, _) = samples.batch(&idx)?;
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
    model.model.set_training(false).map_err(|e| FlError::Model(e.to_string()))?;
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
    let (x, y, a) = samples.batch(&used)?;
    // Sample ids (indices into the node's training data, the same every round): the M5 ledger,
    // carried in the state, then sums each sample's releases exactly across rounds.
    let ids = Tensor::f_from_slice(&used.iter().map(|&i| i as i64).collect::<Vec<i64>>())?;
    let batch = match &a {
        Some(a) => Batch::new(&x, &y).with_attribute(a),
        None => Batch::new(&x, &y),
    }
    .with_sample_ids(&ids);
    let loss_fn = model.model.loss_fn(model.loss);
    let (blocked, tensors, report) = match guard.release(&update, &batch, &loss_fn)? {
        Release::Released { update, report } => (None, update, report),
        Release::Blocked { reason, report } => (Some(format!("release blocked at step {}: {reason}", report.step)), vec![], report),
        Release::Held { report } => return Err(FlError::Internal(format!("the explicit release of step {} was held", report.step))),
    };
    let manifest = report.release.clone().ok_or_else(|| FlError::Internal("the guard's release has no manifest".into()))?;
    let released: Vec<String> = manifest.layers.iter().filter(|l| l.released).map(|l| l.name.clone()).collect();
    let withheld: Vec<String> = manifest.layers.iter().filter(|l| !l.released).map(|l| l.name.clone()).collect();
    let update = tensors.iter().map(|(n, t)| HostArray::from_tensor(n, t)).collect::<FlResult<Vec<_>>>()?;
    let shared_report = match &blocked {
        None => shared(&report, &released)?,
        Some(_) => String::new(),
    };
    // The state is on disk (its hash in the log) before the update can leave: a node that dies
    // after this goes on from here, with this release counted.
    guard.save_state()?;
    // The round's records end with a checkpoint and a `closed` record, so the next round's
    // writer continues a verified chain.
    guard.close_audit_log()?;
    let json = |e: serde_json::Error| FlError::Internal(e.to_string());
    Ok(TrainResult {
        blocked: blocked.is_some(),
        refused: false,
        vetting: vetting_json,
        kind: manifest.kind().name(),
        reason: blocked,
        shared_report,
        step: manifest.step,
        manifest: serde_json::to_string(&manifest).map_err(json)?,
        report: report.to_json(),
        num_examples: used.len(),
        local_steps: cfg.local_steps,
        lr: cfg.lr,
        train_loss: loss_sum / cfg.local_steps as f64,
        policy_hash,
        released_layers: released,
        withheld_layers: withheld,
        state: serde_json::to_string(&guard.state()).map_err(json)?,
        state_origin,
        update,
    })
}

impl TrainResult {
    /// The result of a round whose global model was refused: nothing trained, nothing released.
    fn refused(why: String, vetting: String, policy_hash: String, cfg: &TrainConfig, guard: &Guard, state_origin: String) -> FlResult<Self> {
        Ok(TrainResult {
            blocked: true,
            refused: true,
            vetting,
            kind: "refused",
            reason: Some(why),
            manifest: String::new(),
            report: String::new(),
            shared_report: String::new(),
            num_examples: 0,
            local_steps: 0,
            lr: cfg.lr,
            // Nothing was trained.
            train_loss: 0.0,
            policy_hash,
            released_layers: Vec::new(),
            withheld_layers: Vec::new(),
            state: serde_json::to_string(&guard.state()).map_err(|e| FlError::Internal(e.to_string()))?,
            state_origin,
            step: guard.step(),
            update: Vec::new(),
        })
    }
}

/// The report without the gradient statistics of the layers that are not released.
pub(crate) fn shared(report: &gradguard_guard::Report, released: &[String]) -> FlResult<String> {
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
