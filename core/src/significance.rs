//! Whether a difference between two measurements is real, and what repetitions of one point
//! agree on.
//!
//! A throughput ratio between two cells of `compare` gets a 95% confidence interval from
//! **Welch's t-test on the logarithm of per-window throughput**: the windows of each side are
//! the samples, their log-means differ by `d` with Welch's standard error and
//! Welch–Satterthwaite degrees of freedom, and the ratio's interval is `exp(d ± t·se)`. The
//! difference is significant when that interval excludes 1, which is exactly when the two-sided
//! test's p-value is below 5%. Logarithms make the interval a ratio's (asymmetric, positive)
//! and treat a 10% gain and a 10% loss alike.
//!
//! Caveat (said in docs/measurement.md): windows of one run are not fully independent, so the
//! interval is somewhat narrower than the run-to-run truth; repetitions are the remedy, and
//! their spread is reported beside it.

use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, Normal, StudentsT};

use crate::BenchResult;

/// A ratio `a / b` of two throughputs with its 95% interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RatioEstimate {
    /// exp(mean log a - mean log b): the ratio of geometric means.
    pub ratio: f64,
    pub ci95_low: f64,
    pub ci95_high: f64,
    /// Two-sided p-value of Welch's t-test on the log throughputs.
    pub p_value: f64,
    /// The interval excludes 1 (p < 0.05).
    pub significant: bool,
    /// Samples (windows) on each side.
    pub samples_a: usize,
    pub samples_b: usize,
}

fn mean_var(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var)
}

/// Welch's comparison of throughputs `a` against `b`; `None` unless each side has at least two
/// positive, finite samples.
pub fn welch_ratio(a: &[f64], b: &[f64]) -> Option<RatioEstimate> {
    let logs = |xs: &[f64]| -> Option<Vec<f64>> {
        xs.iter()
            .map(|&x| (x.is_finite() && x > 0.0).then(|| x.ln()))
            .collect()
    };
    let (la, lb) = (logs(a)?, logs(b)?);
    if la.len() < 2 || lb.len() < 2 {
        return None;
    }
    let (ma, va) = mean_var(&la);
    let (mb, vb) = mean_var(&lb);
    let (na, nb) = (la.len() as f64, lb.len() as f64);
    let (sa, sb) = (va / na, vb / nb);
    let se = (sa + sb).sqrt();
    let d = ma - mb;
    if se == 0.0 {
        // Identical windows on both sides: the difference is exact.
        let r = d.exp();
        return Some(RatioEstimate {
            ratio: r,
            ci95_low: r,
            ci95_high: r,
            p_value: if d == 0.0 { 1.0 } else { 0.0 },
            significant: d != 0.0,
            samples_a: la.len(),
            samples_b: lb.len(),
        });
    }
    let df = (sa + sb).powi(2) / (sa.powi(2) / (na - 1.0) + sb.powi(2) / (nb - 1.0));
    let t_dist = StudentsT::new(0.0, 1.0, df).ok()?;
    let t_crit = t_dist.inverse_cdf(0.975);
    let t = d / se;
    let p_value = (2.0 * (1.0 - t_dist.cdf(t.abs()))).clamp(0.0, 1.0);
    let (lo, hi) = ((d - t_crit * se).exp(), (d + t_crit * se).exp());
    Some(RatioEstimate {
        ratio: d.exp(),
        ci95_low: lo,
        ci95_high: hi,
        p_value,
        significant: lo > 1.0 || hi < 1.0,
        samples_a: la.len(),
        samples_b: lb.len(),
    })
}

/// A ratio `a / b` from each side's estimate and 95% interval, when the per-window samples are
/// not at hand (a comparison summarised by the coordinator). Each interval is read as a normal
/// interval on the log scale, `se = ln(high / low) / (2 · 1.96)`, and the ratio's interval is
/// `exp(d ± 1.96 · sqrt(se_a² + se_b²))`: an approximation, coarser than [`welch_ratio`].
/// `None` unless both estimates and intervals are positive and finite. `samples_*` carry the
/// number of results on each side.
pub fn ratio_from_intervals(
    a: (f64, (f64, f64), usize),
    b: (f64, (f64, f64), usize),
) -> Option<RatioEstimate> {
    let log_se = |(est, (lo, hi), _): (f64, (f64, f64), usize)| -> Option<(f64, f64)> {
        let ok = |x: f64| x.is_finite() && x > 0.0;
        (ok(est) && ok(lo) && ok(hi) && hi >= lo).then(|| (est.ln(), (hi / lo).ln() / (2.0 * 1.96)))
    };
    let ((la, sa), (lb, sb)) = (log_se(a)?, log_se(b)?);
    let d = la - lb;
    let se = (sa * sa + sb * sb).sqrt();
    let (lo, hi, p_value) = if se == 0.0 {
        (d.exp(), d.exp(), if d == 0.0 { 1.0 } else { 0.0 })
    } else {
        let z = Normal::new(0.0, 1.0).ok()?;
        let p = (2.0 * (1.0 - z.cdf((d / se).abs()))).clamp(0.0, 1.0);
        ((d - 1.96 * se).exp(), (d + 1.96 * se).exp(), p)
    };
    Some(RatioEstimate {
        ratio: d.exp(),
        ci95_low: lo,
        ci95_high: hi,
        p_value,
        significant: lo > 1.0 || hi < 1.0,
        samples_a: a.2,
        samples_b: b.2,
    })
}

/// What the repetitions of one point agree on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RepetitionSummary {
    pub results: usize,
    /// Mean of the results' throughputs.
    pub mean_images_per_sec: f64,
    /// Sample standard deviation between the results (0 for one result).
    pub std_images_per_sec: f64,
    pub min_images_per_sec: f64,
    pub max_images_per_sec: f64,
    /// (max - min) / mean: how far the repetitions disagree.
    pub spread: f64,
    /// Results whose timing was not found stable.
    pub unstable: usize,
    /// Results without a stability record (older agents).
    pub unknown_stability: usize,
}

/// Aggregates repetitions (or any results of one point); `None` for none.
pub fn summarize_repetitions(results: &[&BenchResult]) -> Option<RepetitionSummary> {
    if results.is_empty() {
        return None;
    }
    let ips: Vec<f64> = results.iter().map(|r| r.images_per_sec).collect();
    let n = ips.len() as f64;
    let mean = ips.iter().sum::<f64>() / n;
    let std = if ips.len() > 1 {
        mean_var(&ips).1.sqrt()
    } else {
        0.0
    };
    let min = ips.iter().copied().fold(f64::INFINITY, f64::min);
    let max = ips.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some(RepetitionSummary {
        results: results.len(),
        mean_images_per_sec: mean,
        std_images_per_sec: std,
        min_images_per_sec: min,
        max_images_per_sec: max,
        spread: if mean > 0.0 { (max - min) / mean } else { 0.0 },
        unstable: results
            .iter()
            .filter(|r| r.stability.as_ref().is_some_and(|s| !s.stable))
            .count(),
        unknown_stability: results.iter().filter(|r| r.stability.is_none()).count(),
    })
}

/// Per-window throughputs of several results, pooled; results without windows contribute their
/// overall throughput as one sample.
pub fn pooled_window_throughputs(results: &[&BenchResult]) -> Vec<f64> {
    results
        .iter()
        .flat_map(|r| match &r.stability {
            Some(s) if !s.windows.is_empty() => s.window_throughputs(),
            _ => vec![r.images_per_sec],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testseries::steady;

    #[test]
    fn equal_throughputs_are_not_a_significant_difference() {
        let a = steady(20, 1000.0, 0.02, 1);
        let b = steady(20, 1000.0, 0.02, 2);
        let r = welch_ratio(&a, &b).unwrap();
        assert!(!r.significant, "{r:?}");
        assert!(r.ci95_low < 1.0 && r.ci95_high > 1.0);
        assert!(r.p_value > 0.05);
    }

    #[test]
    fn a_ten_percent_gain_with_little_noise_is_significant() {
        let a = steady(10, 1100.0, 0.01, 3);
        let b = steady(10, 1000.0, 0.01, 4);
        let r = welch_ratio(&a, &b).unwrap();
        assert!(r.significant && r.p_value < 1e-6, "{r:?}");
        assert!((r.ratio - 1.1).abs() < 0.01, "{r:?}");
        assert!(r.ci95_low > 1.08 && r.ci95_high < 1.12, "{r:?}");
        // The reverse ratio is its reciprocal, interval included.
        let back = welch_ratio(&b, &a).unwrap();
        assert!((back.ratio * r.ratio - 1.0).abs() < 1e-12);
        assert!((back.ci95_low * r.ci95_high - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_small_gain_inside_the_noise_is_not_significant() {
        // 2% apart with ±20% noise over three windows each.
        let a = steady(3, 1020.0, 0.2, 5);
        let b = steady(3, 1000.0, 0.2, 6);
        let r = welch_ratio(&a, &b).unwrap();
        assert!(!r.significant, "{r:?}");
    }

    #[test]
    fn a_known_welch_example() {
        // log-samples chosen so the test is textbook: a = e^{1,2,3,4}, b = e^{2,3,4,5,6}.
        // d = 2.5 - 4 = -1.5; se^2 = (5/3)/4 + 2.5/5 = 0.9167; t = -1.5667; df = 6.97.
        let a: Vec<f64> = [1.0f64, 2.0, 3.0, 4.0].iter().map(|x| x.exp()).collect();
        let b: Vec<f64> = [2.0f64, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .map(|x| x.exp())
            .collect();
        let r = welch_ratio(&a, &b).unwrap();
        assert!((r.ratio.ln() + 1.5).abs() < 1e-12);
        // Two-sided p for t = 1.5667 on 6.97 df is 0.161.
        assert!((r.p_value - 0.161).abs() < 0.01, "{r:?}");
        assert!(!r.significant);
    }

    #[test]
    fn too_few_or_bad_samples_give_no_estimate() {
        assert!(welch_ratio(&[1.0], &[1.0, 2.0]).is_none());
        assert!(welch_ratio(&[1.0, f64::NAN], &[1.0, 2.0]).is_none());
        assert!(welch_ratio(&[1.0, 0.0], &[1.0, 2.0]).is_none());
        let exact = welch_ratio(&[2.0, 2.0], &[1.0, 1.0]).unwrap();
        assert!(exact.significant && exact.ratio == 2.0);
    }

    #[test]
    fn ratios_from_intervals_separate_clear_gaps_from_overlaps() {
        // 2000 ± 2% against 1000 ± 2%: clearly twice as fast.
        let r = ratio_from_intervals((2000.0, (1960.0, 2040.0), 1), (1000.0, (980.0, 1020.0), 1))
            .expect("ratio");
        assert!((r.ratio - 2.0).abs() < 1e-9);
        assert!(
            r.significant && r.ci95_low > 1.9 && r.ci95_high < 2.1,
            "{r:?}"
        );
        // 1010 against 1000, each ± 5%: not significant.
        let r = ratio_from_intervals((1010.0, (960.0, 1060.0), 3), (1000.0, (950.0, 1050.0), 3))
            .expect("ratio");
        assert!(
            !r.significant && r.ci95_low < 1.0 && r.ci95_high > 1.0,
            "{r:?}"
        );
        assert_eq!((r.samples_a, r.samples_b), (3, 3));
        // Nonsense intervals give no answer rather than a made-up one.
        assert!(ratio_from_intervals((1.0, (0.0, 2.0), 1), (1.0, (0.5, 2.0), 1)).is_none());
        assert!(ratio_from_intervals((f64::NAN, (1.0, 2.0), 1), (1.0, (0.5, 2.0), 1)).is_none());
    }
}
