//! Node health (issue 11): what a device delivers on simple, well-understood work, measured
//! before a node's first job and on demand, so that a rented card that is slower than its
//! kind (a lower power cap, a narrow PCIe link, ECC off, a slow clock) is visible as such
//! rather than hidden in its benchmark numbers.
//!
//! The measurement lives in the engine (`fleetmark_engine::health`); this module holds the
//! report, its validation (it arrives from the wire), and the rule that flags a device more
//! than [`SLOW_FRACTION`] below the median of the devices of its kind on any metric.

use std::{collections::BTreeMap, fmt};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::Precision;

/// A device more than this fraction below the median of its kind on a metric is flagged.
pub const SLOW_FRACTION: f64 = 0.10;
/// Upper bounds that no real device reaches: a report beyond them is refused as nonsense.
pub const MAX_TFLOPS: f64 = 100_000.0;
pub const MAX_GBPS: f64 = 1_000_000.0;
pub const MAX_CLOCK_MHZ: u32 = 100_000;
pub const MAX_POWER_WATTS: f64 = 100_000.0;

/// One device's health check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceHealth {
    pub measured_at: DateTime<Utc>,
    /// Dense matrix multiply throughput per precision (`f32`, `f16`, `bf16`), in TFLOP/s.
    pub gemm_tflops: BTreeMap<Precision, f64>,
    /// The square size of the GEMM.
    pub gemm_n: u32,
    /// Device memory bandwidth from a large copy (bytes read + written), in GB/s.
    pub memory_gbps: f64,
    /// Host-to-device copy bandwidth from pageable host memory, in GB/s (GPUs only).
    #[serde(default)]
    pub host_to_device_gbps: Option<f64>,
    #[serde(default)]
    pub pcie_link_gen: Option<u32>,
    #[serde(default)]
    pub pcie_link_width: Option<u32>,
    /// The highest SM clock seen while the GEMMs ran (GPUs with NVML only).
    #[serde(default)]
    pub sm_clock_under_load_mhz: Option<u32>,
    #[serde(default)]
    pub power_limit_watts: Option<f64>,
    #[serde(default)]
    pub ecc_enabled: Option<bool>,
    /// How long the check took.
    pub seconds: f64,
}

/// Why a report is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("health check: {0}")]
pub struct HealthError(pub String);

fn finite_in(name: &str, v: f64, max: f64) -> Result<(), HealthError> {
    if v.is_finite() && v > 0.0 && v <= max {
        Ok(())
    } else {
        Err(HealthError(format!(
            "{name} must be a positive number up to {max}, not {}",
            crate::limits::Num(v)
        )))
    }
}

impl DeviceHealth {
    /// Every number finite, positive and below a physical bound; at least one GEMM.
    pub fn validate(&self) -> Result<(), HealthError> {
        if self.gemm_tflops.is_empty() {
            return Err(HealthError("no GEMM measurement".into()));
        }
        for (p, v) in &self.gemm_tflops {
            finite_in(&format!("gemm {p}"), *v, MAX_TFLOPS)?;
        }
        finite_in("memory bandwidth", self.memory_gbps, MAX_GBPS)?;
        if let Some(v) = self.host_to_device_gbps {
            finite_in("host-to-device bandwidth", v, MAX_GBPS)?;
        }
        if let Some(v) = self.power_limit_watts {
            finite_in("power limit", v, MAX_POWER_WATTS)?;
        }
        if self
            .sm_clock_under_load_mhz
            .is_some_and(|c| c == 0 || c > MAX_CLOCK_MHZ)
        {
            return Err(HealthError("the SM clock is out of range".into()));
        }
        if self.pcie_link_gen.is_some_and(|g| g == 0 || g > 16)
            || self.pcie_link_width.is_some_and(|w| w == 0 || w > 64)
        {
            return Err(HealthError("the PCIe link is out of range".into()));
        }
        if self.gemm_n == 0 {
            return Err(HealthError("the GEMM size is zero".into()));
        }
        if !(self.seconds.is_finite() && self.seconds >= 0.0) {
            return Err(HealthError("the duration is not a number".into()));
        }
        Ok(())
    }

    /// The metrics compared across devices of one kind; higher is better for each.
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let mut m: Vec<(String, f64)> = self
            .gemm_tflops
            .iter()
            .map(|(p, v)| (format!("gemm_{p}_tflops"), *v))
            .collect();
        m.push(("memory_gbps".into(), self.memory_gbps));
        let optional = [
            ("host_to_device_gbps", self.host_to_device_gbps),
            (
                "pcie_lanes_x_gen",
                self.pcie_link_gen
                    .zip(self.pcie_link_width)
                    .map(|(g, w)| (g * w) as f64),
            ),
            (
                "sm_clock_under_load_mhz",
                self.sm_clock_under_load_mhz.map(f64::from),
            ),
            ("power_limit_watts", self.power_limit_watts),
        ];
        m.extend(
            optional
                .into_iter()
                .filter_map(|(n, v)| v.map(|v| (n.to_string(), v))),
        );
        m
    }
}

/// A metric on which a device sits well below its kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthFlag {
    pub metric: String,
    pub value: f64,
    /// The median of the kind's devices (this one included).
    pub median: f64,
    /// value / median - 1.
    pub vs_median: f64,
}

impl fmt::Display for HealthFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.metric == "ecc" {
            return f.write_str("ecc off");
        }
        write!(f, "{} {:+.0}%", self.metric, self.vs_median * 100.0)
    }
}

/// The metrics on which `me` is more than [`SLOW_FRACTION`] below the median of `kind` (the
/// health of every device of its kind, `me` included), and ECC off where most of its kind have
/// it on. A metric that fewer than two devices report is not compared. To flag every device of
/// a kind, compute [`KindMedians`] once and call [`KindMedians::flags`] for each: this function
/// recomputes them, so calling it per device costs the square of the kind's size.
pub fn flags(me: &DeviceHealth, kind: &[&DeviceHealth]) -> Vec<HealthFlag> {
    KindMedians::of(kind).flags(me)
}

/// What a device of a kind is compared with: each metric's median over the kind's devices
/// that report it (only where at least two do), and whether most of those that report ECC
/// have it on (only where at least two report it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KindMedians {
    medians: BTreeMap<String, f64>,
    ecc_mostly_on: bool,
}

impl KindMedians {
    pub fn of(kind: &[&DeviceHealth]) -> Self {
        let mut values: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for h in kind {
            for (name, v) in h.metrics() {
                values.entry(name).or_default().push(v);
            }
        }
        let medians = values
            .into_iter()
            .filter(|(_, v)| v.len() >= 2)
            .filter_map(|(name, v)| crate::stats::median(&v).map(|m| (name, m)))
            .collect();
        let ecc: Vec<bool> = kind.iter().filter_map(|h| h.ecc_enabled).collect();
        let on = ecc.iter().filter(|e| **e).count();
        KindMedians {
            medians,
            ecc_mostly_on: ecc.len() >= 2 && on * 2 > ecc.len(),
        }
    }

    /// The metrics on which `me` is more than [`SLOW_FRACTION`] below these medians, in the
    /// order [`DeviceHealth::metrics`] lists them, then ECC off where most have it on.
    pub fn flags(&self, me: &DeviceHealth) -> Vec<HealthFlag> {
        let mut out: Vec<HealthFlag> = me
            .metrics()
            .into_iter()
            .filter_map(|(name, value)| {
                let mid = *self.medians.get(&name)?;
                (mid > 0.0 && value < mid * (1.0 - SLOW_FRACTION)).then(|| HealthFlag {
                    metric: name,
                    value,
                    median: mid,
                    vs_median: value / mid - 1.0,
                })
            })
            .collect();
        if me.ecc_enabled == Some(false) && self.ecc_mostly_on {
            out.push(HealthFlag {
                metric: "ecc".into(),
                value: 0.0,
                median: 1.0,
                vs_median: -1.0,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(f16: f64, mem: f64, power: Option<f64>, ecc: Option<bool>) -> DeviceHealth {
        DeviceHealth {
            measured_at: Utc::now(),
            gemm_tflops: [(Precision::F32, 50.0), (Precision::F16, f16)].into(),
            gemm_n: 8192,
            memory_gbps: mem,
            host_to_device_gbps: Some(20.0),
            pcie_link_gen: Some(5),
            pcie_link_width: Some(16),
            sm_clock_under_load_mhz: Some(1980),
            power_limit_watts: power,
            ecc_enabled: ecc,
            seconds: 3.0,
        }
    }

    #[test]
    fn a_device_well_below_its_kind_is_flagged_on_that_metric_only() {
        let a = health(700.0, 3000.0, Some(700.0), Some(true));
        let b = health(690.0, 2950.0, Some(700.0), Some(true));
        // A power-capped card: GEMMs 14% below the median, same memory, ECC off.
        let c = health(595.0, 2990.0, Some(500.0), Some(false));
        let kind = [&a, &b, &c];
        assert!(flags(&a, &kind).is_empty());
        assert!(flags(&b, &kind).is_empty(), "1.4% below is noise");
        let f = flags(&c, &kind);
        let names: Vec<String> = f.iter().map(|f| f.to_string()).collect();
        assert_eq!(
            names,
            ["gemm_f16_tflops -14%", "power_limit_watts -29%", "ecc off"],
            "{f:?}"
        );
    }

    /// The flags as first written: each metric's peers gathered and their median taken per
    /// device. [`KindMedians`] must agree with it on every device.
    fn flags_one_by_one(me: &DeviceHealth, kind: &[&DeviceHealth]) -> Vec<HealthFlag> {
        let mut out = Vec::new();
        for (name, value) in me.metrics() {
            let peers: Vec<f64> = kind
                .iter()
                .filter_map(|h| h.metrics().into_iter().find(|(n, _)| *n == name))
                .map(|(_, v)| v)
                .collect();
            let Some(mid) = crate::stats::median(&peers).filter(|_| peers.len() >= 2) else {
                continue;
            };
            if mid > 0.0 && value < mid * (1.0 - SLOW_FRACTION) {
                out.push(HealthFlag {
                    metric: name,
                    value,
                    median: mid,
                    vs_median: value / mid - 1.0,
                });
            }
        }
        let ecc: Vec<bool> = kind.iter().filter_map(|h| h.ecc_enabled).collect();
        let on = ecc.iter().filter(|e| **e).count();
        if me.ecc_enabled == Some(false) && ecc.len() >= 2 && on * 2 > ecc.len() {
            out.push(HealthFlag {
                metric: "ecc".into(),
                value: 0.0,
                median: 1.0,
                vs_median: -1.0,
            });
        }
        out
    }

    #[test]
    fn medians_computed_once_flag_as_medians_per_device_did() {
        // A kind of mixed reports: some without power or ECC, some slow, some without bf16.
        let mut kind = Vec::new();
        for i in 0..40u32 {
            let slow = if i % 7 == 0 {
                0.8
            } else {
                1.0 + f64::from(i % 5) * 0.01
            };
            let mut h = health(
                700.0 * slow,
                3000.0 * if i % 11 == 0 { 0.85 } else { 1.0 },
                (i % 3 != 0).then_some(700.0 - f64::from(i % 4) * 60.0),
                match i % 4 {
                    0 => None,
                    1 => Some(false),
                    _ => Some(true),
                },
            );
            if i % 2 == 0 {
                h.gemm_tflops.insert(Precision::Bf16, 690.0 * slow);
            }
            kind.push(h);
        }
        for n in [1, 2, 3, 10, 40] {
            let refs: Vec<&DeviceHealth> = kind[..n].iter().collect();
            let medians = KindMedians::of(&refs);
            for me in &refs {
                assert_eq!(medians.flags(me), flags_one_by_one(me, &refs), "n={n}");
            }
        }
        let flagged = kind
            .iter()
            .filter(|h| !flags(h, &kind.iter().collect::<Vec<_>>()).is_empty())
            .count();
        assert!(flagged > 0 && flagged < kind.len(), "{flagged}");
    }

    #[test]
    fn one_device_alone_is_never_flagged() {
        let a = health(100.0, 10.0, None, Some(false));
        assert!(flags(&a, &[&a]).is_empty());
    }

    #[test]
    fn nonsense_reports_are_refused() {
        let good = health(700.0, 3000.0, Some(700.0), Some(true));
        assert!(good.validate().is_ok());
        let mut nan = good.clone();
        nan.memory_gbps = f64::NAN;
        assert!(nan.validate().is_err());
        let mut huge = good.clone();
        huge.gemm_tflops.insert(Precision::Bf16, 1e12);
        assert!(huge.validate().is_err());
        let mut none = good.clone();
        none.gemm_tflops.clear();
        assert!(none.validate().is_err());
        let mut lanes = good.clone();
        lanes.pcie_link_width = Some(0);
        assert!(lanes.validate().is_err());
        let mut negative = good;
        negative.power_limit_watts = Some(-1.0);
        assert!(negative.validate().is_err());
    }
}
