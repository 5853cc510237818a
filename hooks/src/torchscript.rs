//! TorchScript models (`torch.jit.script` or `torch.jit.trace` output, saved with
//! `torch.jit.save`) as gradguard models: parameters trainable through a tch `VarStore`, and
//! layers named as PyTorch users know them.
//!
//! `tch::TrainableCModule::load` adds the module's parameters to a VarStore under names with
//! the dots rewritten (`conv1.weight` becomes `conv1_weight`, since a VarStore path cannot hold
//! a dot), which cannot be undone in general (`block_1.weight` and `block.1.weight` both become
//! `block_1_weight`). So the module's own `named_parameters()` (PyTorch's dotted names, in module
//! order) are read as well, each name is mapped to the VarStore name tch gave it (the same
//! rewrite and duplicate rule), and the two are checked to hold the same shapes.
//!
//! A module on discrete inputs (token ids) declares its embedding split by convention: two
//! methods, `embed(tokens) -> embeddings` and `forward_embedded(embeddings) -> output`, with
//! `forward(tokens) == forward_embedded(embed(tokens))` (`@torch.jit.export` them on a
//! scripted module). They are used when present ([`TorchScriptModel::has_embedding`]).
use gradguard_guard::{GuardError, LayerMap};
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Device, TchError, Tensor, TrainableCModule};

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
    /// A parameter could not be matched to the VarStore tch made for it.
    #[error("{path}: parameter {name}: {why}")]
    Parameter {
        /// The file.
        path: PathBuf,
        /// The parameter's dotted PyTorch name.
        name: String,
        /// What did not match.
        why: String,
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

/// A loaded TorchScript module whose parameters live in a VarStore.
pub struct TorchScriptModel {
    module: TrainableCModule,
    vs: VarStore,
    /// PyTorch's dotted names and the VarStore's tensors, in module order (trainable only).
    params: Vec<(String, Tensor)>,
    path: PathBuf,
    /// Whether the module defines `embed` and `forward_embedded`.
    embedding: bool,
    device: Device,
    training: bool,
}

/// The methods of the embedding split convention.
const EMBED: &str = "embed";
const FORWARD_EMBEDDED: &str = "forward_embedded";

/// Whether the module defines method `name`. Asked by calling it with no arguments: libtorch
/// answers "Method 'name' is not defined" for a missing method, and a schema error (a missing
/// argument) for one that exists, before running anything.
fn defines(module: &TrainableCModule, name: &str) -> bool {
    match module.method_is::<tch::IValue>(name, &[]) {
        Ok(_) => true,
        Err(e) => !e.to_string().contains(&format!("Method '{name}' is not defined")),
    }
}

/// The informative line of a libtorch error: for a TorchScript interpreter error the
/// `RuntimeError: ...` line at the end of its traceback, otherwise the first line (a C++
/// backtrace follows on later lines).
pub fn first_line(e: &TchError) -> String {
    let text = e.to_string();
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if let Some(err) = lines.iter().rev().find_map(|l| l.split_once("Error: ").filter(|(kind, _)| !kind.contains(' ')).map(|(_, msg)| msg)) {
        if lines.first().is_some_and(|l| l.contains("TorchScript interpreter")) {
            return err.to_string();
        }
    }
    let line = lines.first().copied().unwrap_or("unknown error");
    line.trim_start_matches("Internal torch error: ").to_string()
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
    /// the same function; call [`Self::set_train`] to release in training mode.
    pub fn load(path: &Path, device: Device) -> Result<Self, TorchScriptError> {
        if !path.is_file() {
            return Err(TorchScriptError::NotFound { path: path.to_path_buf() });
        }
        let not_ts = |e: TchError| TorchScriptError::NotTorchScript { path: path.to_path_buf(), why: first_line(&e) };
        // The module's own view: dotted names in module order.
        let listing = tch::CModule::load_on_device(path, device).map_err(not_ts)?;
        let named = listing.named_parameters().map_err(not_ts)?;
        let dotted: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
        let trainable: Vec<bool> = named.iter().map(|(_, t)| t.requires_grad()).collect();
        let shapes: Vec<Vec<i64>> = named.iter().map(|(_, t)| t.size()).collect();
        drop(named);
        drop(listing);

        let vs = VarStore::new(device);
        let mut module = TrainableCModule::load(path, vs.root()).map_err(not_ts)?;
        module.f_set_eval().map_err(not_ts)?;
        let variables = vs.variables();
        let mut params = Vec::new();
        for (((name, vs_name), trainable), shape) in dotted.iter().zip(var_store_names(&dotted)).zip(trainable).zip(shapes) {
            if !trainable {
                continue; // requires_grad false: not a parameter the guard measures
            }
            let tensor = variables.get(&vs_name).ok_or_else(|| TorchScriptError::Parameter {
                path: path.to_path_buf(),
                name: name.clone(),
                why: format!("not found in the VarStore as {vs_name:?} (tch's naming changed?)"),
            })?;
            if tensor.size() != shape {
                return Err(TorchScriptError::Parameter {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    why: format!("the VarStore's {vs_name:?} has shape {:?}, the module's {shape:?}", tensor.size()),
                });
            }
            params.push((name.clone(), tensor.shallow_clone()));
        }
        if params.is_empty() {
            return Err(TorchScriptError::NoParameters { path: path.to_path_buf() });
        }
        let embedding = match (defines(&module, EMBED), defines(&module, FORWARD_EMBEDDED)) {
            (true, true) => true,
            (false, false) => false,
            (true, false) => return Err(TorchScriptError::HalfSplit { path: path.to_path_buf(), defined: EMBED, missing: FORWARD_EMBEDDED }),
            (false, true) => return Err(TorchScriptError::HalfSplit { path: path.to_path_buf(), defined: FORWARD_EMBEDDED, missing: EMBED }),
        };
        Ok(Self { module, vs, params, path: path.to_path_buf(), embedding, device, training: false })
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

    /// The guard's layer map: `conv1.weight`, `conv1.bias` form layer `conv1`, in module order.
    pub fn layer_map(&self) -> Result<LayerMap, TorchScriptError> {
        LayerMap::from_named_params(self.named_parameters()).map_err(|source| TorchScriptError::Layers { path: self.path.clone(), source })
    }

    /// Runs the module's `forward` on one input tensor; it must return one tensor.
    pub fn f_forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        self.module.forward_ts(&[x])
    }

    /// Whether the module declares an embedding split (`embed` and `forward_embedded`).
    pub fn has_embedding(&self) -> bool {
        self.embedding
    }

    /// Runs the module's `embed` on a batch of discrete inputs: the embeddings.
    pub fn f_embed(&self, tokens: &Tensor) -> Result<Tensor, TchError> {
        self.module.method_ts(EMBED, &[tokens])
    }

    /// Runs the module's `forward_embedded` on a batch of embeddings: the output.
    pub fn f_forward_embedded(&self, embeddings: &Tensor) -> Result<Tensor, TchError> {
        self.module.method_ts(FORWARD_EMBEDDED, &[embeddings])
    }

    /// Eval mode: dropout off, batch norm on its running statistics.
    pub fn set_eval(&mut self) -> Result<(), TchError> {
        self.module.f_set_eval()?;
        self.training = false;
        Ok(())
    }

    /// Training mode: dropout on, batch norm on batch statistics (updating its running
    /// statistics). A loop trains in this mode; the guard then measures the function the loop
    /// differentiates. (A traced module keeps the mode it was traced in: tracing records
    /// dropout and batch norm as they ran.)
    pub fn set_train(&mut self) -> Result<(), TchError> {
        self.module.f_set_train()?;
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
    pub fn save(&self, path: &Path) -> Result<(), TorchScriptError> {
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
