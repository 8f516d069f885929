//! What flagging every device of one GPU kind costs, the way `reflag_kind` (under the kind's
//! lock, at every registration) and `ListAgents` do it: the kind's medians recomputed for each
//! device (`health::flags`, what both did before), against computed once (`KindMedians`).
//!
//!     cargo bench -p fleetmark-core --bench health_flags
//!
//! Prints a Markdown table: devices of the kind, and the best of 5 times for each way.

use std::time::{Duration, Instant};

use fleetmark_core::{
    health::{flags, KindMedians},
    DeviceHealth, Precision,
};

fn device(i: usize) -> DeviceHealth {
    DeviceHealth {
        measured_at: chrono::Utc::now(),
        gemm_tflops: [
            (Precision::F32, 50.0 + (i % 7) as f64),
            (Precision::F16, 700.0 - (i % 13) as f64),
            (Precision::Bf16, 690.0),
        ]
        .into(),
        gemm_n: 8192,
        memory_gbps: 3000.0 + (i % 5) as f64,
        host_to_device_gbps: Some(20.0),
        pcie_link_gen: Some(5),
        pcie_link_width: Some(16),
        sm_clock_under_load_mhz: Some(1980),
        power_limit_watts: Some(700.0),
        ecc_enabled: Some(true),
        seconds: 3.0,
    }
}

fn best_of_5(mut f: impl FnMut() -> usize) -> Duration {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed()
        })
        .min()
        .expect("five runs")
}

fn main() {
    println!("| devices of the kind | medians per device | medians once |");
    println!("|---:|---:|---:|");
    for n in [10, 100, 1000] {
        let kind: Vec<DeviceHealth> = (0..n).map(device).collect();
        let refs: Vec<&DeviceHealth> = kind.iter().collect();
        let per_device = best_of_5(|| refs.iter().map(|h| flags(h, &refs).len()).sum());
        let once = best_of_5(|| {
            let m = KindMedians::of(&refs);
            refs.iter().map(|h| m.flags(h).len()).sum()
        });
        println!("| {n} | {per_device:.2?} | {once:.2?} |");
    }
}
