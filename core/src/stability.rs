//! The stability rule: when timing may stop, and the record of why it did.
//!
//! Timed iterations are cut into windows of at least `stability_window` of timed (device) time.
//! Timing may stop once the minimum count and duration are met **and** the last k windows agree
//! – their throughputs' max/min is within `1 + stability_tolerance`, perf_analyzer's rule – and,
//! when the sweep asks for one, a percentile's 95% interval is as tight as requested (LoadGen's
//! early stopping). Otherwise it runs on until `max_duration` or `max_iterations`.
//!
//! This is pure logic over a latency series, so it is tested on synthetic series without a
//! device; the engine feeds it real iterations and real elapsed time.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{quantile, MeasurementSpec};

/// Why timing stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The minimums were met and the stability rule held.
    Stable,
    /// `max_duration` passed first.
    MaxDuration,
    /// `max_iterations` were run first.
    MaxIterations,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Stable => "stable",
            StopReason::MaxDuration => "max_duration",
            StopReason::MaxIterations => "max_iterations",
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One closed window of timed iterations.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub iterations: u32,
    /// Timed (device) seconds in the window: the sum of its iterations' latencies.
    pub seconds: f64,
    pub images_per_sec: f64,
}

/// What a result records about its stability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StabilityReport {
    /// The last `required_windows` windows agreed within the tolerance when timing stopped.
    pub stable: bool,
    pub stop_reason: StopReason,
    /// max/min - 1 of the last `required_windows` windows' throughput; `None` when fewer
    /// windows closed.
    pub spread: Option<f64>,
    /// Every closed window, in order (iterations after the last one are in no window).
    pub windows: Vec<Window>,
    /// The rule it was judged by.
    pub required_windows: u32,
    pub window_seconds: f64,
    pub tolerance: f64,
    /// Whether the percentile target was met; `None` when the sweep set none.
    pub percentile_target_met: Option<bool>,
}

impl StabilityReport {
    /// Checks a report from the wire or a file: finite, positive windows, and a verdict that
    /// follows from them.
    pub fn validate(&self) -> Result<(), String> {
        if self.windows.len() as u128 > crate::job::MAX_WINDOWS {
            return Err(format!(
                "stability: over {} windows",
                crate::job::MAX_WINDOWS
            ));
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if self
            .windows
            .iter()
            .any(|w| w.iterations == 0 || !positive(w.seconds) || !positive(w.images_per_sec))
        {
            return Err("stability: a window is empty or not a positive, finite number".into());
        }
        if !positive(self.tolerance) || !positive(self.window_seconds) {
            return Err("stability: the rule's tolerance and window must be positive".into());
        }
        if self.spread.is_some_and(|s| !(s.is_finite() && s >= 0.0)) {
            return Err("stability: the spread must be a finite number >= 0".into());
        }
        let agreed = self.spread.is_some_and(|s| s <= self.tolerance);
        if self.stable != agreed {
            return Err(format!(
                "stability: stable = {} does not follow from spread {:?} and tolerance {}",
                self.stable,
                self.spread,
                crate::limits::Num(self.tolerance)
            ));
        }
        if self.stop_reason == StopReason::Stable && !self.stable {
            return Err("stability: stopped as stable but is not stable".into());
        }
        Ok(())
    }

    /// Per-window throughputs, for tests of significance.
    pub fn window_throughputs(&self) -> Vec<f64> {
        self.windows.iter().map(|w| w.images_per_sec).collect()
    }
}

/// max/min - 1 of the throughputs; `None` for none.
pub fn spread(throughputs: &[f64]) -> Option<f64> {
    let min = throughputs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = throughputs
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    (!throughputs.is_empty() && min > 0.0).then(|| max / min - 1.0)
}

/// The timing loop's state: feed it each iteration, it says when to stop.
#[derive(Debug, Clone)]
pub struct Timing {
    spec: MeasurementSpec,
    batch: u32,
    window_ms: f64,
    latencies: Vec<f64>,
    windows: Vec<Window>,
    open_iterations: u32,
    open_ms: f64,
    /// The stability rule (windows and percentile target) held at the last closed window.
    settled: bool,
    target_met: Option<bool>,
}

impl Timing {
    pub fn new(spec: &MeasurementSpec, batch: u32) -> Self {
        Timing {
            spec: spec.clone(),
            batch,
            window_ms: spec.stability_window.as_secs_f64() * 1e3,
            latencies: Vec::with_capacity((spec.min_iterations as usize * 2).min(1 << 20)),
            windows: Vec::new(),
            open_iterations: 0,
            open_ms: 0.0,
            settled: false,
            target_met: spec.percentile_target.map(|_| false),
        }
    }

    /// Records one timed iteration that took `latency_ms`, `elapsed` after timing started;
    /// returns why timing should stop now, if it should.
    pub fn record(&mut self, latency_ms: f64, elapsed: Duration) -> Option<StopReason> {
        self.latencies.push(latency_ms);
        self.open_iterations += 1;
        self.open_ms += latency_ms;
        if self.open_ms >= self.window_ms {
            self.close_window();
        }
        let n = self.latencies.len() as u32;
        let minimums = n >= self.spec.min_iterations && elapsed >= self.spec.min_duration;
        if minimums && self.settled {
            Some(StopReason::Stable)
        } else if n >= self.spec.max_iterations
            // A result carries every sample; past this bound the coordinator would refuse it.
            || self.latencies.len() >= crate::limits::MAX_LATENCY_SAMPLES
        {
            Some(StopReason::MaxIterations)
        } else if elapsed >= self.spec.max_duration {
            Some(StopReason::MaxDuration)
        } else {
            None
        }
    }

    fn close_window(&mut self) {
        let seconds = self.open_ms / 1e3;
        self.windows.push(Window {
            iterations: self.open_iterations,
            seconds,
            images_per_sec: self.batch as f64 * self.open_iterations as f64 / seconds,
        });
        self.open_iterations = 0;
        self.open_ms = 0.0;
        let windows_agree = self.last_spread().is_some_and(|s| s <= self.tolerance());
        // Sorting every sample costs O(n log n), so the percentile target is judged only as a
        // window closes, and only once the windows agree.
        if windows_agree {
            if let Some(t) = self.spec.percentile_target {
                let mut sorted = self.latencies.clone();
                sorted.sort_by(f64::total_cmp);
                let met = quantile::estimate(&sorted, t.percentile)
                    .is_some_and(|e| e.relative_half_width() <= t.within.0);
                self.target_met = Some(met);
            }
        }
        self.settled = windows_agree && self.target_met != Some(false);
    }

    fn tolerance(&self) -> f64 {
        self.spec.stability_tolerance.0
    }

    fn last_spread(&self) -> Option<f64> {
        let k = self.spec.stability_windows as usize;
        let n = self.windows.len();
        if n < k {
            return None;
        }
        let recent: Vec<f64> = self.windows[n - k..]
            .iter()
            .map(|w| w.images_per_sec)
            .collect();
        spread(&recent)
    }

    pub fn iterations(&self) -> u32 {
        self.latencies.len() as u32
    }

    pub fn windows(&self) -> &[Window] {
        &self.windows
    }

    /// The raw latencies and the stability record, once timing has stopped for `reason`.
    pub fn finish(self, reason: StopReason) -> (Vec<f64>, StabilityReport) {
        let spread = self.last_spread();
        let report = StabilityReport {
            stable: spread.is_some_and(|s| s <= self.tolerance()),
            stop_reason: reason,
            spread,
            windows: self.windows,
            required_windows: self.spec.stability_windows,
            window_seconds: self.spec.stability_window.as_secs_f64(),
            tolerance: self.spec.stability_tolerance.0,
            percentile_target_met: self.target_met,
        };
        (self.latencies, report)
    }
}

/// Replays a latency series as if its iterations ran back to back (elapsed time = the running
/// sum of latencies), stopping where the rule would. `None` when the series ends first.
pub fn replay(
    spec: &MeasurementSpec,
    batch: u32,
    series: &[f64],
) -> Option<(Vec<f64>, StabilityReport)> {
    let mut timing = Timing::new(spec, batch);
    let mut elapsed_ms = 0.0;
    for &x in series {
        elapsed_ms += x;
        if let Some(reason) = timing.record(x, Duration::from_secs_f64(elapsed_ms / 1e3)) {
            return Some(timing.finish(reason));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        job::{Fraction, PercentileTarget},
        testseries::{bimodal, drifting, steady},
        Percentile,
    };

    /// Windows of 100 ms, 3 within 5%, minimums of 20 iterations and 200 ms, at most 10 s.
    fn spec() -> MeasurementSpec {
        MeasurementSpec {
            min_iterations: 20,
            min_duration: Duration::from_millis(200),
            max_duration: Duration::from_secs(10),
            stability_window: Duration::from_millis(100),
            ..Default::default()
        }
    }

    #[test]
    fn an_absurd_tolerance_makes_a_short_error() {
        let report = StabilityReport {
            stable: true,
            stop_reason: StopReason::Stable,
            spread: None,
            windows: Vec::new(),
            required_windows: 3,
            window_seconds: 1.0,
            tolerance: 1e300,
            percentile_target_met: None,
        };
        let e = report.validate().unwrap_err();
        assert!(e.len() < 200 && e.contains("1.000e300"), "{e}");
    }

    #[test]
    fn a_steady_series_stops_as_soon_as_three_windows_agree() {
        // 10 ms ± 1%: each 100 ms window is 10 or 11 iterations; timing stops as the third
        // window closes.
        let series = steady(5000, 10.0, 0.01, 1);
        let (lat, r) = replay(&spec(), 4, &series).expect("stops");
        assert_eq!(r.stop_reason, StopReason::Stable);
        assert!(r.stable);
        assert_eq!(r.windows.len(), 3);
        let in_windows: u32 = r.windows.iter().map(|w| w.iterations).sum();
        assert_eq!(lat.len(), in_windows as usize, "{r:?}");
        let s = r.spread.unwrap();
        assert!(s < 0.01, "{s}");
        for w in &r.windows {
            assert!((10..=11).contains(&w.iterations), "{w:?}");
            assert!(w.seconds >= 0.1, "{w:?}");
            assert!((w.images_per_sec - 400.0).abs() < 4.0, "{w:?}");
        }
    }

    #[test]
    fn a_drifting_series_runs_to_max_duration_and_is_marked_unstable() {
        // Each iteration 5% slower than the last: even one-iteration windows differ by over 5%
        // three in a row, so windows never agree.
        let series = drifting(10_000, 10.0, 0.05, 2);
        let (lat, r) = replay(&spec(), 1, &series).expect("stops");
        assert_eq!(r.stop_reason, StopReason::MaxDuration);
        assert!(!r.stable);
        assert!(r.spread.unwrap() > 0.05, "{:?}", r.spread);
        let timed: f64 = lat.iter().sum();
        assert!(timed >= 10_000.0, "ran to max_duration: {timed} ms");
        // A slow drift (0.01% per iteration) is within the tolerance: stable.
        let (_, r) = replay(&spec(), 1, &drifting(10_000, 10.0, 0.0001, 2)).unwrap();
        assert_eq!(r.stop_reason, StopReason::Stable);
    }

    #[test]
    fn a_bimodal_series_that_switches_mode_per_window_is_unstable() {
        // 300 ms at 10 ms, 300 ms at 20 ms, alternating: neighbouring windows differ by 2x.
        let series: Vec<f64> = (0..2000)
            .map(|i| if (i / 15) % 2 == 0 { 10.0 } else { 20.0 })
            .collect();
        let (_, r) = replay(&spec(), 1, &series).expect("stops");
        assert_eq!(r.stop_reason, StopReason::MaxDuration);
        assert!(!r.stable);
        // Mixed per iteration instead, each window averages both modes and windows agree.
        let mixed = bimodal(5000, 10.0, 20.0, 0.5, 3);
        let loose = MeasurementSpec {
            stability_window: Duration::from_secs(1),
            ..spec()
        };
        let (_, r) = replay(&loose, 1, &mixed).expect("stops");
        assert_eq!(r.stop_reason, StopReason::Stable, "{r:?}");
    }

    #[test]
    fn a_short_series_stops_at_max_iterations_with_too_few_windows() {
        let spec = MeasurementSpec {
            min_iterations: 5,
            max_iterations: 5,
            ..spec()
        };
        let series = steady(100, 10.0, 0.01, 4);
        let (lat, r) = replay(&spec, 1, &series).expect("stops");
        assert_eq!(lat.len(), 5);
        assert_eq!(r.stop_reason, StopReason::MaxIterations);
        assert!(!r.stable);
        assert_eq!(r.spread, None, "no three windows closed");
        assert!(r.windows.is_empty());
    }

    #[test]
    fn the_minimums_still_hold_when_windows_agree_early() {
        let spec = MeasurementSpec {
            min_iterations: 200,
            ..spec()
        };
        let (lat, r) = replay(&spec, 1, &steady(5000, 10.0, 0.01, 5)).unwrap();
        assert_eq!(r.stop_reason, StopReason::Stable);
        assert_eq!(lat.len(), 200);
    }

    #[test]
    fn a_wider_tolerance_accepts_what_a_narrow_one_refuses() {
        // 10 ms ± 20% per iteration, 100 ms windows: windows differ by several percent.
        let noisy = steady(20_000, 10.0, 0.2, 6);
        let tight = MeasurementSpec {
            stability_tolerance: Fraction(0.001),
            ..spec()
        };
        let (_, r) = replay(&tight, 1, &noisy).unwrap();
        assert_eq!(r.stop_reason, StopReason::MaxDuration);
        let wide = MeasurementSpec {
            stability_tolerance: Fraction(0.5),
            ..spec()
        };
        let (lat, r) = replay(&wide, 1, &noisy).unwrap();
        assert_eq!(r.stop_reason, StopReason::Stable);
        assert_eq!(r.windows.len(), 3, "stopped as the third window closed");
        assert!(lat.len() < 40, "{}", lat.len());
    }

    #[test]
    fn a_percentile_target_keeps_timing_until_the_interval_is_tight() {
        let series = steady(100_000, 10.0, 0.2, 7);
        let spec = MeasurementSpec {
            percentile_target: Some(PercentileTarget {
                percentile: Percentile::P99,
                within: Fraction(0.01),
            }),
            ..spec()
        };
        let (lat, r) = replay(&spec, 1, &series).unwrap();
        assert_eq!(r.stop_reason, StopReason::Stable);
        assert_eq!(r.percentile_target_met, Some(true));
        assert!(lat.len() >= Percentile::P99.min_samples(), "{}", lat.len());
        let mut sorted = lat.clone();
        sorted.sort_by(f64::total_cmp);
        let p99 = quantile::estimate(&sorted, Percentile::P99).unwrap();
        assert!(p99.relative_half_width() <= 0.01, "{p99:?}");

        // A bimodal tail never gets a tight p50 interval: timing runs to the limit and says so.
        let spec = MeasurementSpec {
            percentile_target: Some(PercentileTarget {
                percentile: Percentile::P50,
                within: Fraction(0.01),
            }),
            stability_window: Duration::from_secs(1),
            stability_tolerance: Fraction(0.5),
            ..spec
        };
        let (_, r) = replay(&spec, 1, &bimodal(5000, 10.0, 20.0, 0.5, 8)).unwrap();
        assert_eq!(r.stop_reason, StopReason::MaxDuration);
        assert_eq!(r.percentile_target_met, Some(false));
        assert!(
            r.stable,
            "the windows agreed; only the percentile was not tight"
        );
    }

    #[test]
    fn spread_is_max_over_min() {
        assert_eq!(spread(&[]), None);
        assert!((spread(&[100.0, 105.0, 102.0]).unwrap() - 0.05).abs() < 1e-12);
    }
}
