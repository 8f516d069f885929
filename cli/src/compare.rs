//! `fleetmark compare`: the same model, precision and batch size across hardware, side by side,
//! with a speed-up against a baseline and images per dollar where prices are known.
//!
//! Several results for one cell (repetitions, several agents of one kind) are summarised by the
//! median throughput, and the count is shown. Simulated results never appear here.

use std::{collections::BTreeMap, process::ExitCode};

use chrono::{DateTime, Utc};
use clap::Args;
use fleetmark_core::BenchResult;
use fleetmark_proto::{convert::timestamp, v1 as pb};
use serde::Serialize;

use crate::{
    emit,
    output::{csv, fitted_table, thousands, throughput},
    CliError, Format, Remote, View,
};

#[derive(Debug, Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub filters: Filters,
    /// The hardware column the speed-up is measured against (a kind such as cpu or t4, or a
    /// column name such as h100/stock). Defaults to cpu when present, else the first column.
    #[arg(long)]
    pub baseline: Option<String>,
    #[command(flatten)]
    pub view: View,
}

/// Which results a comparison (or a plot) takes. Simulated results never count.
#[derive(Debug, Clone, Args)]
pub struct Filters {
    /// The model whose results are compared.
    #[arg(long, default_value = "resnet18")]
    pub model: String,
    /// Only these precisions (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub precision: Vec<String>,
    /// Only these batch sizes (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub batch: Vec<u32>,
    /// Only this input size.
    #[arg(long)]
    pub image_size: Option<u32>,
    /// Only this sweep's results: a full id, a unique prefix, or `latest`.
    #[arg(long)]
    pub sweep: Option<String>,
    /// Only results from the agent with this name.
    #[arg(long)]
    pub agent: Option<String>,
    /// Only results whose agent carried this label, as key=value (repeat for several).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Only results finished at or after this time: RFC 3339 (2026-12-01T00:00:00Z) or a
    /// duration ago (24h, 7days).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<DateTime<Utc>>,
    /// Only results finished before this time (same forms as --since).
    #[arg(long, value_parser = parse_time)]
    pub until: Option<DateTime<Utc>>,
}

/// An RFC 3339 time, or a duration meaning that long ago.
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s.trim()) {
        return Ok(t.with_timezone(&Utc));
    }
    let d = humantime::parse_duration(s.trim()).map_err(|_| {
        format!("'{s}' is neither an RFC 3339 time (2026-12-01T00:00:00Z) nor a duration ago (24h)")
    })?;
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| Utc::now().checked_sub_signed(d))
        .ok_or_else(|| format!("'{s}' reaches too far back"))
}

impl Filters {
    /// The results these filters select: the coordinator narrows by sweep, model, agent,
    /// labels and time; precision, batch and input size are narrowed here.
    pub async fn fetch(&self, remote: &mut Remote) -> Result<Vec<BenchResult>, CliError> {
        let precisions = self
            .precision
            .iter()
            .map(|p| {
                p.parse::<fleetmark_core::Precision>()
                    .map(|p| p.to_string())
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CliError::Input(e.to_string()))?;
        for l in &self.labels {
            if !l.contains('=') || l.starts_with('=') {
                return Err(CliError::Input(format!("--label '{l}' is not key=value")));
            }
        }
        if let (Some(a), Some(b)) = (self.since, self.until) {
            if a >= b {
                return Err(CliError::Input("--since must be before --until".into()));
            }
        }
        let sweep_id = match &self.sweep {
            Some(s) => crate::sweeps::resolve(remote, s).await?,
            None => String::new(),
        };
        let results = crate::fetch_results(
            remote,
            pb::ListResultsRequest {
                sweep_id,
                model: self.model.clone(),
                omit_latencies: true,
                agent_name: self.agent.clone().unwrap_or_default(),
                labels: self.labels.clone(),
                since: self.since.map(timestamp),
                until: self.until.map(timestamp),
                ..Default::default()
            },
        )
        .await?;
        Ok(results
            .into_iter()
            .map(|(_, _, r)| r)
            .filter(|r| !r.backend.simulated)
            .filter(|r| precisions.is_empty() || precisions.contains(&r.spec.precision.to_string()))
            .filter(|r| self.batch.is_empty() || self.batch.contains(&r.spec.batch_size))
            .filter(|r| self.image_size.is_none_or(|s| s == r.spec.image_size))
            .collect())
    }
}

/// The 95% confidence interval of a cell's throughput: across its results when there are
/// several (Student's t), else from the one result's latency interval.
fn throughput_ci(rs: &[&BenchResult]) -> Option<(f64, f64)> {
    match rs {
        [] => None,
        [r] => {
            let (lo, hi) = (r.latency.ci95_low_ms, r.latency.ci95_high_ms);
            let b = r.spec.batch_size as f64 * 1000.0;
            (lo > 0.0 && hi > 0.0).then(|| (b / hi, b / lo))
        }
        many => {
            let ips: Vec<f64> = many.iter().map(|r| r.images_per_sec).collect();
            fleetmark_core::LatencyStats::from_samples(&ips)
                .map(|s| (s.ci95_low_ms, s.ci95_high_ms))
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub images_per_sec: f64,
    /// 95% confidence interval of the throughput, (low, high).
    pub images_per_sec_ci95: Option<(f64, f64)>,
    pub p50_ms: f64,
    pub results: usize,
    pub math: String,
    pub peak_memory_bytes: u64,
    pub speedup: Option<f64>,
    pub images_per_dollar: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub model: String,
    pub precision: String,
    pub batch_size: u32,
    pub image_size: u32,
    pub hardware: BTreeMap<String, Cell>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Groups results into comparison rows, with columns named by hardware kind, or kind/path when
/// one kind was measured on more than one path.
pub fn build(
    results: &[BenchResult],
    baseline: Option<&str>,
) -> Result<(Vec<String>, Vec<Row>), CliError> {
    let mut paths: BTreeMap<&str, std::collections::BTreeSet<&str>> = BTreeMap::new();
    for r in results {
        paths
            .entry(r.hardware_kind.as_str())
            .or_default()
            .insert(r.backend.path.as_str());
    }
    let column = |r: &BenchResult| {
        if paths[r.hardware_kind.as_str()].len() > 1 {
            format!("{}/{}", r.hardware_kind, r.backend.path)
        } else {
            r.hardware_kind.clone()
        }
    };
    type Key = (String, String, u32, u32);
    let mut groups: BTreeMap<Key, BTreeMap<String, Vec<&BenchResult>>> = BTreeMap::new();
    for r in results {
        let key = (
            r.spec.model.clone(),
            r.spec.precision.to_string(),
            r.spec.batch_size,
            r.spec.image_size,
        );
        groups
            .entry(key)
            .or_default()
            .entry(column(r))
            .or_default()
            .push(r);
    }
    let mut columns: Vec<String> = groups
        .values()
        .flat_map(|g| g.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let base = match baseline {
        Some(b) => {
            let b = b.to_ascii_lowercase();
            if !columns.contains(&b) {
                return Err(CliError::Input(format!(
                    "baseline '{b}' has no results here; columns are: {}",
                    columns.join(", ")
                )));
            }
            Some(b)
        }
        None if columns.iter().any(|c| c == "cpu") => Some("cpu".to_string()),
        None => columns.first().cloned(),
    };
    // Baseline first, then the rest in name order.
    if let Some(b) = &base {
        columns.retain(|c| c != b);
        columns.insert(0, b.clone());
    }
    let rows = groups
        .into_iter()
        .map(|((model, precision, batch_size, image_size), cells)| {
            let mut hardware: BTreeMap<String, Cell> = cells
                .into_iter()
                .map(|(col, rs)| {
                    let ips = median(rs.iter().map(|r| r.images_per_sec).collect());
                    let priced: Vec<f64> = rs.iter().filter_map(|r| r.price_per_hour).collect();
                    let images_per_dollar = if priced.is_empty() {
                        None
                    } else {
                        let price = median(priced);
                        (price > 0.0).then(|| ips * 3600.0 / price)
                    };
                    let mut maths: Vec<&str> = rs.iter().map(|r| r.backend.math.as_str()).collect();
                    maths.sort_unstable();
                    maths.dedup();
                    (
                        col,
                        Cell {
                            images_per_sec: ips,
                            images_per_sec_ci95: throughput_ci(&rs),
                            p50_ms: median(rs.iter().map(|r| r.latency.p50_ms).collect()),
                            results: rs.len(),
                            math: maths.join("+"),
                            peak_memory_bytes: rs
                                .iter()
                                .map(|r| r.peak_memory_bytes)
                                .max()
                                .unwrap_or(0),
                            speedup: None,
                            images_per_dollar,
                        },
                    )
                })
                .collect();
            if let Some(b) = &base {
                if let Some(base_ips) = hardware.get(b).map(|c| c.images_per_sec) {
                    for c in hardware.values_mut() {
                        c.speedup = Some(c.images_per_sec / base_ips);
                    }
                }
            }
            Row {
                model,
                precision,
                batch_size,
                image_size,
                hardware,
            }
        })
        .collect();
    Ok((columns, rows))
}

pub fn render(columns: &[String], rows: &[Row], view: View) -> String {
    let format = view.format;
    if format == Format::Json {
        return format!("{}\n", serde_json::to_string_pretty(rows).expect("json"));
    }
    let mut header: Vec<String> = vec![
        "model".into(),
        "precision".into(),
        "batch".into(),
        "size".into(),
    ];
    for c in columns {
        header.push(format!("{c} img/s"));
        header.push(format!("{c} ×"));
        if view.wide || format != Format::Table {
            header.push(format!("{c} img/$"));
        }
    }
    let plain = format == Format::Csv;
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut row = vec![
                r.model.clone(),
                r.precision.clone(),
                r.batch_size.to_string(),
                r.image_size.to_string(),
            ];
            for c in columns {
                match r.hardware.get(c) {
                    Some(cell) => {
                        let math = if cell.math != r.precision && !plain {
                            format!(" ({})", cell.math)
                        } else {
                            String::new()
                        };
                        let n = if cell.results > 1 && !plain {
                            format!(" n={}", cell.results)
                        } else {
                            String::new()
                        };
                        let ci = match cell.images_per_sec_ci95 {
                            Some((lo, hi)) if !plain => {
                                format!(" ±{}", throughput((hi - lo) / 2.0))
                            }
                            _ => String::new(),
                        };
                        row.push(if plain {
                            format!("{:.1}", cell.images_per_sec)
                        } else {
                            format!("{}{ci}{math}{n}", throughput(cell.images_per_sec))
                        });
                        row.push(cell.speedup.map(|s| format!("{s:.2}")).unwrap_or_default());
                        if !view.wide && format == Format::Table {
                            continue;
                        }
                        row.push(
                            cell.images_per_dollar
                                .map(|v| {
                                    if plain {
                                        format!("{v:.0}")
                                    } else {
                                        thousands(v)
                                    }
                                })
                                .unwrap_or_else(|| if plain { String::new() } else { "-".into() }),
                        );
                    }
                    None if !view.wide && format == Format::Table => {
                        row.extend([String::new(), String::new()])
                    }
                    None => row.extend([String::new(), String::new(), String::new()]),
                }
            }
            row
        })
        .collect();
    let header_refs: Vec<&str> = header.iter().map(String::as_str).collect();
    match format {
        Format::Csv => csv(&header_refs, body),
        _ => fitted_table(&header_refs, body, 2, view.wide),
    }
}

pub async fn run(remote: &mut Remote, args: CompareArgs) -> Result<ExitCode, CliError> {
    let results = args.filters.fetch(remote).await?;
    if results.is_empty() {
        crate::note!("no results to compare for model {}", args.filters.model);
        if args.view.format == Format::Json {
            emit("[]\n")?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (columns, rows) = build(&results, args.baseline.as_deref())?;
    emit(&render(&columns, &rows, args.view))?;
    if args.view.format == Format::Table {
        emit("img/s: median of the cell's results ± half its 95% confidence interval\n")?;
    }
    Ok(ExitCode::SUCCESS)
}
