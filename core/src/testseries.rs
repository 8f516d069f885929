//! Synthetic latency series for the statistics tests: steady, drifting, bimodal. Deterministic
//! (a fixed-seed generator), so a failing test fails the same way every time.

/// Knuth's MMIX linear congruential generator: enough randomness for test series.
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Self {
        Lcg(seed
            .wrapping_mul(2862933555777941757)
            .wrapping_add(3037000493))
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `n` latencies around `mean_ms`, each off by up to ±`jitter` (relative).
pub fn steady(n: usize, mean_ms: f64, jitter: f64, seed: u64) -> Vec<f64> {
    let mut rng = Lcg::new(seed);
    (0..n)
        .map(|_| mean_ms * (1.0 + jitter * (2.0 * rng.next_f64() - 1.0)))
        .collect()
}

/// Latencies that grow by `growth` (relative) every iteration from `start_ms`, with 1% jitter:
/// a card heating up, a clock stepping down.
pub fn drifting(n: usize, start_ms: f64, growth: f64, seed: u64) -> Vec<f64> {
    steady(n, 1.0, 0.01, seed)
        .into_iter()
        .enumerate()
        .map(|(i, x)| x * start_ms * (1.0 + growth).powi(i as i32))
        .collect()
}

/// Each latency is `fast_ms` or, with probability `p_slow`, `slow_ms` (1% jitter on both).
pub fn bimodal(n: usize, fast_ms: f64, slow_ms: f64, p_slow: f64, seed: u64) -> Vec<f64> {
    let mut rng = Lcg::new(seed);
    (0..n)
        .map(|_| {
            let base = if rng.next_f64() < p_slow {
                slow_ms
            } else {
                fast_ms
            };
            base * (1.0 + 0.01 * (2.0 * rng.next_f64() - 1.0))
        })
        .collect()
}
