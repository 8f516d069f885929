//! `fleetmark history`: how one point (hardware kind, model, precision, batch, engine path)
//! moved over time, across Fleetmark commits and driver, CUDA and cuDNN versions.
//!
//! The results of the point come from `ListResults` filtered to that point (the coordinator
//! lists them oldest first, from an index, a page at a time). Consecutive results produced
//! with the same software (Fleetmark commit and version, driver, CUDA, cuDNN) form one
//! *record*: its throughput is the mean of its results with a 95% interval (Student's t across
//! results, or the one result's own interval). A record whose interval does not overlap the
//! previous record's is a change larger than the combined intervals: it is flagged as a
//! regression or an improvement, and that record is the first where it appeared.

use std::process::ExitCode;

use chrono::{DateTime, Utc};
use clap::Args;
use fleetmark_core::{BenchResult, GpuInfo};
use fleetmark_proto::v1 as pb;
use serde::Serialize;

use crate::{
    emit, fetch_results,
    output::{csv, fitted_table, throughput},
    CliError, Format, Remote, View,
};

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The hardware kind (h100, t4, cpu).
    #[arg(long)]
    pub gpu: String,
    /// The precision (f32, f16, bf16).
    #[arg(long)]
    pub precision: String,
    /// The batch size.
    #[arg(long)]
    pub batch: u32,
    /// The model.
    #[arg(long, default_value = "resnet18")]
    pub model: String,
    /// Only this input size.
    #[arg(long)]
    pub image_size: Option<u32>,
    /// Only this engine path (fused, stock); all paths otherwise, each its own history.
    #[arg(long)]
    pub path: Option<String>,
    /// Only this node: a GPU UUID, or host/device for CPUs (as `compare --by-node` names it).
    #[arg(long)]
    pub node: Option<String>,
    #[command(flatten)]
    pub view: View,
}

/// What a result was produced with: a change of any of these starts a new record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Software {
    pub path: String,
    pub image_size: u32,
    pub fleetmark_version: String,
    pub git_commit: String,
    pub driver_version: String,
    pub cuda_driver_version: String,
    pub cudnn_version: String,
}

/// The inventory entry of the GPU a result ran on (`cuda:N`), if any.
fn gpu_of(r: &BenchResult) -> Option<&GpuInfo> {
    let index: u32 = r.device.strip_prefix("cuda:")?.parse().ok()?;
    r.host.gpus.iter().find(|g| g.index == index)
}

/// The node a result ran on, named as the coordinator's `compare --by-node` names it: the GPU's
/// UUID, else host/device, else agent/device.
pub fn node_of(r: &BenchResult) -> String {
    let gpu = gpu_of(r).map(|g| g.uuid.clone()).filter(|u| !u.is_empty());
    gpu.unwrap_or_else(|| {
        if r.host.hostname.is_empty() {
            format!("{}/{}", r.agent_name, r.device)
        } else {
            format!("{}/{}", r.host.hostname, r.device)
        }
    })
}

impl Software {
    fn of(r: &BenchResult) -> Self {
        let driver = gpu_of(r)
            .map(|g| g.driver_version.clone())
            .unwrap_or_default();
        Software {
            path: r.backend.path.clone(),
            image_size: r.spec.image_size,
            fleetmark_version: r.environment.fleetmark_version.clone(),
            git_commit: r.environment.git_commit.clone(),
            driver_version: driver,
            cuda_driver_version: r.environment.cuda_driver_version.clone(),
            cudnn_version: r.environment.cudnn_version.clone(),
        }
    }
}

/// A change from the previous record larger than both intervals together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Regression,
    Improvement,
}

/// Consecutive results of one point made with the same software.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub software: Software,
    pub first: DateTime<Utc>,
    pub last: DateTime<Utc>,
    pub results: usize,
    pub images_per_sec: f64,
    pub ci95: Option<(f64, f64)>,
    /// Against the previous record of the same path and size.
    pub change: Option<Change>,
    /// images_per_sec / the previous record's - 1.
    pub vs_previous: Option<f64>,
}

/// The record of a run of results: mean throughput and its interval.
fn record(software: Software, rs: &[&BenchResult]) -> Record {
    let mean = rs.iter().map(|r| r.images_per_sec).sum::<f64>() / rs.len() as f64;
    Record {
        software,
        first: rs[0].finished_at,
        last: rs[rs.len() - 1].finished_at,
        results: rs.len(),
        images_per_sec: mean,
        ci95: crate::compare::throughput_ci(rs),
        change: None,
        vs_previous: None,
    }
}

/// Records of `results` (one point; any order), oldest first, with changes flagged. Each path
/// and input size is its own history: a change between them is not a regression.
pub fn records(results: &[BenchResult]) -> Vec<Record> {
    let mut sorted: Vec<&BenchResult> = results.iter().collect();
    sorted.sort_by_key(|r| r.finished_at);
    let mut out: Vec<Record> = Vec::new();
    let mut run: Vec<&BenchResult> = Vec::new();
    let mut key: Option<Software> = None;
    for r in sorted {
        let k = Software::of(r);
        if key.as_ref().is_some_and(|key| *key != k) {
            out.push(record(key.take().expect("key"), &run));
            run.clear();
        }
        key = Some(k);
        run.push(r);
    }
    if let Some(k) = key {
        out.push(record(k, &run));
    }
    for i in 0..out.len() {
        let prev = (0..i).rev().find(|&j| {
            out[j].software.path == out[i].software.path
                && out[j].software.image_size == out[i].software.image_size
        });
        let Some(j) = prev else { continue };
        let (now, before) = (&out[i], &out[j]);
        let vs =
            (before.images_per_sec > 0.0).then(|| now.images_per_sec / before.images_per_sec - 1.0);
        let change = match (now.ci95, before.ci95) {
            (Some((lo, _)), Some((_, hi_before))) if lo > hi_before => Some(Change::Improvement),
            (Some((_, hi)), Some((lo_before, _))) if hi < lo_before => Some(Change::Regression),
            _ => None,
        };
        out[i].vs_previous = vs;
        out[i].change = change;
    }
    out
}

fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

pub fn render(records: &[Record], view: View) -> String {
    if view.format == Format::Json {
        return format!("{}\n", serde_json::to_string_pretty(records).expect("json"));
    }
    let plain = view.format == Format::Csv;
    let header = [
        "since",
        "path",
        "commit",
        "driver",
        "cuda",
        "cudnn",
        "n",
        "img/s (95% CI)",
        "change",
    ];
    let rows = records
        .iter()
        .map(|r| {
            let s = &r.software;
            let ips = match (plain, r.ci95) {
                (true, _) => format!("{:.1}", r.images_per_sec),
                (false, Some((lo, hi))) => format!(
                    "{} ± {}",
                    throughput(r.images_per_sec),
                    throughput((hi - lo) / 2.0)
                ),
                (false, None) => throughput(r.images_per_sec),
            };
            let change = match (r.change, r.vs_previous) {
                (Some(Change::Regression), Some(v)) => format!("regression {:+.1}%", v * 100.0),
                (Some(Change::Improvement), Some(v)) => format!("improvement {:+.1}%", v * 100.0),
                (None, Some(v)) if !plain => format!("{:+.1}% (within CI)", v * 100.0),
                (None, Some(v)) => format!("{v:.4}"),
                _ => String::new(),
            };
            vec![
                if plain {
                    r.first.to_rfc3339()
                } else {
                    r.first.format("%Y-%m-%d %H:%M").to_string()
                },
                s.path.clone(),
                if plain {
                    s.git_commit.clone()
                } else {
                    format!("{} {}", s.fleetmark_version, short(&s.git_commit))
                },
                s.driver_version.clone(),
                s.cuda_driver_version.clone(),
                s.cudnn_version.clone(),
                r.results.to_string(),
                ips,
                change,
            ]
        })
        .collect();
    if plain {
        return csv(&header, rows);
    }
    let mut out = fitted_table(&header, rows, 6, view.wide);
    out.push_str(
        "change: against the previous record of the same path; flagged when the 95% intervals \
         do not overlap\n",
    );
    out
}

pub async fn run(remote: &mut Remote, args: HistoryArgs) -> Result<ExitCode, CliError> {
    let precision = args
        .precision
        .parse::<fleetmark_core::Precision>()
        .map_err(|e| CliError::Input(e.to_string()))?;
    if args.batch == 0 {
        return Err(CliError::Input("--batch must be at least 1".into()));
    }
    let results = fetch_results(
        remote,
        pb::ListResultsRequest {
            model: args.model.clone(),
            precision: precision.to_string(),
            batch_size: args.batch,
            hardware_kind: args.gpu.to_ascii_lowercase(),
            omit_latencies: true,
            ..Default::default()
        },
    )
    .await?;
    let results: Vec<BenchResult> = results
        .into_iter()
        .map(|l| l.result)
        .filter(|r| args.image_size.is_none_or(|s| r.spec.image_size == s))
        .filter(|r| args.path.as_ref().is_none_or(|p| r.backend.path == *p))
        .filter(|r| args.node.as_ref().is_none_or(|n| node_of(r) == *n))
        .collect();
    if results.is_empty() {
        crate::note!(
            "no results for {} {} batch {} on {}",
            args.model,
            precision,
            args.batch,
            args.gpu
        );
        if args.view.format == Format::Json {
            emit("[]\n")?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    emit(&render(&records(&results), args.view))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use fleetmark_core::{BackendInfo, Fingerprint, JobSpec, LatencyStats, SweepSpec};

    use super::*;

    /// A result of batch 8 at `ms` per batch (± 1%), made with `commit`, `minutes` after noon.
    fn result(commit: &str, ms: f64, minutes: i64) -> BenchResult {
        let spec: JobSpec = SweepSpec::from_toml("batch_sizes = [8]\nprecisions = [\"f16\"]\n")
            .expect("spec")
            .expand()
            .expect("jobs")
            .remove(0);
        let latencies: Vec<f64> = (0..200).map(|i| ms * (0.99 + 0.0001 * i as f64)).collect();
        let latency = LatencyStats::from_samples(&latencies).expect("stats");
        let at = DateTime::parse_from_rfc3339("2026-12-01T12:00:00Z")
            .expect("time")
            .with_timezone(&Utc)
            + chrono::Duration::minutes(minutes);
        BenchResult {
            schema: fleetmark_core::RESULT_SCHEMA_VERSION,
            job_id: None,
            attempt: 1,
            agent_name: "node-1".into(),
            agent_labels: Default::default(),
            price_per_hour: None,
            hardware_kind: "h100".into(),
            hardware_name: "NVIDIA H100".into(),
            device: "cuda:0".into(),
            images_per_sec: latency.images_per_sec(8),
            spec,
            backend: BackendInfo {
                backend: "candle-cuda".into(),
                path: "fused".into(),
                math: "f16".into(),
                details: Default::default(),
                simulated: false,
            },
            weights: Default::default(),
            latency,
            input_copy: None,
            peak_memory_bytes: 0,
            memory_scope: "device".into(),
            warmup_iterations: 10,
            timed_seconds: 1.0,
            telemetry: None,
            correctness: None,
            environment: Fingerprint {
                fleetmark_version: "0.1.0".into(),
                git_commit: commit.into(),
                cudnn_version: "9.19.0".into(),
                ..Default::default()
            },
            host: Default::default(),
            started_at: at,
            finished_at: at,
            latencies_ms: latencies,
            stability: None,
        }
    }

    #[test]
    fn a_slower_commit_is_a_regression_named_at_its_first_record() {
        let rs = vec![
            result("aaaa", 2.00, 0),
            result("aaaa", 2.01, 1),
            result("aaaa", 1.99, 2),
            // 0.5% slower: inside the intervals.
            result("bbbb", 2.01, 10),
            result("bbbb", 2.02, 11),
            // 20% slower: a regression, first seen at commit cccc.
            result("cccc", 2.40, 20),
            result("cccc", 2.41, 21),
            // Back: an improvement.
            result("dddd", 2.00, 30),
        ];
        let recs = records(&rs);
        let commits: Vec<&str> = recs
            .iter()
            .map(|r| r.software.git_commit.as_str())
            .collect();
        assert_eq!(commits, ["aaaa", "bbbb", "cccc", "dddd"]);
        assert_eq!(recs[0].results, 3);
        assert_eq!(recs[0].change, None);
        assert_eq!(recs[1].change, None, "{:?}", recs[1]);
        assert_eq!(recs[2].change, Some(Change::Regression), "{:?}", recs[2]);
        assert!(recs[2].vs_previous.unwrap() < -0.15);
        assert_eq!(recs[3].change, Some(Change::Improvement));
        let table = render(
            &recs,
            View {
                format: Format::Table,
                wide: true,
            },
        );
        assert!(table.contains("regression"), "{table}");
        assert!(table.contains("(within CI)"), "{table}");
    }

    #[test]
    fn the_same_software_again_later_is_one_record_only_when_consecutive() {
        let rs = vec![
            result("aaaa", 2.0, 0),
            result("bbbb", 2.0, 5),
            result("aaaa", 2.0, 10),
        ];
        assert_eq!(records(&rs).len(), 3);
        // Order of arrival does not matter: records follow finish time.
        let mut shuffled = rs.clone();
        shuffled.reverse();
        let recs = records(&shuffled);
        assert_eq!(recs[0].first, rs[0].finished_at);
    }
}
