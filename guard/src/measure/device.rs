//! Device names as users type them: `cpu`, `cuda`, `cuda:N`.
use crate::error::{GuardError, Result};
use tch::{Cuda, Device};

/// Parses a device name (`cpu`, `cuda`/`gpu`, `cuda:N`, any case), checking that the CUDA
/// device exists on this machine.
pub fn parse_device(name: &str) -> Result<Device> {
    let unknown = |why: String| GuardError::UnknownDevice { given: name.to_string(), why };
    match name.trim().to_ascii_lowercase().as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => {
            if Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                Err(unknown("CUDA is not available on this machine".into()))
            }
        }
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => {
                let count = Cuda::device_count() as usize;
                if i < count {
                    Ok(Device::Cuda(i))
                } else {
                    Err(unknown(format!("this machine has {count} CUDA device(s)")))
                }
            }
            _ => Err(unknown("expected cpu, cuda or cuda:N".into())),
        },
    }
}
