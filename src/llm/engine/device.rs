//! Where local models run: the `DEVICE` setting (`auto`, `cpu`, `cuda`, `cuda:N`), opening
//! that device once at start, and what it is (name, memory) for the start-up log,
//! `/api/health` and the bench. The only engine file with `cfg(feature = "cuda")` code;
//! knows nothing of models.

/// The `DEVICE` setting as typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSetting {
    /// The first GPU when the binary has CUDA and one is visible, else the CPU.
    Auto,
    Cpu,
    /// The GPU of this ordinal.
    Cuda(usize),
}

impl DeviceSetting {
    /// `auto`, `cpu`, `cuda` or `cuda:N` (case and spaces do not matter).
    pub fn parse(text: &str) -> Option<DeviceSetting> {
        let text = text.trim().to_ascii_lowercase();
        match text.as_str() {
            "auto" => Some(DeviceSetting::Auto),
            "cpu" => Some(DeviceSetting::Cpu),
            "cuda" | "gpu" => Some(DeviceSetting::Cuda(0)),
            _ => text.strip_prefix("cuda:")?.parse().ok().map(DeviceSetting::Cuda),
        }
    }
}

impl std::fmt::Display for DeviceSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSetting::Auto => f.write_str("auto"),
            DeviceSetting::Cpu => f.write_str("cpu"),
            DeviceSetting::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DeviceError {
    #[error(
        "DEVICE={0}: this binary was built without CUDA; build it with `--features cuda` \
         (scripts/run.sh does when nvidia-smi sees a GPU) or use DEVICE=cpu"
    )]
    NoCuda(DeviceSetting),
    #[error("DEVICE={setting}: cannot open the GPU: {reason}")]
    Open { setting: DeviceSetting, reason: String },
}

/// The device models run on, opened once and shared by every model.
#[derive(Debug, Clone)]
pub enum ComputeDevice {
    /// Our own CPU kernels (`model.rs`): the CPU default.
    Kernels,
    /// candle's tensors on this device (`candle_model.rs`): a GPU in production; candle's
    /// CPU device in the tests that compare the two forward passes.
    Candle(candle_core::Device),
}

impl ComputeDevice {
    /// Open what `setting` asks for. `auto` quietly takes the CPU when there is no GPU; an
    /// explicit `cuda` that cannot be had is an error.
    pub fn open(setting: DeviceSetting) -> Result<ComputeDevice, DeviceError> {
        match setting {
            DeviceSetting::Cpu => Ok(ComputeDevice::Kernels),
            DeviceSetting::Auto => match open_cuda(0) {
                Ok(device) => Ok(device),
                Err(reason) => {
                    tracing::info!(%reason, "no GPU in use: models run on the CPU");
                    Ok(ComputeDevice::Kernels)
                }
            },
            DeviceSetting::Cuda(ordinal) => {
                if !cfg!(feature = "cuda") {
                    return Err(DeviceError::NoCuda(setting));
                }
                open_cuda(ordinal).map_err(|reason| DeviceError::Open { setting, reason })
            }
        }
    }

    /// What it is, with its memory now.
    pub fn info(&self) -> DeviceInfo {
        match self {
            ComputeDevice::Kernels => DeviceInfo {
                id: "cpu".to_string(),
                name: cpu_name(),
                memory_total_bytes: None,
                memory_free_bytes: None,
            },
            ComputeDevice::Candle(device) => candle_device_info(device),
        }
    }

    pub fn is_gpu(&self) -> bool {
        matches!(self, ComputeDevice::Candle(device) if !device.is_cpu())
    }
}

/// A device as reported to people.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    /// `cpu`, `cuda:0`, or `candle-cpu` (tests).
    pub id: String,
    /// The processor's or the GPU's model name.
    pub name: String,
    /// A GPU's memory, as its driver reports it (the whole card, all processes).
    pub memory_total_bytes: Option<u64>,
    pub memory_free_bytes: Option<u64>,
}

impl DeviceInfo {
    /// Memory in use on the device by every process (a GPU's only).
    pub fn memory_used_bytes(&self) -> Option<u64> {
        Some(self.memory_total_bytes?.saturating_sub(self.memory_free_bytes?))
    }
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
fn open_cuda(ordinal: usize) -> Result<ComputeDevice, String> {
    // One line: candle appends a backtrace to its errors when RUST_BACKTRACE is set.
    let device = candle_core::Device::new_cuda(ordinal)
        .map_err(|e| e.to_string().lines().next().unwrap_or_default().to_string())?;
    if let candle_core::Device::Cuda(cuda) = &device {
        // SAFETY: cudarc's event tracking (two CUDA events made and destroyed with every
        // allocation, that is with nearly every op) orders the uses of a buffer across
        // streams. candle runs each thread on its own per-thread stream, and every tensor
        // of a model is made, used and freed on that model's engine thread (the bench's
        // and `device-check`'s on theirs), so no buffer is shared between streams.
        unsafe { cuda.disable_event_tracking() };
    }
    Ok(ComputeDevice::Candle(device))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize) -> Result<ComputeDevice, String> {
    Err("this binary was built without CUDA".to_string())
}

#[cfg(feature = "cuda")]
fn candle_device_info(device: &candle_core::Device) -> DeviceInfo {
    match device {
        candle_core::Device::Cuda(cuda) => {
            let stream = cuda.cuda_stream();
            let context = stream.context();
            let (free, total) = context.mem_get_info().unwrap_or((0, 0));
            DeviceInfo {
                id: format!("cuda:{}", context.ordinal()),
                name: context.name().unwrap_or_else(|_| "NVIDIA GPU".to_string()),
                memory_total_bytes: Some(total as u64),
                memory_free_bytes: Some(free as u64),
            }
        }
        _ => candle_cpu_info(),
    }
}

#[cfg(not(feature = "cuda"))]
fn candle_device_info(_device: &candle_core::Device) -> DeviceInfo {
    candle_cpu_info()
}

fn candle_cpu_info() -> DeviceInfo {
    DeviceInfo {
        id: "candle-cpu".to_string(),
        name: cpu_name(),
        memory_total_bytes: None,
        memory_free_bytes: None,
    }
}

/// The processor's model name from `/proc/cpuinfo` (the architecture where there is none);
/// figures are quoted with it.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_settings_parse_as_typed_and_print_back() {
        for (text, expected) in [
            ("auto", Some(DeviceSetting::Auto)),
            (" CPU ", Some(DeviceSetting::Cpu)),
            ("cuda", Some(DeviceSetting::Cuda(0))),
            ("cuda:1", Some(DeviceSetting::Cuda(1))),
            ("cuda:x", None),
            ("tpu", None),
            ("", None),
        ] {
            assert_eq!(DeviceSetting::parse(text), expected, "{text:?}");
        }
        assert_eq!(DeviceSetting::Cuda(2).to_string(), "cuda:2");
        assert_eq!(
            DeviceSetting::parse(&DeviceSetting::Auto.to_string()),
            Some(DeviceSetting::Auto)
        );
    }

    #[test]
    fn cpu_and_auto_without_a_gpu_run_on_our_kernels() {
        let cpu = ComputeDevice::open(DeviceSetting::Cpu).unwrap();
        assert!(matches!(cpu, ComputeDevice::Kernels));
        assert_eq!(cpu.info().id, "cpu");
        assert!(!cpu.info().name.is_empty());
        assert_eq!(cpu.info().memory_used_bytes(), None);
        if !cfg!(feature = "cuda") {
            let auto = ComputeDevice::open(DeviceSetting::Auto).unwrap();
            assert!(matches!(auto, ComputeDevice::Kernels));
            let err = ComputeDevice::open(DeviceSetting::Cuda(0)).unwrap_err();
            assert_eq!(err, DeviceError::NoCuda(DeviceSetting::Cuda(0)));
            assert!(err.to_string().contains("built without CUDA"), "{err}");
        }
    }
}
