//! Which devices an agent serves, from `--device`: `cpu`, `simulated`, `cuda:0`, `cuda:0,1`,
//! `cuda:all`. Opening a device checks it can actually run jobs, so a wrong set-up fails at
//! start-up with a clear error instead of in the middle of a job.

use std::time::Duration;

use fleetmark_core::ComputeCapability;

use crate::{
    backend::Backend, cpu::CpuBackend, fused::FusedOptions, simulated::SimulatedBackend,
    EngineError,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Simulated,
    Cuda(usize),
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Simulated => f.write_str("simulated"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Parses a device list. `cuda:all` asks the driver how many GPUs there are.
pub fn parse_devices(s: &str) -> Result<Vec<DeviceSpec>, EngineError> {
    let s = s.trim().to_ascii_lowercase();
    match s.as_str() {
        "cpu" => return Ok(vec![DeviceSpec::Cpu]),
        "simulated" | "sim" => return Ok(vec![DeviceSpec::Simulated]),
        "cuda" | "gpu" => return Ok(vec![DeviceSpec::Cuda(0)]),
        _ => {}
    }
    let Some(list) = s.strip_prefix("cuda:") else {
        return Err(EngineError::Setup(format!(
            "unknown device '{s}': expected cpu, cuda:N, cuda:N,M or cuda:all"
        )));
    };
    if list == "all" {
        let n = cuda_device_count()?;
        if n == 0 {
            return Err(EngineError::Setup(
                "cuda:all: the driver reports no GPU on this machine".into(),
            ));
        }
        return Ok((0..n).map(DeviceSpec::Cuda).collect());
    }
    let mut out = Vec::new();
    for part in list.split(',') {
        let i: usize = part.trim().parse().map_err(|_| {
            EngineError::Setup(format!("'{part}' in --device {s} is not a GPU index"))
        })?;
        if out.contains(&DeviceSpec::Cuda(i)) {
            return Err(EngineError::Setup(format!("cuda:{i} is listed twice")));
        }
        out.push(DeviceSpec::Cuda(i));
    }
    Ok(out)
}

#[cfg(feature = "cuda")]
fn cuda_device_count() -> Result<usize, EngineError> {
    crate::cuda::device_count()
}

#[cfg(not(feature = "cuda"))]
fn cuda_device_count() -> Result<usize, EngineError> {
    Err(not_built_with_cuda())
}

#[cfg(not(feature = "cuda"))]
fn not_built_with_cuda() -> EngineError {
    EngineError::Setup(
        "this fleetmark-agent was built without CUDA support: rebuild it with \
         `--features cuda,cudnn` (see the README's GPU section) or run it with --device cpu"
            .into(),
    )
}

/// Options that shape a backend, parsed once from the agent's flags.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// Iteration time of the simulated backend at batch 1.
    pub simulated_latency: Duration,
    /// The only directory file weights may come from (`--weights-dir`); none: seeded only.
    pub weights_dir: Option<std::path::PathBuf>,
    /// The fused GPU path's knobs.
    pub fused: FusedOptions,
    /// For testing the per-generation rules on a newer card: a GPU reports this compute
    /// capability when deciding what it can run (a T4's 7.5 on an H100, say). Results say so.
    pub assume_capability: Option<ComputeCapability>,
    /// Run the node health check (`crate::health`) when the device opens, before any job.
    pub health_check: bool,
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions {
            simulated_latency: Duration::from_millis(2),
            weights_dir: None,
            fused: FusedOptions::default(),
            assume_capability: None,
            health_check: false,
        }
    }
}

impl BackendOptions {
    /// Checks the options once, at start-up.
    pub fn validate(&self) -> Result<(), EngineError> {
        self.fused.validate()
    }
}

/// Opens a device for jobs. Must be called on the thread that will run the jobs: CUDA work is
/// issued on that thread's stream.
pub fn open_backend(
    spec: DeviceSpec,
    opts: &BackendOptions,
) -> Result<Box<dyn Backend>, EngineError> {
    opts.validate()?;
    match spec {
        DeviceSpec::Cpu => Ok(Box::new(CpuBackend::new())),
        DeviceSpec::Simulated => Ok(Box::new(SimulatedBackend::new(opts.simulated_latency))),
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(i) => Ok(Box::new(crate::cuda::CudaBackend::open(i, opts)?)),
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(_) => Err(not_built_with_cuda()),
    }
}

/// cuDNN's description of GPU `ordinal` as JSON, for planning the graph API's convolutions on a
/// machine without that card (docs/performance.md, "The levers, as built"). Only a
/// build with cuDNN (`--features cudnn`) has it.
pub fn cudnn_device_json(ordinal: usize) -> Result<String, EngineError> {
    #[cfg(feature = "cudnn")]
    {
        crate::cuda::fused::cudnn_device_json(ordinal)
    }
    #[cfg(not(feature = "cudnn"))]
    {
        let _ = ordinal;
        Err(EngineError::Unsupported(
            "this fleetmark-agent was built without cuDNN (--features cudnn)".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_lists() {
        assert_eq!(parse_devices("cpu").unwrap(), vec![DeviceSpec::Cpu]);
        assert_eq!(
            parse_devices("cuda:0,1").unwrap(),
            vec![DeviceSpec::Cuda(0), DeviceSpec::Cuda(1)]
        );
        assert!(parse_devices("tpu")
            .unwrap_err()
            .to_string()
            .contains("unknown device 'tpu'"));
        assert!(parse_devices("cuda:0,0").is_err());
        assert!(parse_devices("cuda:x").is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        let err = open_backend(DeviceSpec::Cuda(0), &BackendOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("built without CUDA support"), "{err}");
    }
}
