//! The candle device of a `--devices` entry, for the stages that run on an accelerator.

use candle_core::Device;
use engine::StageError;

/// `cpu` or `cuda:N` as a candle [`Device`]; a CUDA device in a build without the `cuda`
/// feature, or one that cannot be opened, is an error that says how to get one.
pub fn candle_device(name: &str) -> Result<Device, StageError> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    if let Some(n) = name.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
        return Device::new_cuda(n).map_err(|e| {
            StageError::failed(format!(
                "cannot use {name}: {e} (a CUDA build is `cargo build --release --features cuda`)"
            ))
        });
    }
    Err(StageError::failed(format!("this stage runs on `cpu` or `cuda:N`, not `{name}`")))
}
