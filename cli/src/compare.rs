//! `fleetmark compare`: the same model, precision and batch size across hardware, side by side,
//! with a speed-up against a baseline and images per dollar where prices are known.
//!
//! Several results for one cell (repetitions, several agents of one kind) are summarised by the
//! median throughput, with the count, the spread between them (± half the max-min range, in
//! percent of the mean) and "(unstable)" when any of them was not found stable. Each speed-up
//! carries its 95% interval from Welch's t-test on log per-window throughput, and "n.s." when
//! the difference from the baseline is not significant. Simulated results never appear here.

use std::{collections::BTreeMap, process::ExitCode};

use chrono::{DateTime, Utc};
use clap::Args;
use fleetmark_core::{
    significance::{
        pooled_window_throughputs, ratio_from_intervals, summarize_repetitions, welch_ratio,
    },
    BenchResult, RatioEstimate, RepetitionSummary,
};
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
    /// Instead, show for each hardware kind how its nodes (distinct GPUs by UUID, or hosts)
    /// differ at each point, flagging nodes more than 10% below the kind's median.
    #[arg(long, conflicts_with = "baseline")]
    pub by_node: bool,
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
    /// The comparison cells these filters select, filtered and aggregated by the coordinator's
    /// database (`CompareResults`): the answer is one row per cell, however many results.
    pub async fn cells(&self, remote: &mut Remote) -> Result<Vec<Summary>, CliError> {
        self.cells_split(remote, false).await
    }

    /// [`Filters::cells`], split by node when `by_node` (see [`crate::by_node`]).
    pub async fn cells_split(
        &self,
        remote: &mut Remote,
        by_node: bool,
    ) -> Result<Vec<Summary>, CliError> {
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
        Ok(remote
            .client
            .compare_results(pb::CompareRequest {
                model: self.model.clone(),
                precisions,
                batch_sizes: self.batch.clone(),
                image_size: self.image_size,
                sweep_id,
                agent_name: self.agent.clone().unwrap_or_default(),
                labels: self.labels.clone(),
                since: self.since.map(timestamp),
                until: self.until.map(timestamp),
                by_node,
            })
            .await
            .map_err(|s| remote.err(s))?
            .into_inner()
            .cells
            .into_iter()
            .map(Summary::from)
            .collect())
    }
}

/// How a cell's count of results from flagged devices is labelled.
pub const HEALTH_FLAGGED_NODES: &str = "from flagged nodes";

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
    /// The cell's results aggregated: mean, spread between repetitions, how many were unstable.
    pub repetitions: Option<RepetitionSummary>,
    /// The ratio to the baseline with its 95% interval and significance (Welch's t-test on log
    /// per-window throughput); `None` for the baseline itself or with too few windows.
    pub speedup_ci95: Option<RatioEstimate>,
    /// Results from devices whose health check in force was flagged.
    pub health_flagged: usize,
    /// Per-window throughputs pooled over the cell's results (not serialised).
    #[serde(skip)]
    windows: Vec<f64>,
}

impl Cell {
    /// Some result in the cell was not found stable.
    pub fn unstable(&self) -> bool {
        self.repetitions.is_some_and(|r| r.unstable > 0)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub model: String,
    pub precision: String,
    pub batch_size: u32,
    pub image_size: u32,
    pub hardware: BTreeMap<String, Cell>,
}

/// One cell's summary before columns and speed-ups are known: what the coordinator's
/// `CompareResults` returns, or what [`build`] computes from records.
#[derive(Debug, Clone)]
pub struct Summary {
    pub model: String,
    pub precision: String,
    pub batch_size: u32,
    pub image_size: u32,
    pub hardware_kind: String,
    pub path: String,
    pub results: usize,
    pub images_per_sec: f64,
    pub p50_ms: f64,
    pub math: String,
    pub peak_memory_bytes: u64,
    pub price_per_hour: Option<f64>,
    /// 95% confidence interval of the throughput (see
    /// [`fleetmark_core::stats::throughput_ci95`]).
    pub images_per_sec_ci95: Option<(f64, f64)>,
    /// How the cell's results agree (from the coordinator's aggregate, or from records).
    pub repetitions: Option<RepetitionSummary>,
    /// Per-window throughputs pooled over the cell's results, when computed from records: the
    /// speed-up's interval needs them.
    pub windows: Vec<f64>,
    /// With `--by-node`: the node (GPU UUID, else host/device) and its agents; else empty.
    pub node: String,
    pub agents: String,
    /// Results from devices whose health check in force was flagged (known only to the
    /// coordinator; 0 when computed from records).
    pub health_flagged: usize,
}

impl From<pb::CompareCell> for Summary {
    fn from(c: pb::CompareCell) -> Self {
        Summary {
            model: c.model,
            precision: c.precision,
            batch_size: c.batch_size,
            image_size: c.image_size,
            hardware_kind: c.hardware_kind,
            path: c.path,
            results: c.results as usize,
            images_per_sec: c.images_per_sec,
            p50_ms: c.p50_ms,
            math: c.math,
            peak_memory_bytes: c.peak_memory_bytes,
            price_per_hour: c.price_per_hour,
            images_per_sec_ci95: c.images_per_sec_ci95_low.zip(c.images_per_sec_ci95_high),
            repetitions: (c.results > 0).then(|| RepetitionSummary {
                results: c.results as usize,
                mean_images_per_sec: c.mean_images_per_sec,
                std_images_per_sec: c.std_images_per_sec,
                min_images_per_sec: c.min_images_per_sec,
                max_images_per_sec: c.max_images_per_sec,
                spread: if c.mean_images_per_sec > 0.0 {
                    (c.max_images_per_sec - c.min_images_per_sec) / c.mean_images_per_sec
                } else {
                    0.0
                },
                unstable: c.unstable as usize,
                unknown_stability: c.unknown_stability as usize,
            }),
            // Per-window samples stay in the database; the speed-up's interval is computed
            // where the records themselves are at hand (`compare::build` over records).
            windows: Vec::new(),
            node: c.node,
            agents: c.agents,
            health_flagged: c.health_flagged as usize,
        }
    }
}

/// The median of `f` over a cell's results (never empty).
fn median_of(rs: &[&BenchResult], f: impl Fn(&BenchResult) -> f64) -> f64 {
    let values: Vec<f64> = rs.iter().map(|r| f(r)).collect();
    fleetmark_core::stats::median(&values).unwrap_or(0.0)
}

/// The 95% confidence interval of a cell's throughput, as the coordinator computes it.
pub(crate) fn throughput_ci(rs: &[&BenchResult]) -> Option<(f64, f64)> {
    let ips: Vec<f64> = rs.iter().map(|r| r.images_per_sec).collect();
    let spread = fleetmark_core::LatencyStats::from_samples(&ips)?;
    let first = rs.first()?;
    fleetmark_core::stats::throughput_ci95(
        rs.len() as u64,
        spread.mean_ms,
        spread.std_ms,
        first.spec.batch_size,
        (first.latency.ci95_low_ms, first.latency.ci95_high_ms),
    )
}

/// Summarises records the way the coordinator does in SQL: per (model, precision, batch,
/// image size, kind, path), medians of throughput, p50 and price.
pub fn summarise(results: &[BenchResult]) -> Vec<Summary> {
    type Key = (String, String, u32, u32, String, String);
    let mut groups: BTreeMap<Key, Vec<&BenchResult>> = BTreeMap::new();
    for r in results {
        let key = (
            r.spec.model.clone(),
            r.spec.precision.to_string(),
            r.spec.batch_size,
            r.spec.image_size,
            r.hardware_kind.clone(),
            r.backend.path.clone(),
        );
        groups.entry(key).or_default().push(r);
    }
    groups
        .into_iter()
        .map(
            |((model, precision, batch_size, image_size, kind, path), rs)| {
                let priced: Vec<f64> = rs.iter().filter_map(|r| r.price_per_hour).collect();
                let mut maths: Vec<&str> = rs.iter().map(|r| r.backend.math.as_str()).collect();
                maths.sort_unstable();
                maths.dedup();
                Summary {
                    model,
                    precision,
                    batch_size,
                    image_size,
                    hardware_kind: kind,
                    path,
                    results: rs.len(),
                    images_per_sec: median_of(&rs, |r| r.images_per_sec),
                    p50_ms: median_of(&rs, |r| r.latency.p50_ms),
                    math: maths.join("+"),
                    peak_memory_bytes: rs.iter().map(|r| r.peak_memory_bytes).max().unwrap_or(0),
                    price_per_hour: fleetmark_core::stats::median(&priced),
                    images_per_sec_ci95: throughput_ci(&rs),
                    repetitions: summarize_repetitions(&rs),
                    windows: pooled_window_throughputs(&rs),
                    node: String::new(),
                    agents: String::new(),
                    health_flagged: 0,
                }
            },
        )
        .collect()
}

/// Groups results into comparison rows, with columns named by hardware kind, or kind/path when
/// one kind was measured on more than one path.
pub fn build(
    results: &[BenchResult],
    baseline: Option<&str>,
) -> Result<(Vec<String>, Vec<Row>), CliError> {
    build_from(&summarise(results), baseline)
}

/// [`build`] over summaries (from the coordinator, or from [`summarise`]).
pub fn build_from(
    cells: &[Summary],
    baseline: Option<&str>,
) -> Result<(Vec<String>, Vec<Row>), CliError> {
    let mut paths: BTreeMap<&str, std::collections::BTreeSet<&str>> = BTreeMap::new();
    for c in cells {
        paths
            .entry(c.hardware_kind.as_str())
            .or_default()
            .insert(c.path.as_str());
    }
    let column = |c: &Summary| {
        if paths[c.hardware_kind.as_str()].len() > 1 {
            format!("{}/{}", c.hardware_kind, c.path)
        } else {
            c.hardware_kind.clone()
        }
    };
    type Key = (String, String, u32, u32);
    let mut groups: BTreeMap<Key, BTreeMap<String, &Summary>> = BTreeMap::new();
    for c in cells {
        let key = (
            c.model.clone(),
            c.precision.clone(),
            c.batch_size,
            c.image_size,
        );
        groups.entry(key).or_default().insert(column(c), c);
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
                .map(|(col, s)| {
                    let images_per_dollar = s
                        .price_per_hour
                        .filter(|p| *p > 0.0)
                        .map(|p| s.images_per_sec * 3600.0 / p);
                    (
                        col,
                        Cell {
                            images_per_sec: s.images_per_sec,
                            images_per_sec_ci95: s.images_per_sec_ci95,
                            p50_ms: s.p50_ms,
                            results: s.results,
                            math: s.math.clone(),
                            peak_memory_bytes: s.peak_memory_bytes,
                            speedup: None,
                            images_per_dollar,
                            repetitions: s.repetitions,
                            speedup_ci95: None,
                            health_flagged: s.health_flagged,
                            windows: s.windows.clone(),
                        },
                    )
                })
                .collect();
            if let Some(b) = &base {
                if let Some((base_ips, base_windows, base_ci, base_n)) = hardware.get(b).map(|c| {
                    (
                        c.images_per_sec,
                        c.windows.clone(),
                        c.images_per_sec_ci95,
                        c.results,
                    )
                }) {
                    for (col, c) in hardware.iter_mut() {
                        c.speedup = Some(c.images_per_sec / base_ips);
                        if col != b {
                            // Per-window samples where the records are at hand; otherwise the
                            // cells' own intervals (the coordinator's summary).
                            c.speedup_ci95 = welch_ratio(&c.windows, &base_windows).or_else(|| {
                                ratio_from_intervals(
                                    (c.images_per_sec, c.images_per_sec_ci95?, c.results),
                                    (base_ips, base_ci?, base_n),
                                )
                            });
                        }
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
                        let n = match cell.repetitions {
                            Some(rep) if cell.results > 1 && !plain => {
                                format!(" n={} ±{:.1}%", cell.results, rep.spread * 50.0)
                            }
                            _ => String::new(),
                        };
                        let unstable = if cell.unstable() && !plain {
                            " (unstable)"
                        } else {
                            ""
                        };
                        let flagged = if cell.health_flagged > 0 && !plain {
                            format!(" ({} {HEALTH_FLAGGED_NODES})", cell.health_flagged)
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
                            format!(
                                "{}{ci}{math}{n}{unstable}{flagged}",
                                throughput(cell.images_per_sec)
                            )
                        });
                        row.push(speedup_text(cell, plain));
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

/// The speed-up with its 95% interval, marked "n.s." when the difference from the baseline is
/// not significant. CSV gets the plain ratio.
fn speedup_text(cell: &Cell, plain: bool) -> String {
    let Some(s) = cell.speedup else {
        return String::new();
    };
    match cell.speedup_ci95 {
        Some(ci) if !plain => format!(
            "{s:.2} [{:.2}–{:.2}]{}",
            ci.ci95_low,
            ci.ci95_high,
            if ci.significant { "" } else { " n.s." }
        ),
        _ => format!("{s:.2}"),
    }
}

pub async fn run(remote: &mut Remote, args: CompareArgs) -> Result<ExitCode, CliError> {
    let cells = args.filters.cells_split(remote, args.by_node).await?;
    if cells.is_empty() {
        crate::note!("no results to compare for model {}", args.filters.model);
        if args.view.format == Format::Json {
            emit("[]\n")?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.by_node {
        emit(&crate::by_node::render(
            &crate::by_node::spreads(&cells),
            args.view,
        ))?;
        return Ok(ExitCode::SUCCESS);
    }
    let (columns, rows) = build_from(&cells, args.baseline.as_deref())?;
    emit(&render(&columns, &rows, args.view))?;
    if args.view.format == Format::Table {
        emit("img/s: median of the cell's results ± half its 95% confidence interval\n")?;
        if rows
            .iter()
            .any(|r| r.hardware.values().any(|c| c.health_flagged > 0))
        {
            emit(&format!(
                "{HEALTH_FLAGGED_NODES}: results from devices whose health check was more than \
                 10% below the median of their kind (`fleetmark agents` says which)\n"
            ))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
