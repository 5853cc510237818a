//! A TorchScript module through gradguard's own small C++ binding (`script_module.cpp`):
//! tch's `CModule` lists a module's parameters but not its buffers, and the guard must restore
//! the buffers (batch norm's running statistics) after its own passes. Errors are libtorch's
//! messages as [`TchError::Torch`], as tch reports them.
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;
use tch::{Device, TchError, Tensor};

type NamedTensor = unsafe extern "C" fn(data: *mut c_void, name: *const c_char, tensor: *mut c_void);

extern "C" {
    fn gg_script_load(path: *const c_char, device: c_int, error: *mut *mut c_char) -> *mut c_void;
    fn gg_script_free(module: *mut c_void);
    fn gg_script_free_error(error: *mut c_char);
    fn gg_script_named_tensors(module: *mut c_void, buffers: bool, data: *mut c_void, f: NamedTensor, error: *mut *mut c_char);
    fn gg_script_call(module: *mut c_void, name: *const c_char, input: *const c_void, error: *mut *mut c_char) -> *mut c_void;
    fn gg_script_has_method(module: *mut c_void, name: *const c_char) -> bool;
    fn gg_script_save(module: *mut c_void, path: *const c_char, error: *mut *mut c_char);
    fn gg_script_train(module: *mut c_void, on: bool, error: *mut *mut c_char);
}

/// Runs one binding call with an error slot; its message becomes the error.
fn checked<T>(call: impl FnOnce(*mut *mut c_char) -> T) -> Result<T, TchError> {
    let mut error: *mut c_char = std::ptr::null_mut();
    let out = call(&mut error);
    if error.is_null() {
        return Ok(out);
    }
    // SAFETY: a non-null error is a NUL-terminated string the binding allocated with strdup.
    let message = unsafe { CStr::from_ptr(error) }.to_string_lossy().into_owned();
    unsafe { gg_script_free_error(error) };
    Err(TchError::Torch(message))
}

/// The tensors the binding hands over, by name. `data` is a `Vec<(String, Tensor)>`.
unsafe extern "C" fn collect(data: *mut c_void, name: *const c_char, tensor: *mut c_void) {
    let named = &mut *(data as *mut Vec<(String, Tensor)>);
    let name = CStr::from_ptr(name).to_string_lossy().into_owned();
    named.push((name, Tensor::from_ptr(tensor as *mut torch_sys::C_tensor)));
}

/// tch's device numbering (its `Device::c_int` is private), which the binding decodes.
fn device_number(device: Device) -> c_int {
    match device {
        Device::Cpu => -1,
        Device::Cuda(index) => c_int::try_from(index).unwrap_or(c_int::MAX),
        Device::Mps => -2,
        Device::Vulkan => -3,
    }
}

/// A path as the binding takes it.
fn c_path(path: &Path) -> Result<CString, TchError> {
    let text = path.to_str().ok_or_else(|| TchError::Torch(format!("{} is not valid UTF-8", path.display())))?;
    CString::new(text).map_err(|_| TchError::Torch(format!("{text:?} holds a NUL byte")))
}

/// A loaded TorchScript module; freed on drop.
pub(crate) struct ScriptModule {
    module: *mut c_void,
}

// SAFETY: the module is a heap object owned by this value alone; libtorch's modules may be
// used from another thread, as tch's CModule (Send + Sync) is.
unsafe impl Send for ScriptModule {}
unsafe impl Sync for ScriptModule {}

impl ScriptModule {
    /// `torch::jit::load(path, device)`.
    pub(crate) fn load(path: &Path, device: Device) -> Result<Self, TchError> {
        let c_path = c_path(path)?;
        // SAFETY: c_path outlives the call; a null module comes with an error.
        let module = checked(|error| unsafe { gg_script_load(c_path.as_ptr(), device_number(device), error) })?;
        Ok(Self { module })
    }

    fn named(&self, buffers: bool) -> Result<Vec<(String, Tensor)>, TchError> {
        let mut named: Vec<(String, Tensor)> = Vec::new();
        let data = &mut named as *mut Vec<(String, Tensor)> as *mut c_void;
        // SAFETY: `collect` receives `data`, the vector above, for the duration of the call.
        checked(|error| unsafe { gg_script_named_tensors(self.module, buffers, data, collect, error) })?;
        Ok(named)
    }

    /// Parameters with PyTorch's dotted names, in module order, sharing the module's storage.
    pub(crate) fn named_parameters(&self) -> Result<Vec<(String, Tensor)>, TchError> {
        self.named(false)
    }

    /// Buffers with PyTorch's dotted names, in module order, sharing the module's storage.
    pub(crate) fn named_buffers(&self) -> Result<Vec<(String, Tensor)>, TchError> {
        self.named(true)
    }

    /// `forward(x)`, which must return one tensor.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        self.call("forward", x)
    }

    /// The method `name` on one tensor, which must return one tensor.
    pub(crate) fn call(&self, name: &str, x: &Tensor) -> Result<Tensor, TchError> {
        let c_name = CString::new(name).map_err(|_| TchError::Torch(format!("{name:?} holds a NUL byte")))?;
        // SAFETY: `x` and `c_name` outlive the call; a non-null result is a new tensor we own.
        let out = checked(|error| unsafe { gg_script_call(self.module, c_name.as_ptr(), x.as_ptr() as *const c_void, error) })?;
        Ok(unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) })
    }

    /// Whether the module defines method `name`.
    pub(crate) fn has_method(&self, name: &str) -> bool {
        // SAFETY: the name outlives the call; the binding only looks the method up.
        CString::new(name).is_ok_and(|c_name| unsafe { gg_script_has_method(self.module, c_name.as_ptr()) })
    }

    /// Writes the module in `torch.jit.save`'s format.
    pub(crate) fn save(&self, path: &Path) -> Result<(), TchError> {
        let c_path = c_path(path)?;
        // SAFETY: c_path outlives the call.
        checked(|error| unsafe { gg_script_save(self.module, c_path.as_ptr(), error) })
    }

    /// Training mode (`on`) or eval mode.
    pub(crate) fn set_train(&mut self, on: bool) -> Result<(), TchError> {
        checked(|error| unsafe { gg_script_train(self.module, on, error) })
    }
}

impl Drop for ScriptModule {
    fn drop(&mut self) {
        // SAFETY: the module came from gg_script_load and is freed once.
        unsafe { gg_script_free(self.module) }
    }
}
