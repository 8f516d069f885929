//! The node health check (issue 11): simple, well-understood work on one device, before an
//! agent's first job and on demand (`fleetmark-agent health`), so that a node slower than its
//! kind shows up as such. See `fleetmark_core::health` for the report and the flagging rule.
//!
//! What it runs, through Candle on the device itself (so it measures what jobs will use):
//! - a dense `n × n` matrix multiply in each precision the device runs, in TFLOP/s;
//! - a large device-to-device copy (bytes read + written), in GB/s;
//! - on GPUs, a host-to-device copy from pageable memory, in GB/s;
//! - on GPUs with NVML, the highest SM clock seen during the GEMMs (the caller passes a
//!   telemetry source), with the PCIe link, power limit and ECC mode read by the caller.
//!
//! Each measurement repeats until [`HealthOptions::min_time`] has passed, after one warm-up,
//! and synchronises the device before reading the clock.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use chrono::Utc;
use fleetmark_core::{health::DeviceHealth, Precision};

use crate::{backend::TelemetrySource, cpu::dtype_of, EngineError};

/// Sizes and durations of the check.
#[derive(Debug, Clone, Copy)]
pub struct HealthOptions {
    /// Square GEMM size.
    pub gemm_n: usize,
    /// Bytes copied per bandwidth iteration.
    pub copy_bytes: usize,
    /// Minimum timed duration of each measurement.
    pub min_time: Duration,
}

impl HealthOptions {
    /// A check of about a second on a 2-core CPU.
    pub const CPU: HealthOptions = HealthOptions {
        gemm_n: 512,
        copy_bytes: 64 << 20,
        min_time: Duration::from_millis(200),
    };
    /// A check of a few seconds on a data-centre GPU.
    pub const GPU: HealthOptions = HealthOptions {
        gemm_n: 8192,
        copy_bytes: 1 << 30,
        min_time: Duration::from_millis(300),
    };
}

/// Repeats `f` (after one untimed call) until `min_time` has passed; seconds per call.
fn time_per_call(
    device: &Device,
    min_time: Duration,
    mut f: impl FnMut() -> Result<(), EngineError>,
) -> Result<f64, EngineError> {
    f()?;
    device.synchronize()?;
    let start = Instant::now();
    let mut calls = 0u32;
    loop {
        f()?;
        calls += 1;
        device.synchronize()?;
        if start.elapsed() >= min_time {
            return Ok(start.elapsed().as_secs_f64() / calls as f64);
        }
    }
}

/// TFLOP/s of an `n × n` GEMM in `precision`.
pub fn gemm_tflops(
    device: &Device,
    precision: Precision,
    n: usize,
    min_time: Duration,
) -> Result<f64, EngineError> {
    let dtype = dtype_of(precision);
    let a = Tensor::randn(0f32, 1f32, (n, n), device)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1f32, (n, n), device)?.to_dtype(dtype)?;
    let secs = time_per_call(device, min_time, || {
        a.matmul(&b)?;
        Ok(())
    })?;
    Ok(2.0 * (n as f64).powi(3) / secs / 1e12)
}

/// GB/s of a device-to-device copy of `bytes` (counted once read and once written).
pub fn copy_gbps(device: &Device, bytes: usize, min_time: Duration) -> Result<f64, EngineError> {
    let t = Tensor::zeros(bytes / 4, DType::F32, device)?;
    let secs = time_per_call(device, min_time, || {
        t.copy()?;
        Ok(())
    })?;
    Ok(2.0 * bytes as f64 / secs / 1e9)
}

/// GB/s of a copy of `bytes` from (pageable) host memory to `device`.
pub fn host_to_device_gbps(
    device: &Device,
    bytes: usize,
    min_time: Duration,
) -> Result<f64, EngineError> {
    let host = vec![1f32; bytes / 4];
    let secs = time_per_call(device, min_time, || {
        Tensor::from_slice(&host, host.len(), device)?;
        Ok(())
    })?;
    Ok(bytes as f64 / secs / 1e9)
}

/// What the caller knows of the device from NVML (GPUs), folded into the report.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceFacts {
    pub pcie_link_gen: Option<u32>,
    pub pcie_link_width: Option<u32>,
    pub power_limit_watts: Option<f64>,
    pub ecc_enabled: Option<bool>,
}

/// Runs the check on `device` for `precisions`; `telemetry`, when given, samples the clocks
/// while the GEMMs run.
pub fn check(
    device: &Device,
    precisions: &[Precision],
    opts: HealthOptions,
    facts: DeviceFacts,
    telemetry: Option<&dyn TelemetrySource>,
) -> Result<DeviceHealth, EngineError> {
    let start = Instant::now();
    let sampler = telemetry.map(|t| t.start());
    let mut gemm = std::collections::BTreeMap::new();
    for &p in precisions {
        gemm.insert(p, gemm_tflops(device, p, opts.gemm_n, opts.min_time)?);
    }
    let clocks = sampler.map(|s| s.stop());
    let memory_gbps = copy_gbps(device, opts.copy_bytes, opts.min_time)?;
    let host_to_device_gbps = match device {
        Device::Cpu => None,
        _ => Some(host_to_device_gbps(device, opts.copy_bytes, opts.min_time)?),
    };
    Ok(DeviceHealth {
        measured_at: Utc::now(),
        gemm_tflops: gemm,
        gemm_n: opts.gemm_n as u32,
        memory_gbps,
        host_to_device_gbps,
        pcie_link_gen: facts.pcie_link_gen,
        pcie_link_width: facts.pcie_link_width,
        sm_clock_under_load_mhz: clocks
            .and_then(|t| t.sm_clock_mhz)
            .map(|c| c.max.round() as u32)
            .filter(|c| *c > 0),
        power_limit_watts: facts.power_limit_watts,
        ecc_enabled: facts.ecc_enabled,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_check_measures_positive_plausible_numbers() {
        let opts = HealthOptions {
            gemm_n: 128,
            copy_bytes: 8 << 20,
            min_time: Duration::from_millis(20),
        };
        let h = check(
            &Device::Cpu,
            &[Precision::F32],
            opts,
            DeviceFacts::default(),
            None,
        )
        .expect("a check on the CPU");
        h.validate().expect("a valid report");
        let f32 = h.gemm_tflops[&Precision::F32];
        // A 2-core VM does tens of GFLOP/s; anything from 0.1 GFLOP/s to 100 TFLOP/s is sane.
        assert!(f32 > 1e-4 && f32 < 100.0, "{h:?}");
        assert!(h.memory_gbps > 0.01 && h.memory_gbps < 10_000.0, "{h:?}");
        assert_eq!(h.host_to_device_gbps, None);
        assert_eq!(h.gemm_n, 128);
    }
}
