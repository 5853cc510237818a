//! TorchScript models (`torch.jit.script` or `torch.jit.trace` output, saved with
//! `torch.jit.save`) as gradguard models: parameters trainable through a tch `VarStore`, layers
//! named as PyTorch users know them, and the module's buffers (batch norm's running
//! statistics) in the layer map, so that the guard's own passes leave them as they were.
//!
//! The module is loaded through gradguard's own binding (`script_module.rs`), since tch's
//! `CModule` does not list buffers. Its parameters and buffers are added to a VarStore the way
//! `tch::TrainableCModule::load` adds parameters: the dots rewritten (`conv1.weight` becomes
//! `conv1_weight`, since a VarStore path cannot hold a dot), which cannot be undone in general
//! (`block_1.weight` and `block.1.weight` both become `block_1_weight`). So the module's own
//! dotted names (PyTorch's, in module order) are kept for the layer map, and
//! [`var_store_names`] gives the VarStore's.
//!
//! A module on discrete inputs (token ids) declares its embedding split by convention: two
//! methods, `embed(tokens) -> embeddings` and `forward_embedded(embeddings) -> output`, with
//! `forward(tokens) == forward_embedded(embed(tokens))` (`@torch.jit.export` them on a
//! scripted module). They are used when present ([`TorchScriptModel::has_embedding`]).
use gradguard_guard::{GuardError, LayerMap};
use std::path::{Path, PathBuf};
use crate::script_module::ScriptModule;
use tch::{nn::VarStore, Device, TchError, Tensor};

/// Why a TorchScript model could not be used; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TorchScriptError {
    /// The file does not exist.
    #[error("{path}: no such file")]
    NotFound {
        /// The file.
        path: PathBuf,
    },
    /// libtorch could not load the file as a TorchScript module.
    #[error("{path} is not a TorchScript module (save one with torch.jit.save(torch.jit.script(model), path) or torch.jit.trace): {why}")]
    NotTorchScript {
        /// The file.
        path: PathBuf,
        /// libtorch's message, its first informative line.
        why: String,
    },
    /// Every parameter of the module is frozen.
    #[error("{path}: the TorchScript module has no trainable parameters")]
    NoParameters {
        /// The file.
        path: PathBuf,
    },
    /// The module defines one method of the embedding split but not the other.
    #[error("{path} defines {defined} but not {missing}: an embedding split needs both embed(tokens) and forward_embedded(embeddings)")]
    HalfSplit {
        /// The file.
        path: PathBuf,
        /// The method it defines.
        defined: &'static str,
        /// The method it lacks.
        missing: &'static str,
    },
    /// The module could not be written.
    #[error("saving the TorchScript module to {path}: {why}")]
    Save {
        /// The file.
        path: PathBuf,
        /// libtorch's message, its first informative line.
        why: String,
    },
    /// The parameters do not form a layer map.
    #[error("{path}: {source}")]
    Layers {
        /// The file.
        path: PathBuf,
        /// The layer map's error.
        #[source]
        source: GuardError,
    },
}

/// A loaded TorchScript module whose parameters and buffers live in a VarStore.
pub struct TorchScriptModel {
    module: ScriptModule,
    vs: VarStore,
    /// PyTorch's dotted names and the VarStore's tensors, in module order (trainable only).
    params: Vec<(String, Tensor)>,
    /// The module's buffers, dotted names, in module order (sharing the module's storage).
    buffers: Vec<(String, Tensor)>,
    path: PathBuf,
    /// Whether the module defines `embed` and `forward_embedded`.
    embedding: bool,
    device: Device,
    training: bool,
}

/// The methods of the embedding split convention.
const EMBED: &str = "embed";
const FORWARD_EMBEDDED: &str = "forward_embedded";

/// The informative line of a libtorch error: for a TorchScript interpreter error the
/// `RuntimeError: ...` line at the end of its traceback, otherwise the first line (a C++
/// backtrace follows on later lines). See [`gradguard_guard::error::torch_message`].
pub fn first_line(e: &TchError) -> String {
    gradguard_guard::error::torch_message(&e.to_string())
}

/// The VarStore name `TrainableCModule::load` gives each parameter, in order: dots become
/// underscores, and a name already taken gets `__N` with N the number of variables so far.
pub fn var_store_names(dotted: &[String]) -> Vec<String> {
    let mut taken = std::collections::HashSet::new();
    dotted
        .iter()
        .enumerate()
        .map(|(count, name)| {
            let base = name.replace('.', "_");
            let name = if taken.contains(&base) { format!("{base}__{count}") } else { base };
            taken.insert(name.clone());
            name
        })
        .collect()
}

impl TorchScriptModel {
    /// Loads `path` onto `device`, parameters trainable. The module is put in eval mode
    /// (dropout off, batch norm on running statistics) so that repeated loss evaluations see
    /// the same function; call [`Self::set_train`] to release in training mode. The VarStore
    /// holds the parameters (frozen ones untrainable) and the buffers (untrainable), under
    /// [`var_store_names`].
    pub fn load(path: impl AsRef<Path>, device: Device) -> Result<Self, TorchScriptError> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(TorchScriptError::NotFound { path: path.to_path_buf() });
        }
        let not_ts = |e: TchError| TorchScriptError::NotTorchScript { path: path.to_path_buf(), why: first_line(&e) };
        let mut module = ScriptModule::load(path, device).map_err(not_ts)?;
        module.set_train(false).map_err(not_ts)?;
        let named = module.named_parameters().map_err(not_ts)?;
        let buffers = module.named_buffers().map_err(not_ts)?;
        let dotted: Vec<String> = named.iter().chain(&buffers).map(|(n, _)| n.clone()).collect();
        let vs = VarStore::new(device);
        let root = vs.root();
        let parameter_count = named.len();
        let mut params = Vec::new();
        let all = named.into_iter().chain(buffers.iter().map(|(n, t)| (n.clone(), t.shallow_clone())));
        for (k, ((name, tensor), vs_name)) in all.zip(var_store_names(&dotted)).enumerate() {
            // Frozen parameters (requires_grad false) and buffers: held, not trained.
            let trainable = k < parameter_count && tensor.requires_grad();
            let shared = root.add(&vs_name, tensor, trainable);
            if trainable {
                params.push((name, shared));
            }
        }
        if params.is_empty() {
            return Err(TorchScriptError::NoParameters { path: path.to_path_buf() });
        }
        let embedding = match (module.has_method(EMBED), module.has_method(FORWARD_EMBEDDED)) {
            (true, true) => true,
            (false, false) => false,
            (true, false) => return Err(TorchScriptError::HalfSplit { path: path.to_path_buf(), defined: EMBED, missing: FORWARD_EMBEDDED }),
            (false, true) => return Err(TorchScriptError::HalfSplit { path: path.to_path_buf(), defined: FORWARD_EMBEDDED, missing: EMBED }),
        };
        Ok(Self { module, vs, params, buffers, path: path.to_path_buf(), embedding, device, training: false })
    }

    /// The file the module was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The VarStore holding the parameters (for an optimizer: `nn::Adam::default().build(vs, lr)`).
    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    /// Trainable parameters with PyTorch's dotted names, in module order. The tensors share
    /// storage with the module's parameters.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }

    /// The module's buffers (batch norm's `running_mean`, `running_var`, `num_batches_tracked`)
    /// with PyTorch's dotted names, in module order, sharing storage with the module's.
    pub fn named_buffers(&self) -> Vec<(String, Tensor)> {
        self.buffers.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }

    /// The guard's layer map: `conv1.weight`, `conv1.bias` form layer `conv1`, in module order;
    /// the module's buffers are the map's buffers. A module in training mode with batch-norm
    /// statistics (a `running_mean` buffer) mixes the samples of a batch: the map declares it
    /// ([`LayerMap::with_coupled_samples`]), so that M1's probes keep the whole batch. The
    /// declaration is the mode at this call: a map taken in eval mode still has the coupling
    /// detected if the module trains later, and one taken in training mode keeps the whole
    /// batch after [`Self::set_eval`] (the exact route, at the full batch's cost).
    pub fn layer_map(&self) -> Result<LayerMap, TorchScriptError> {
        let map = LayerMap::from_named_params(self.named_parameters())
            .map(|map| map.with_buffers(self.named_buffers()))
            .map_err(|source| TorchScriptError::Layers { path: self.path.clone(), source })?;
        Ok(if self.training && self.has_batch_statistics() { map.with_coupled_samples() } else { map })
    }

    /// Whether the module keeps batch-norm running statistics (a buffer named `running_mean`).
    fn has_batch_statistics(&self) -> bool {
        self.buffers.iter().any(|(name, _)| name == "running_mean" || name.ends_with(".running_mean"))
    }

    /// Runs the module's `forward` on one input tensor; it must return one tensor.
    pub fn f_forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        self.module.forward(x)
    }

    /// Whether the module declares an embedding split (`embed` and `forward_embedded`).
    pub fn has_embedding(&self) -> bool {
        self.embedding
    }

    /// Runs the module's `embed` on a batch of discrete inputs: the embeddings.
    pub fn f_embed(&self, tokens: &Tensor) -> Result<Tensor, TchError> {
        self.module.call(EMBED, tokens)
    }

    /// Runs the module's `forward_embedded` on a batch of embeddings: the output.
    pub fn f_forward_embedded(&self, embeddings: &Tensor) -> Result<Tensor, TchError> {
        self.module.call(FORWARD_EMBEDDED, embeddings)
    }

    /// Eval mode: dropout off, batch norm on its running statistics.
    pub fn set_eval(&mut self) -> Result<(), TchError> {
        self.module.set_train(false)?;
        self.training = false;
        Ok(())
    }

    /// Training mode: dropout on, batch norm on batch statistics (updating its running
    /// statistics). A loop trains in this mode; the guard then measures the function the loop
    /// differentiates. (A traced module keeps the mode it was traced in: tracing records
    /// dropout and batch norm as they ran.)
    pub fn set_train(&mut self) -> Result<(), TchError> {
        self.module.set_train(true)?;
        self.training = true;
        Ok(())
    }

    /// Whether the module is in training mode ([`Self::load`] leaves it in eval mode).
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// Writes the module as it is now (trained parameters, buffers such as batch norm's
    /// running statistics, and its train/eval flag) in `torch.jit.save`'s format, loadable by
    /// `torch.jit.load`. A module on a GPU is written with its tensors on the CPU, so that the
    /// file loads on any machine.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), TorchScriptError> {
        let path = path.as_ref();
        let failed = |e: TchError| TorchScriptError::Save { path: path.to_path_buf(), why: first_line(&e) };
        self.module.save(path).map_err(failed)?;
        if self.device != Device::Cpu {
            tch::CModule::load_on_device(path, Device::Cpu).and_then(|cpu| cpu.save(path)).map_err(failed)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::var_store_names;

    #[test]
    fn names_follow_tch_rewrite_and_duplicate_rule() {
        let dotted: Vec<String> = ["conv1.weight", "conv1.bias", "block_1.weight", "block.1.weight"].iter().map(|s| s.to_string()).collect();
        assert_eq!(var_store_names(&dotted), vec!["conv1_weight", "conv1_bias", "block_1_weight", "block_1_weight__3"]);
    }
}
