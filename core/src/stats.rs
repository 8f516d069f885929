//! Summary statistics over per-iteration latencies.
//!
//! Percentiles use linear interpolation between order statistics (numpy's default), so the same
//! samples give the same p99 here and in the Python reference script. The confidence interval is
//! Student's t on the mean, which is honest for the short runs a 5-second minimum can give.

use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, StudentsT};

use crate::quantile::PercentileCis;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyStats {
    pub count: u64,
    pub mean_ms: f64,
    pub std_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    /// 95% confidence interval of the mean.
    pub ci95_low_ms: f64,
    pub ci95_high_ms: f64,
    /// p50, p90 and p99 with distribution-free 95% intervals; each `None` when the samples are
    /// too few to support it (see [`crate::quantile`]). `p50_ms`..`p99_ms` above are the plain
    /// sample percentiles, kept for continuity; claims should use these.
    #[serde(default)]
    pub percentiles: PercentileCis,
}

impl LatencyStats {
    /// Statistics of `samples_ms`; `None` when there are none.
    pub fn from_samples(samples_ms: &[f64]) -> Option<Self> {
        if samples_ms.is_empty() {
            return None;
        }
        let mut sorted = samples_ms.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let mean = sorted.iter().sum::<f64>() / n as f64;
        let var = if n > 1 {
            sorted.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64
        } else {
            0.0
        };
        let std = var.sqrt();
        let half_width = ci95_half_width(n as u64, std);
        Some(LatencyStats {
            count: n as u64,
            mean_ms: mean,
            std_ms: std,
            min_ms: sorted[0],
            max_ms: sorted[n - 1],
            p50_ms: percentile_sorted(&sorted, 50.0),
            p90_ms: percentile_sorted(&sorted, 90.0),
            p99_ms: percentile_sorted(&sorted, 99.0),
            ci95_low_ms: mean - half_width,
            ci95_high_ms: mean + half_width,
            percentiles: PercentileCis::from_sorted(&sorted),
        })
    }

    /// Coefficient of variation: the spread relative to the mean.
    pub fn cv(&self) -> f64 {
        if self.mean_ms > 0.0 {
            self.std_ms / self.mean_ms
        } else {
            0.0
        }
    }

    /// Images per second at this batch size, from the mean latency.
    pub fn images_per_sec(&self, batch: u32) -> f64 {
        if self.mean_ms > 0.0 {
            batch as f64 * 1000.0 / self.mean_ms
        } else {
            0.0
        }
    }
}

/// Half the width of the 95% confidence interval of a mean of `n` samples with sample standard
/// deviation `std` (Student's t with n − 1 degrees of freedom); 0 below two samples.
pub fn ci95_half_width(n: u64, std: f64) -> f64 {
    if n < 2 {
        return 0.0;
    }
    let t = StudentsT::new(0.0, 1.0, (n - 1) as f64)
        .map(|d| d.inverse_cdf(0.975))
        .unwrap_or(1.96);
    t * std / (n as f64).sqrt()
}

/// The 95% confidence interval of a comparison cell's throughput (images/s), as (low, high).
///
/// With several results (`n` ≥ 2) it is the interval of the mean of their throughputs, whose
/// mean and sample standard deviation are given. With one result it is that result's own
/// interval of the mean latency, `latency_ci95_ms`, turned into images/s at `batch`. `None`
/// when there is nothing to go on, or the numbers do not make an interval.
pub fn throughput_ci95(
    n: u64,
    mean_images_per_sec: f64,
    std_images_per_sec: f64,
    batch: u32,
    latency_ci95_ms: (f64, f64),
) -> Option<(f64, f64)> {
    let ci = match n {
        0 => return None,
        1 => {
            let (lo, hi) = latency_ci95_ms;
            if !(lo > 0.0 && hi > 0.0) {
                return None;
            }
            let b = batch as f64 * 1000.0;
            (b / hi, b / lo)
        }
        n => {
            let h = ci95_half_width(n, std_images_per_sec);
            (mean_images_per_sec - h, mean_images_per_sec + h)
        }
    };
    (ci.0.is_finite() && ci.1.is_finite() && ci.0 <= ci.1).then_some(ci)
}

/// The median of `values` (the mean of the two middle ones for an even count); `None` for none.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some(percentile_sorted(&sorted, 50.0))
}

/// Linear-interpolated percentile of already sorted samples, `q` in 0..=100.
pub fn percentile_sorted(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let rank = (q / 100.0).clamp(0.0, 1.0) * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = rank.ceil() as usize;
            let frac = rank - lo as f64;
            sorted[lo] + (sorted[hi] - sorted[lo]) * frac
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_hand_computed_values() {
        // 1..=10: mean 5.5, sample std sqrt(55/6), p50 5.5, p90 9.1, p99 9.91.
        let xs: Vec<f64> = (1..=10).map(f64::from).collect();
        let s = LatencyStats::from_samples(&xs).unwrap();
        assert_eq!(s.count, 10);
        assert!((s.mean_ms - 5.5).abs() < 1e-12);
        assert!((s.std_ms - (55.0f64 / 6.0).sqrt()).abs() < 1e-12);
        assert!((s.p50_ms - 5.5).abs() < 1e-12);
        assert!((s.p90_ms - 9.1).abs() < 1e-12);
        assert!((s.p99_ms - 9.91).abs() < 1e-12);
        // t(0.975, 9) = 2.2622: half width = 2.2622 * 3.0277 / sqrt(10) = 2.1659.
        assert!((s.ci95_high_ms - s.mean_ms - 2.1659).abs() < 1e-3, "{s:?}");
        assert!((s.images_per_sec(8) - 8000.0 / 5.5).abs() < 1e-9);
    }

    #[test]
    fn throughput_intervals_across_results_and_from_one_result() {
        // Several results: the interval of their mean, as from_samples gives it.
        let ips = [100.0, 110.0, 120.0];
        let s = LatencyStats::from_samples(&ips).unwrap();
        let (lo, hi) = throughput_ci95(3, s.mean_ms, s.std_ms, 8, (0.0, 0.0)).unwrap();
        assert!((lo - s.ci95_low_ms).abs() < 1e-9 && (hi - s.ci95_high_ms).abs() < 1e-9);
        // One result: its latency interval, 8 images per 40..50 ms.
        let (lo, hi) = throughput_ci95(1, 180.0, 0.0, 8, (40.0, 50.0)).unwrap();
        assert!((lo - 160.0).abs() < 1e-9 && (hi - 200.0).abs() < 1e-9);
        assert_eq!(throughput_ci95(1, 180.0, 0.0, 8, (0.0, 50.0)), None);
        assert_eq!(throughput_ci95(0, 0.0, 0.0, 8, (40.0, 50.0)), None);
    }

    #[test]
    fn order_of_samples_does_not_matter_and_empty_is_none() {
        let a = LatencyStats::from_samples(&[3.0, 1.0, 2.0]).unwrap();
        let b = LatencyStats::from_samples(&[1.0, 2.0, 3.0]).unwrap();
        assert_eq!(a, b);
        assert!(LatencyStats::from_samples(&[]).is_none());
        let one = LatencyStats::from_samples(&[4.0]).unwrap();
        assert_eq!((one.p99_ms, one.std_ms, one.ci95_low_ms), (4.0, 0.0, 4.0));
    }
}
