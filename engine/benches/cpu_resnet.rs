//! CPU ResNet18 throughput at batch 1 and 8, through the same measurement loop agents use.
//!
//!     cargo bench -p fleetmark-engine --bench cpu_resnet
//!
//! Prints a table (and JSON lines with `--json`). Numbers from this harness go into
//! docs/benchmarks.md with the machine and date. Both paths (stock: batch norm kept; fused:
//! folded) run back to back in one process, so their ratio is meaningful on a noisy machine.

use std::{sync::atomic::AtomicBool, time::Duration};

use fleetmark_core::{EnginePath, JobSpec, MeasurementSpec, Precision};
use fleetmark_engine::{
    cpu::CpuBackend,
    measure::{run_job, AgentIdentity, JobContext},
    ModelWeights,
};

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let min_duration = std::env::var("FLEETMARK_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(10.0);
    let weights = ModelWeights::seeded(0).expect("weights");
    let host = fleetmark_core::HostInventory::collect_host();
    eprintln!(
        "cpu: {} ({} logical cores), candle {}, {} threads",
        host.cpu_model,
        host.logical_cores,
        fleetmark_engine::versions::CANDLE_VERSION,
        candle_core::utils::get_num_threads()
    );
    let mut backend = CpuBackend::new();
    println!(
        "| path | batch | p50 ms | p90 ms | p99 ms | mean ms ± 95% CI | images/s | iterations |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for engine in [EnginePath::Stock, EnginePath::Fused] {
        for batch in [1u32, 8] {
            let job = JobSpec {
                model: "resnet18".into(),
                batch_size: batch,
                precision: Precision::F32,
                image_size: 224,
                target: fleetmark_core::HardwareTarget::Any,
                engine,
                weights: Default::default(),
                measurement: MeasurementSpec {
                    warmup_iterations: 3,
                    warmup_duration: Duration::from_secs(1),
                    min_iterations: 10,
                    min_duration: Duration::from_secs_f64(min_duration),
                    max_duration: Duration::from_secs(600),
                    time_input_copy: false,
                    ..Default::default()
                },
                repetition: 0,
            };
            let r = run_job(
                &mut backend,
                &weights,
                &job,
                &AgentIdentity {
                    name: "bench".into(),
                    host: host.clone(),
                    ..Default::default()
                },
                &JobContext::default(),
                &AtomicBool::new(false),
                &mut |_| {},
            )
            .expect("bench job");
            let l = &r.latency;
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} ± {:.1} | {:.2} | {} |",
                r.backend.path,
                batch,
                l.p50_ms,
                l.p90_ms,
                l.p99_ms,
                l.mean_ms,
                (l.ci95_high_ms - l.ci95_low_ms) / 2.0,
                r.images_per_sec,
                l.count
            );
            if json {
                eprintln!("{}", serde_json::to_string(&r).expect("json"));
            }
        }
    }
}
