//! GPU inventory and telemetry through NVML (libnvidia-ml, loaded at run time, so a machine
//! without the NVIDIA driver simply reports no GPUs).

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use fleetmark_core::{GpuInfo, MetricSummary, Telemetry};
use nvml_wrapper::{
    bitmasks::device::ThrottleReasons,
    enum_wrappers::device::{Clock, TemperatureSensor},
    Nvml,
};

use crate::backend::{TelemetrySampler, TelemetrySource};

/// Opens NVML; the error says why not (no driver library, driver not loaded).
pub fn open_nvml() -> Result<Arc<Nvml>, String> {
    Nvml::init().map(Arc::new).map_err(|e| match e {
        nvml_wrapper::error::NvmlError::LibloadingError(_) => {
            "libnvidia-ml.so.1 not found: the NVIDIA driver is not installed".to_string()
        }
        other => format!("NVML: {other}"),
    })
}

/// Every GPU NVML can see, in NVML's (PCI bus) order.
pub fn nvml_gpus(nvml: &Nvml) -> Result<Vec<GpuInfo>, String> {
    let driver = nvml.sys_driver_version().unwrap_or_default();
    let cuda = nvml
        .sys_cuda_driver_version()
        .map(|v| {
            format!(
                "{}.{}",
                nvml_wrapper::cuda_driver_version_major(v),
                nvml_wrapper::cuda_driver_version_minor(v)
            )
        })
        .unwrap_or_default();
    let count = nvml.device_count().map_err(|e| format!("NVML: {e}"))?;
    let mut gpus = Vec::new();
    for index in 0..count {
        let d = nvml
            .device_by_index(index)
            .map_err(|e| format!("NVML device {index}: {e}"))?;
        gpus.push(GpuInfo {
            index,
            name: d.name().unwrap_or_default(),
            uuid: d.uuid().unwrap_or_default(),
            memory_bytes: d.memory_info().map(|m| m.total).unwrap_or(0),
            compute_capability: d
                .cuda_compute_capability()
                .map(|c| format!("{}.{}", c.major, c.minor))
                .unwrap_or_default(),
            driver_version: driver.clone(),
            cuda_driver_version: cuda.clone(),
            pcie_link_gen: d.current_pcie_link_gen().ok(),
            pcie_link_width: d.current_pcie_link_width().ok(),
            power_limit_watts: d.enforced_power_limit().ok().map(|mw| mw as f64 / 1000.0),
        });
    }
    Ok(gpus)
}

/// GPUs for the inventory, or none when NVML is not there.
pub fn detect_gpus() -> Vec<GpuInfo> {
    open_nvml().and_then(|n| nvml_gpus(&n)).unwrap_or_default()
}

/// Reasons that mean the clocks were held down while we measured.
fn slowing_reasons() -> ThrottleReasons {
    ThrottleReasons::SW_POWER_CAP
        | ThrottleReasons::HW_SLOWDOWN
        | ThrottleReasons::SW_THERMAL_SLOWDOWN
        | ThrottleReasons::HW_THERMAL_SLOWDOWN
        | ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN
}

fn reason_names(r: ThrottleReasons) -> Vec<String> {
    let all = [
        (ThrottleReasons::GPU_IDLE, "gpu_idle"),
        (
            ThrottleReasons::APPLICATIONS_CLOCKS_SETTING,
            "applications_clocks_setting",
        ),
        (ThrottleReasons::SW_POWER_CAP, "sw_power_cap"),
        (ThrottleReasons::HW_SLOWDOWN, "hw_slowdown"),
        (ThrottleReasons::SYNC_BOOST, "sync_boost"),
        (ThrottleReasons::SW_THERMAL_SLOWDOWN, "sw_thermal_slowdown"),
        (ThrottleReasons::HW_THERMAL_SLOWDOWN, "hw_thermal_slowdown"),
        (
            ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN,
            "hw_power_brake_slowdown",
        ),
        (
            ThrottleReasons::DISPLAY_CLOCK_SETTING,
            "display_clock_setting",
        ),
    ];
    all.iter()
        .filter(|(flag, _)| r.contains(*flag))
        .map(|(_, n)| n.to_string())
        .collect()
}

/// Samples one GPU, found by UUID, every `interval`.
pub struct NvmlTelemetry {
    pub nvml: Arc<Nvml>,
    pub uuid: String,
    pub interval: Duration,
}

impl TelemetrySource for NvmlTelemetry {
    fn start(&self) -> Box<dyn TelemetrySampler> {
        let stop = Arc::new(AtomicBool::new(false));
        let nvml = self.nvml.clone();
        let uuid = self.uuid.clone();
        let interval = self.interval;
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("nvml-sampler".into())
            .spawn(move || sample_until(&nvml, &uuid, interval, &flag))
            .expect("spawn the telemetry thread");
        Box::new(NvmlSampler { stop, handle })
    }
}

struct Samples {
    sm: Vec<f64>,
    mem: Vec<f64>,
    power: Vec<f64>,
    temp: Vec<f64>,
    util: Vec<f64>,
    reasons: ThrottleReasons,
    count: u32,
}

impl Samples {
    fn empty() -> Self {
        Samples {
            sm: Vec::new(),
            mem: Vec::new(),
            power: Vec::new(),
            temp: Vec::new(),
            util: Vec::new(),
            reasons: ThrottleReasons::empty(),
            count: 0,
        }
    }
}

fn sample_until(nvml: &Nvml, uuid: &str, interval: Duration, stop: &AtomicBool) -> Samples {
    let mut s = Samples::empty();
    let Ok(d) = nvml.device_by_uuid(uuid) else {
        return s;
    };
    // Sample at least once, even for a window shorter than the interval.
    loop {
        s.count += 1;
        if let Ok(v) = d.clock_info(Clock::SM) {
            s.sm.push(v as f64);
        }
        if let Ok(v) = d.clock_info(Clock::Memory) {
            s.mem.push(v as f64);
        }
        if let Ok(v) = d.power_usage() {
            s.power.push(v as f64 / 1000.0);
        }
        if let Ok(v) = d.temperature(TemperatureSensor::Gpu) {
            s.temp.push(v as f64);
        }
        if let Ok(v) = d.utilization_rates() {
            s.util.push(v.gpu as f64);
        }
        if let Ok(r) = d.current_throttle_reasons() {
            s.reasons |= r;
        }
        if stop.load(Ordering::Relaxed) {
            return s;
        }
        std::thread::park_timeout(interval);
    }
}

struct NvmlSampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Samples>,
}

impl TelemetrySampler for NvmlSampler {
    fn stop(self: Box<Self>) -> Telemetry {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.thread().unpark();
        let s = self.handle.join().unwrap_or_else(|_| Samples::empty());
        Telemetry {
            samples: s.count,
            sm_clock_mhz: MetricSummary::of(&s.sm),
            memory_clock_mhz: MetricSummary::of(&s.mem),
            power_watts: MetricSummary::of(&s.power),
            temperature_c: MetricSummary::of(&s.temp),
            gpu_utilization_pct: MetricSummary::of(&s.util),
            throttle_reasons: reason_names(s.reasons),
            throttled: s.reasons.intersects(slowing_reasons()),
        }
    }
}
