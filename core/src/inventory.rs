//! What an agent's machine is: CPU, memory, OS, software versions and GPUs. Agents send this on
//! registration and every result carries it, so a number can always be traced to its hardware.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub memory_bytes: u64,
    /// "9.0" for Hopper.
    pub compute_capability: String,
    pub driver_version: String,
    /// Highest CUDA version the driver supports, such as "13.0".
    pub cuda_driver_version: String,
    pub pcie_link_gen: Option<u32>,
    pub pcie_link_width: Option<u32>,
    pub power_limit_watts: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HostInventory {
    pub hostname: String,
    pub os: String,
    pub kernel: String,
    pub cpu_model: String,
    pub physical_cores: u32,
    pub logical_cores: u32,
    pub memory_bytes: u64,
    pub fleetmark_version: String,
    pub candle_version: String,
    pub rustc_version: String,
    /// CUDA toolkit the agent was built with and the compute capability its kernels target;
    /// empty for CPU-only builds.
    pub cuda_build: String,
    pub gpus: Vec<GpuInfo>,
}

impl HostInventory {
    /// Reads the host's CPU, memory and OS. GPUs and build versions are filled in by the caller,
    /// which knows what it was built with.
    pub fn collect_host() -> Self {
        use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};
        let mut sys = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        )
        .ok();
        if let Some(s) = sys.as_mut() {
            s.refresh_cpu_all();
        }
        let cpus = sys.as_ref().map(|s| s.cpus()).unwrap_or(&[]);
        let cpu_model = cpus
            .first()
            .map(|c| c.brand().trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown cpu".into());
        HostInventory {
            hostname: System::host_name().unwrap_or_default(),
            os: System::long_os_version().unwrap_or_else(|_| std::env::consts::OS.into()),
            kernel: System::kernel_version().unwrap_or_default(),
            physical_cores: System::physical_core_count().unwrap_or(0) as u32,
            logical_cores: cpus.len() as u32,
            memory_bytes: sys.as_ref().map(|s| s.total_memory()).unwrap_or(0),
            cpu_model,
            fleetmark_version: crate::FLEETMARK_VERSION.into(),
            ..Default::default()
        }
    }
}
