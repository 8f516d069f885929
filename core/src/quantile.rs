//! Percentiles with their confidence: distribution-free 95% intervals from order statistics.
//!
//! A sample percentile from a handful of iterations is a guess; this module says how good a
//! guess. For the q-quantile ξ of any continuous distribution, the number of samples below ξ is
//! Binomial(n, q), so the interval between the l-th and u-th smallest samples covers ξ with
//! probability at least `F(u-1) - F(l-1)`, F being that binomial's CDF. We take equal tails:
//! the largest l with `F(l-1) <= 2.5%` and the smallest u with `F(u-1) >= 97.5%`. When no such
//! l >= 1 or u <= n exists, the samples cannot support the percentile at 95% and it is reported
//! as "not enough samples" (`None`): p50 needs 6 samples, p90 36 and p99 368.
//!
//! The point estimate stays numpy's linear interpolation, as in [`crate::stats`].

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};
use statrs::distribution::{Binomial, DiscreteCDF};

use crate::{stats::percentile_sorted, CoreError};

/// The confidence every interval here is formed at.
pub const CONFIDENCE: f64 = 0.95;

/// The percentiles Fleetmark reports with an interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Percentile {
    P50,
    P90,
    P99,
}

impl Percentile {
    pub const ALL: [Percentile; 3] = [Percentile::P50, Percentile::P90, Percentile::P99];

    /// The quantile as a fraction: 0.5, 0.9, 0.99.
    pub fn quantile(self) -> f64 {
        match self {
            Percentile::P50 => 0.5,
            Percentile::P90 => 0.9,
            Percentile::P99 => 0.99,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Percentile::P50 => "p50",
            Percentile::P90 => "p90",
            Percentile::P99 => "p99",
        }
    }

    /// The fewest samples whose 95% interval for this percentile can be formed.
    pub fn min_samples(self) -> usize {
        min_samples(self.quantile(), CONFIDENCE)
    }
}

impl fmt::Display for Percentile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Percentile {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "p50" | "50" | "median" => Ok(Percentile::P50),
            "p90" | "90" => Ok(Percentile::P90),
            "p99" | "99" => Ok(Percentile::P99),
            _ => Err(CoreError::InvalidSweep(format!(
                "unknown percentile '{s}': use p50, p90 or p99"
            ))),
        }
    }
}

impl TryFrom<String> for Percentile {
    type Error = CoreError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<Percentile> for String {
    fn from(p: Percentile) -> Self {
        p.as_str().to_string()
    }
}

/// One percentile with its 95% confidence interval, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PercentileEstimate {
    pub ms: f64,
    pub ci95_low_ms: f64,
    pub ci95_high_ms: f64,
}

impl PercentileEstimate {
    /// The larger distance from the estimate to an end of its interval, relative to the
    /// estimate: 0.05 means "within 5%".
    pub fn relative_half_width(&self) -> f64 {
        if self.ms > 0.0 {
            (self.ms - self.ci95_low_ms).max(self.ci95_high_ms - self.ms) / self.ms
        } else {
            f64::INFINITY
        }
    }
}

/// p50, p90 and p99 with their intervals; `None` where the samples cannot support one.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct PercentileCis {
    pub p50: Option<PercentileEstimate>,
    pub p90: Option<PercentileEstimate>,
    pub p99: Option<PercentileEstimate>,
}

impl PercentileCis {
    /// Intervals for already sorted samples.
    pub fn from_sorted(sorted: &[f64]) -> Self {
        PercentileCis {
            p50: estimate(sorted, Percentile::P50),
            p90: estimate(sorted, Percentile::P90),
            p99: estimate(sorted, Percentile::P99),
        }
    }

    /// Every interval present is finite, non-negative and ordered.
    pub fn validate(&self) -> Result<(), String> {
        for p in Percentile::ALL {
            if let Some(e) = self.get(p) {
                let ok = [e.ms, e.ci95_low_ms, e.ci95_high_ms]
                    .iter()
                    .all(|x| x.is_finite() && *x >= 0.0)
                    && e.ci95_low_ms <= e.ci95_high_ms;
                if !ok {
                    return Err(format!("{p} interval {e:?} is not finite and ordered"));
                }
            }
        }
        Ok(())
    }

    pub fn get(&self, p: Percentile) -> Option<&PercentileEstimate> {
        match p {
            Percentile::P50 => self.p50.as_ref(),
            Percentile::P90 => self.p90.as_ref(),
            Percentile::P99 => self.p99.as_ref(),
        }
    }
}

/// The 1-based ranks `(l, u)` of the order statistics that bracket the q-quantile of `n`
/// samples with at least `confidence`, with equal tails; `None` when `n` is too small.
pub fn order_statistic_ranks(n: usize, q: f64, confidence: f64) -> Option<(usize, usize)> {
    if n == 0 || !(0.0..1.0).contains(&q) || q == 0.0 {
        return None;
    }
    let tail = (1.0 - confidence) / 2.0;
    let binomial = Binomial::new(q, n as u64).ok()?;
    let cdf = |k: usize| binomial.cdf(k as u64);
    if cdf(0) > tail || cdf(n - 1) < 1.0 - tail {
        return None;
    }
    // F is non-decreasing: the last k with F(k) <= tail, and the first k with F(k) >= 1 - tail.
    let last_at_most = partition_point(n, |k| cdf(k) <= tail) - 1;
    let first_at_least = partition_point(n, |k| cdf(k) < 1.0 - tail);
    Some((last_at_most + 1, first_at_least + 1))
}

/// The first k in 0..n for which `pred` is false (`pred` true on a prefix).
fn partition_point(n: usize, pred: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0usize, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The fewest samples for which [`order_statistic_ranks`] exists: both `(1-q)^n` and `q^n`
/// must be at most the tail probability.
pub fn min_samples(q: f64, confidence: f64) -> usize {
    let tail = (1.0 - confidence) / 2.0;
    let need = |p: f64| (tail.ln() / p.ln()).ceil() as usize;
    let mut n = need(q).max(need(1.0 - q)).max(1);
    // The closed form can be one off at a floating-point boundary; settle it exactly.
    while n > 1 && order_statistic_ranks(n - 1, q, confidence).is_some() {
        n -= 1;
    }
    while order_statistic_ranks(n, q, confidence).is_none() {
        n += 1;
    }
    n
}

/// A percentile of sorted samples with its 95% interval, or `None` (not enough samples).
pub fn estimate(sorted: &[f64], p: Percentile) -> Option<PercentileEstimate> {
    let (l, u) = order_statistic_ranks(sorted.len(), p.quantile(), CONFIDENCE)?;
    Some(PercentileEstimate {
        ms: percentile_sorted(sorted, p.quantile() * 100.0),
        ci95_low_ms: sorted[l - 1],
        ci95_high_ms: sorted[u - 1],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testseries::{bimodal, drifting, steady};

    #[test]
    fn sample_counts_needed_match_the_binomial_bounds() {
        // 0.5^6 = 0.0156 <= 0.025 < 0.5^5; 0.9^36 = 0.0225 <= 0.025 < 0.9^35 = 0.0250;
        // 0.99^368 = 0.0247 <= 0.025 < 0.99^367.
        assert_eq!(Percentile::P50.min_samples(), 6);
        assert_eq!(Percentile::P90.min_samples(), 36);
        assert_eq!(Percentile::P99.min_samples(), 368);
        for p in Percentile::ALL {
            let n = p.min_samples();
            assert!(order_statistic_ranks(n, p.quantile(), CONFIDENCE).is_some());
            assert!(order_statistic_ranks(n - 1, p.quantile(), CONFIDENCE).is_none());
        }
    }

    #[test]
    fn the_median_of_ten_uses_the_textbook_ranks() {
        // n = 10, q = 0.5: F(1) = 11/1024 = 0.0107 <= 0.025 < F(2) = 0.0547, so l = 2; by
        // symmetry u = 9, with coverage 1 - 2 * 0.0107 = 0.979.
        assert_eq!(order_statistic_ranks(10, 0.5, 0.95), Some((2, 9)));
    }

    #[test]
    fn intervals_cover_their_percentile_at_least_95_percent_of_the_time() {
        // Exponential samples with known quantiles, 400 trials of 400 samples each.
        let mut rng = crate::testseries::Lcg::new(7);
        for p in Percentile::ALL {
            let truth = -(1.0 - p.quantile()).ln();
            let trials = 400;
            let mut covered = 0;
            for _ in 0..trials {
                let mut xs: Vec<f64> = (0..400).map(|_| -(1.0 - rng.next_f64()).ln()).collect();
                xs.sort_by(f64::total_cmp);
                let e = estimate(&xs, p).expect("400 samples support p99");
                if e.ci95_low_ms <= truth && truth <= e.ci95_high_ms {
                    covered += 1;
                }
            }
            // The interval is conservative; allow the Monte-Carlo error of 400 trials.
            assert!(
                covered as f64 / trials as f64 >= 0.93,
                "{p}: {covered}/{trials}"
            );
        }
    }

    #[test]
    fn too_short_a_series_cannot_support_a_p99() {
        let mut xs = steady(5, 10.0, 0.01, 1);
        xs.sort_by(f64::total_cmp);
        let cis = PercentileCis::from_sorted(&xs);
        assert_eq!(cis, PercentileCis::default(), "5 samples support nothing");
        let mut xs = steady(100, 10.0, 0.01, 1);
        xs.sort_by(f64::total_cmp);
        let cis = PercentileCis::from_sorted(&xs);
        assert!(cis.p50.is_some() && cis.p90.is_some());
        assert!(cis.p99.is_none(), "100 samples cannot support a p99");
    }

    #[test]
    fn steady_series_give_tight_intervals_and_bimodal_ones_wide() {
        let mut xs = steady(2000, 10.0, 0.01, 2);
        xs.sort_by(f64::total_cmp);
        let p50 = estimate(&xs, Percentile::P50).unwrap();
        assert!(p50.ci95_low_ms <= p50.ms && p50.ms <= p50.ci95_high_ms);
        assert!(p50.relative_half_width() < 0.01, "{p50:?}");

        // Half the iterations at 10 ms, half at 20 ms: the median sits between the modes and
        // its interval spans them.
        let mut xs = bimodal(2000, 10.0, 20.0, 0.5, 3);
        xs.sort_by(f64::total_cmp);
        let p50 = estimate(&xs, Percentile::P50).unwrap();
        assert!(p50.ci95_low_ms < 11.0 && p50.ci95_high_ms > 19.0, "{p50:?}");
        assert!(p50.relative_half_width() > 0.3);
    }

    #[test]
    fn drifting_series_still_bracket_their_pooled_percentile() {
        let mut xs = drifting(1000, 10.0, 0.0005, 4);
        xs.sort_by(f64::total_cmp);
        for p in Percentile::ALL {
            let e = estimate(&xs, p).unwrap();
            assert!(
                e.ci95_low_ms <= e.ms && e.ms <= e.ci95_high_ms,
                "{p}: {e:?}"
            );
        }
    }

    #[test]
    fn percentiles_parse_and_print() {
        assert_eq!("P99".parse::<Percentile>().unwrap(), Percentile::P99);
        assert_eq!(Percentile::P90.to_string(), "p90");
        assert!("p95".parse::<Percentile>().is_err());
    }
}
