//! Layer discovery: the trainable parameters of a VarStore grouped into layers as
//! METRICS.md defines them (the name without its last component and any `__N` suffix), in the
//! model's creation order; and the model's buffers (batch norm's running statistics, say),
//! which the guard's own passes must leave as they found them.
use crate::error::{GuardError, Result};
use serde::Serialize;
use tch::{nn::VarStore, Tensor};

/// One trainable parameter tensor of a layer.
#[derive(Debug)]
pub struct Param {
    /// The VarStore name of the parameter, e.g. `conv1.weight`.
    pub name: String,
    /// The tensor's shape.
    pub shape: Vec<i64>,
    /// Scalars in the tensor.
    pub numel: usize,
    /// Shares storage (and `.grad()`) with the VarStore's variable.
    pub tensor: Tensor,
}

/// A layer: the parameters that share a module path.
#[derive(Debug)]
pub struct Layer {
    /// The layer name: the parameter path without its last component.
    pub name: String,
    /// The layer's trainable parameters, in creation order.
    pub params: Vec<Param>,
}

impl Layer {
    /// P_l: the number of scalars in the layer.
    pub fn numel(&self) -> usize {
        self.params.iter().map(|p| p.numel).sum()
    }
}

/// What a report says about a layer's identity.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct LayerInfo {
    /// The layer name.
    pub name: String,
    /// P_l: scalars in the layer.
    pub params: usize,
}

/// The model's layers in creation order, and its buffers.
#[derive(Debug)]
pub struct LayerMap {
    layers: Vec<Layer>,
    /// State the forward pass may write and no optimizer trains (batch norm's running mean and
    /// variance, say), by name; the tensors share storage with the model's.
    buffers: Vec<(String, Tensor)>,
    /// Declared: the forward mixes samples (batch norm in training mode).
    coupled: bool,
}

/// The layer a parameter name belongs to: drop the last component (and with it any `__N`
/// duplicate suffix). A top-level parameter with no path is its own layer.
pub fn layer_name(param_name: &str) -> String {
    match param_name.rsplit_once('.') {
        Some((path, _)) => path.to_string(),
        None => strip_duplicate_suffix(param_name).to_string(),
    }
}

/// Named items (parameters, or just their names) grouped into layers by [`layer_name`]: the
/// layers in the order of their first parameter, each with its parameters in the given order.
/// [`LayerMap`] groups a model's parameters so; the federated server groups parameter names so.
pub fn group_by_layer<T>(named: impl IntoIterator<Item = (String, T)>) -> Vec<(String, Vec<(String, T)>)> {
    let mut layers: Vec<(String, Vec<(String, T)>)> = Vec::new();
    for (name, item) in named {
        let lname = layer_name(&name);
        match layers.iter_mut().find(|(l, _)| *l == lname) {
            Some((_, params)) => params.push((name, item)),
            None => layers.push((lname, vec![(name, item)])),
        }
    }
    layers
}

fn strip_duplicate_suffix(name: &str) -> &str {
    match name.rsplit_once("__") {
        Some((base, n)) if !base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => name,
    }
}

impl LayerMap {
    /// Discovers the layers of a VarStore. `trainable_variables()` gives creation order without
    /// names, `variables()` names without order: they are matched by tensor identity
    /// (storage pointer, shape and dtype). The variables created untrainable (tch's
    /// `zeros_no_train`/`ones_no_train`: `nn::batch_norm*`'s `running_mean` and `running_var`)
    /// are the map's [`buffers`](Self::buffers); frozen trainable variables are neither.
    pub fn from_var_store(vs: &VarStore) -> Result<Self> {
        let named = vs.variables();
        let mut named: Vec<(String, Tensor)> = named.into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let trainable = vs.trainable_variables();
        let mut params = Vec::new();
        for tensor in &trainable {
            if !tensor.requires_grad() {
                continue; // a frozen VarStore keeps its variables listed but not trainable
            }
            let name = named
                .iter()
                .find(|(_, t)| same_tensor(t, tensor))
                .map(|(n, _)| n.clone())
                .ok_or_else(|| GuardError::Layers("a trainable variable has no name in the VarStore".into()))?;
            params.push((name, tensor.shallow_clone()));
        }
        let buffers = named.into_iter().filter(|(_, t)| !trainable.iter().any(|p| same_tensor(p, t))).collect();
        Ok(Self::from_named_params(params)?.with_buffers(buffers))
    }

    /// Builds the map from parameters already in model order (TorchScript modules, tests).
    pub fn from_named_params(params: Vec<(String, Tensor)>) -> Result<Self> {
        if params.is_empty() {
            return Err(GuardError::NoParameters);
        }
        let layers = group_by_layer(params)
            .into_iter()
            .map(|(name, params)| Layer {
                name,
                params: params
                    .into_iter()
                    .map(|(name, tensor)| Param { name, shape: tensor.size(), numel: tensor.numel(), tensor })
                    .collect(),
            })
            .collect();
        Ok(Self { layers, buffers: Vec::new(), coupled: false })
    }

    /// The same map with the model's buffers (named; sharing storage with the model's): the
    /// estimators restore them, bit for bit, after their own passes.
    pub fn with_buffers(self, buffers: Vec<(String, Tensor)>) -> Self {
        Self { buffers, ..self }
    }

    /// The same map, declared to be of a model whose forward mixes the samples of a batch
    /// (batch norm in training mode): M1's probes then always run on the whole batch, the
    /// exact route for such a model, whatever `probe_samples` asks (METRICS.md, M1, sub-batch
    /// probes). Without the declaration the coupling is detected on the first sub-batch of each
    /// estimate (`measure/sub_batch.rs`); declaring it saves that sub-batch's pass.
    pub fn with_coupled_samples(self) -> Self {
        Self { coupled: true, ..self }
    }

    /// Whether the model is declared to mix the samples of a batch
    /// ([`with_coupled_samples`](Self::with_coupled_samples)).
    pub fn couples_samples(&self) -> bool {
        self.coupled
    }

    /// The model's buffers, by name (empty for a model without any).
    pub fn buffers(&self) -> &[(String, Tensor)] {
        &self.buffers
    }

    /// The first buffer holding a NaN or an infinity, by name (one host read for all).
    pub(crate) fn non_finite_buffer(&self) -> Result<Option<&str>> {
        if self.buffers.is_empty() {
            return Ok(None);
        }
        let torch = |e| GuardError::Torch { context: "checking the model's buffers", source: e };
        let finite = self
            .buffers
            .iter()
            .map(|(_, t)| t.f_isfinite().and_then(|f| f.f_all()).and_then(|f| f.f_to_device(tch::Device::Cpu)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(torch)?;
        let finite = Tensor::f_stack(&finite, 0).and_then(|f| f.f_to_kind(tch::Kind::Int64)).map_err(torch)?;
        let finite = Vec::<i64>::try_from(&finite).map_err(torch)?;
        Ok(finite.iter().position(|&f| f == 0).map(|b| self.buffers[b].0.as_str()))
    }

    /// Deep copies of the buffers, to be put back by [`BufferSnapshot::restore`].
    pub(crate) fn snapshot_buffers(&self) -> Result<BufferSnapshot<'_>> {
        let saved = tch::no_grad(|| self.buffers.iter().map(|(_, t)| t.f_detach_copy()).collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| GuardError::Torch { context: "copying the model's buffers", source: e })?;
        Ok(BufferSnapshot { buffers: &self.buffers, saved, restored: false })
    }

    /// The 2-norm of each tensor (in its dtype, on its device, no host read), aligned with
    /// [`flat_params`](Self::flat_params); an undefined tensor has norm 0, a non-finite entry
    /// makes its norm non-finite. One kernel per tensor: measured here on CPU, cheaper than a
    /// segmented reduction of the concatenated parameters or a norm with a dtype conversion.
    pub fn param_norms(&self, per_param: &[Tensor]) -> Result<Tensor> {
        per_param_scalars(per_param, "norms per parameter", |t| t.f_norm())
    }

    /// The largest |x| of each tensor, as [`param_norms`](Self::param_norms): min and max in
    /// one kernel per tensor (aminmax), then max(|min|, |max|) once over the stacked values.
    /// Measured here on CPU for the digits CNN's 8 tensors: 10 us for the aminmax kernels
    /// against 16 us for abs then max per tensor (an infinity norm is slower still). NaN
    /// propagates.
    pub fn param_max_abs(&self, per_param: &[Tensor]) -> Result<Tensor> {
        let torch = |e| GuardError::Torch { context: "max |x| per parameter", source: e };
        let like = per_param.iter().find(|t| t.defined()).map(|t| (t.kind(), t.device())).unwrap_or((tch::Kind::Double, tch::Device::Cpu));
        let (mut lows, mut highs) = (Vec::with_capacity(per_param.len()), Vec::with_capacity(per_param.len()));
        for t in per_param {
            let (lo, hi) = if t.defined() { t.f_aminmax(None, false) } else { Tensor::f_zeros([], like).map(|z| (z.shallow_clone(), z)) }.map_err(torch)?;
            lows.push(lo);
            highs.push(hi);
        }
        let (lows, highs) = (Tensor::f_stack(&lows, 0).map_err(torch)?, Tensor::f_stack(&highs, 0).map_err(torch)?);
        lows.f_abs().and_then(|l| l.f_maximum(&highs.f_abs()?)).map_err(torch)
    }

    /// Per-layer sums of squares from per-parameter norms read back to the host.
    pub fn layer_square_sums(&self, param_norms: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; self.layers.len()];
        let mut norms = param_norms.iter();
        for (l, layer) in self.layers.iter().enumerate() {
            for _ in &layer.params {
                let n = norms.next().copied().unwrap_or(0.0);
                out[l] += n * n;
            }
        }
        out
    }

    /// The layers, in creation order.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether the model has no layers.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// The layer names, in creation order.
    pub fn names(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.name.clone()).collect()
    }

    /// Name and parameter count of each layer, for reports.
    pub fn infos(&self) -> Vec<LayerInfo> {
        self.layers.iter().map(|l| LayerInfo { name: l.name.clone(), params: l.numel() }).collect()
    }

    /// All parameter tensors in model order, with the index of the layer of each.
    pub fn flat_params(&self) -> (Vec<Tensor>, Vec<usize>) {
        let mut tensors = Vec::new();
        let mut owner = Vec::new();
        for (li, layer) in self.layers.iter().enumerate() {
            for p in &layer.params {
                tensors.push(p.tensor.shallow_clone());
                owner.push(li);
            }
        }
        (tensors, owner)
    }

    /// Total number of trainable scalars.
    pub fn numel(&self) -> usize {
        self.layers.iter().map(|l| l.numel()).sum()
    }
}

/// The model's buffers as they were before the guard's passes. Restored by
/// [`restore`](Self::restore), or on drop (a panic in the loss) as well as it can.
pub(crate) struct BufferSnapshot<'a> {
    buffers: &'a [(String, Tensor)],
    saved: Vec<Tensor>,
    restored: bool,
}

impl BufferSnapshot<'_> {
    /// Copies the saved values back into the model's buffers (bit-exact: same dtype, same
    /// shape).
    pub(crate) fn restore(mut self) -> Result<()> {
        self.restored = true;
        self.copy_back()
    }

    fn copy_back(&self) -> Result<()> {
        tch::no_grad(|| {
            for ((_, buffer), saved) in self.buffers.iter().zip(&self.saved) {
                buffer.shallow_clone().f_copy_(saved)?;
            }
            Ok(())
        })
        .map_err(|e| GuardError::Torch { context: "restoring the model's buffers", source: e })
    }
}

impl Drop for BufferSnapshot<'_> {
    fn drop(&mut self) {
        if !self.restored {
            let _ = self.copy_back();
        }
    }
}

fn same_tensor(a: &Tensor, b: &Tensor) -> bool {
    a.data_ptr() == b.data_ptr() && a.size() == b.size() && a.kind() == b.kind() && a.numel() > 0
}

/// Per-layer vectors of per-parameter tensors: one flattened vector per layer (parameters in
/// order, undefined ones as zeros), and back. Defences act on a layer as a whole.
impl LayerMap {
    /// The layer's per-parameter tensors joined into one flat vector; None when all are
    /// undefined (the layer is not used by the loss).
    pub fn join(&self, l: usize, per_param: &[Tensor]) -> Result<Option<Tensor>> {
        if per_param.iter().all(|t| !t.defined()) {
            return Ok(None);
        }
        let layer = &self.layers[l];
        let kind = per_param.iter().find(|t| t.defined()).map(|t| (t.kind(), t.device())).expect("one defined");
        let parts = per_param
            .iter()
            .zip(&layer.params)
            .map(|(t, p)| {
                if t.defined() {
                    t.f_detach().and_then(|t| t.f_reshape([-1]))
                } else {
                    Tensor::f_zeros([p.numel as i64], kind)
                }
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| GuardError::Torch { context: "joining a layer's tensors", source: e })?;
        Tensor::f_cat(&parts, 0).map(Some).map_err(|e| GuardError::Torch { context: "joining a layer's tensors", source: e })
    }

    /// Splits a layer's flat vector back into tensors shaped like its parameters.
    pub fn split(&self, l: usize, flat: &Tensor) -> Result<Vec<Tensor>> {
        let mut offset = 0i64;
        let mut out = Vec::new();
        for p in &self.layers[l].params {
            let part = flat
                .f_narrow(0, offset, p.numel as i64)
                .and_then(|t| t.f_reshape(p.shape.as_slice()))
                .map_err(|e| GuardError::Torch { context: "splitting a layer's vector", source: e })?;
            offset += p.numel as i64;
            out.push(part);
        }
        Ok(out)
    }
}

/// One scalar per tensor, stacked (0 for an undefined tensor, in the defined ones' dtype).
fn per_param_scalars(
    per_param: &[Tensor],
    context: &'static str,
    f: impl Fn(&Tensor) -> std::result::Result<Tensor, tch::TchError>,
) -> Result<Tensor> {
    let torch = |e| GuardError::Torch { context, source: e };
    let like = per_param.iter().find(|t| t.defined()).map(|t| (t.kind(), t.device())).unwrap_or((tch::Kind::Double, tch::Device::Cpu));
    let values = per_param
        .iter()
        .map(|t| if t.defined() { f(t) } else { Tensor::f_zeros([], like) })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(torch)?;
    Tensor::f_stack(&values, 0).map_err(torch)
}
