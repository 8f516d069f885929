//! Rendering of results, agents and sweeps as tables, CSV or JSON. Every renderer returns the
//! text so that tests can check it and `main` prints it to stdout.
//!
//! Tables fit the terminal: a compact set of columns by default (`--wide` for all of them),
//! wrapped to the terminal's width, or to [`PIPE_WIDTH`] columns when stdout is not a terminal.

use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, CellAlignment, ContentArrangement, Table};
use fleetmark_core::BenchResult;
use fleetmark_proto::{convert::from_timestamp, v1 as pb};
use serde_json::json;

use crate::{Format, View};

/// The width of a compact table when stdout is not a terminal.
pub const PIPE_WIDTH: u16 = 80;
/// Below this many timed iterations a p99 is marked as rough.
pub const P99_MIN_SAMPLES: u64 = 100;
/// Below this many timed iterations a p90 is marked as rough.
pub const P90_MIN_SAMPLES: u64 = 10;
/// The mark on a percentile from too few samples, explained by [`ROUGH_NOTE`].
pub const ROUGH: &str = "*";
pub const ROUGH_NOTE: &str =
    "* rough: p99 from fewer than 100 timed iterations, p90 from fewer than 10\n";

/// A compact table, fitted to the terminal (or 80 columns when stdout is not one).
pub fn table(header: &[&str], rows: Vec<Vec<String>>, right_from: usize) -> String {
    fitted_table(header, rows, right_from, false)
}

/// A table; `wide` lifts the 80-column limit that applies when stdout is not a terminal.
pub fn fitted_table(
    header: &[&str],
    rows: Vec<Vec<String>>,
    right_from: usize,
    wide: bool,
) -> String {
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED);
    t.set_content_arrangement(ContentArrangement::Dynamic);
    if t.width().is_none() {
        if wide {
            t.set_content_arrangement(ContentArrangement::Disabled);
        } else {
            t.set_width(PIPE_WIDTH);
        }
    }
    t.set_header(header.to_vec());
    for row in rows {
        t.add_row(row.into_iter().enumerate().map(|(i, v)| {
            let c = Cell::new(v);
            if i >= right_from {
                c.set_alignment(CellAlignment::Right)
            } else {
                c
            }
        }));
    }
    format!("{t}\n")
}

/// RFC 4180 CSV: fields with commas, quotes or newlines are quoted.
pub fn csv(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let field = |s: &str| {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    let mut out = header
        .iter()
        .map(|h| field(h))
        .collect::<Vec<_>>()
        .join(",");
    out.push('\n');
    for row in rows {
        out.push_str(&row.iter().map(|v| field(v)).collect::<Vec<_>>().join(","));
        out.push('\n');
    }
    out
}

pub fn bytes(n: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if n == 0 {
        "-".into()
    } else if (n as f64) < 10.0 * 1024.0 * MIB {
        format!("{:.0} MiB", n as f64 / MIB)
    } else {
        format!("{:.1} GiB", n as f64 / (1024.0 * MIB))
    }
}

pub fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Throughput for people: 43,926 for large values, one decimal below 100.
pub fn throughput(v: f64) -> String {
    if v.abs() < 100.0 {
        format!("{v:.1}")
    } else {
        thousands(v)
    }
}

pub fn thousands(v: f64) -> String {
    let s = format!("{v:.0}");
    let (sign, digits) = s.split_at(if s.starts_with('-') { 1 } else { 0 });
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

/// Result table columns: (header, shown in the compact table).
const RESULT_COLUMNS: &[(&str, bool)] = &[
    ("hardware", true),
    ("agent", false),
    ("device", false),
    ("path", true),
    ("precision", true),
    ("batch", true),
    ("rep", true),
    ("iters", false),
    ("p50 ms", true),
    ("p90 ms", false),
    ("p99 ms", true),
    ("mean ms (95% CI)", true),
    ("img/s", true),
    ("peak mem", false),
    ("gate", true),
    ("throttled", false),
];

/// A percentile, marked as rough when it rests on fewer than `min` samples.
fn percentile(v: f64, count: u64, min: u64) -> String {
    if count < min {
        format!("{}{ROUGH}", ms(v))
    } else {
        ms(v)
    }
}

/// Whether any of these results has a percentile that the table marks as rough.
fn any_rough(results: &[(String, String, BenchResult)], wide: bool) -> bool {
    results.iter().any(|(_, _, r)| {
        r.latency.count < P99_MIN_SAMPLES || (wide && r.latency.count < P90_MIN_SAMPLES)
    })
}

fn result_row(r: &BenchResult, wide: bool) -> Vec<String> {
    let gate = match &r.correctness {
        Some(c) => format!("{:.1e}", c.max_rel_error),
        None if r.backend.simulated => "simulated".into(),
        None => "-".into(),
    };
    let throttled = match &r.telemetry {
        Some(t) if t.throttled => t.throttle_reasons.join("+"),
        Some(_) => "no".into(),
        None => "-".into(),
    };
    let l = &r.latency;
    let ci = (l.ci95_high_ms - l.ci95_low_ms) / 2.0;
    let hardware = if wide {
        format!("{} ({})", r.hardware_kind, r.hardware_name)
    } else {
        r.hardware_kind.clone()
    };
    let all = [
        hardware,
        r.agent_name.clone(),
        r.device.clone(),
        r.backend.path.clone(),
        r.precision_label(),
        r.spec.batch_size.to_string(),
        (r.spec.repetition + 1).to_string(),
        l.count.to_string(),
        ms(l.p50_ms),
        percentile(l.p90_ms, l.count, P90_MIN_SAMPLES),
        percentile(l.p99_ms, l.count, P99_MIN_SAMPLES),
        format!("{} ± {}", ms(l.mean_ms), ms(ci)),
        throughput(r.images_per_sec),
        bytes(r.peak_memory_bytes),
        gate,
        throttled,
    ];
    all.into_iter()
        .zip(RESULT_COLUMNS)
        .filter(|(_, (_, compact))| wide || *compact)
        .map(|(v, _)| v)
        .collect()
}

const RESULT_CSV_COLUMNS: &[&str] = &[
    "result_id",
    "sweep_id",
    "hardware_kind",
    "hardware_name",
    "agent",
    "device",
    "path",
    "precision",
    "math",
    "batch_size",
    "image_size",
    "rep",
    "iterations",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "mean_ms",
    "std_ms",
    "ci95_low_ms",
    "ci95_high_ms",
    "images_per_sec",
    "peak_memory_bytes",
    "max_rel_error",
    "throttled",
];

/// One result as plain numbers, for spreadsheets and scripts.
fn result_csv_row(id: &str, sweep: &str, r: &BenchResult) -> Vec<String> {
    let l = &r.latency;
    vec![
        id.to_string(),
        sweep.to_string(),
        r.hardware_kind.clone(),
        r.hardware_name.clone(),
        r.agent_name.clone(),
        r.device.clone(),
        r.backend.path.clone(),
        r.spec.precision.to_string(),
        r.backend.math.clone(),
        r.spec.batch_size.to_string(),
        r.spec.image_size.to_string(),
        (r.spec.repetition + 1).to_string(),
        l.count.to_string(),
        l.p50_ms.to_string(),
        l.p90_ms.to_string(),
        l.p99_ms.to_string(),
        l.mean_ms.to_string(),
        l.std_ms.to_string(),
        l.ci95_low_ms.to_string(),
        l.ci95_high_ms.to_string(),
        r.images_per_sec.to_string(),
        r.peak_memory_bytes.to_string(),
        r.correctness
            .as_ref()
            .map(|c| c.max_rel_error.to_string())
            .unwrap_or_default(),
        r.telemetry
            .as_ref()
            .map(|t| t.throttled.to_string())
            .unwrap_or_default(),
    ]
}

/// A sweep's results. JSON carries the whole record, raw latencies included. Repetitions are
/// numbered from 1 (`rep`).
pub fn results(results: &[(String, String, BenchResult)], view: View) -> String {
    match view.format {
        Format::Json => {
            let v: Vec<_> = results
                .iter()
                .map(|(id, sweep, r)| json!({ "result_id": id, "sweep_id": sweep, "result": r }))
                .collect();
            format!("{}\n", serde_json::to_string_pretty(&v).expect("json"))
        }
        Format::Csv => csv(
            RESULT_CSV_COLUMNS,
            results
                .iter()
                .map(|(id, sweep, r)| result_csv_row(id, sweep, r))
                .collect(),
        ),
        Format::Table => {
            let header: Vec<&str> = RESULT_COLUMNS
                .iter()
                .filter(|(_, compact)| view.wide || *compact)
                .map(|(h, _)| *h)
                .collect();
            let right_from = header.iter().position(|h| *h == "batch").unwrap_or(0);
            let mut out = fitted_table(
                &header,
                results
                    .iter()
                    .map(|(_, _, r)| result_row(r, view.wide))
                    .collect(),
                right_from,
                view.wide,
            );
            if any_rough(results, view.wide) {
                out.push_str(ROUGH_NOTE);
            }
            out
        }
    }
}

fn agent_csv_row(a: &pb::AgentStatus) -> Vec<String> {
    let inv = a.inventory.clone().unwrap_or_default();
    vec![
        a.agent_id.clone(),
        a.name.clone(),
        a.state.clone(),
        a.devices
            .iter()
            .map(|d| format!("{}={}", d.device, d.kind))
            .collect::<Vec<_>>()
            .join(" "),
        inv.cpu_model.clone(),
        inv.logical_cores.to_string(),
        inv.memory_bytes.to_string(),
        inv.gpus
            .iter()
            .map(|g| g.name.clone())
            .collect::<Vec<_>>()
            .join(";"),
        a.price_per_hour.map(|p| p.to_string()).unwrap_or_default(),
        a.labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";"),
        from_timestamp(a.last_seen_at).to_rfc3339(),
        a.running_jobs.len().to_string(),
    ]
}

/// Columns of the compact agents table (the rest appear with --wide).
const AGENT_COMPACT: &[&str] = &["name", "state", "devices", "last seen", "running"];

pub fn agents(agents: &[pb::AgentStatus], view: View) -> String {
    let format = view.format;
    let header = [
        "name",
        "state",
        "devices",
        "cpu",
        "cores",
        "memory",
        "gpus",
        "price/h",
        "labels",
        "last seen",
        "running",
    ];
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            let inv = a.inventory.clone().unwrap_or_default();
            vec![
                a.name.clone(),
                a.state.clone(),
                a.devices
                    .iter()
                    .map(|d| format!("{}={}", d.device, d.kind))
                    .collect::<Vec<_>>()
                    .join(" "),
                inv.cpu_model.clone(),
                inv.logical_cores.to_string(),
                bytes(inv.memory_bytes),
                inv.gpus
                    .iter()
                    .map(|g| g.name.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
                a.price_per_hour
                    .map(|p| format!("${p:.2}"))
                    .unwrap_or_else(|| "-".into()),
                a.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
                from_timestamp(a.last_seen_at)
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string(),
                a.running_jobs.len().to_string(),
            ]
        })
        .collect();
    match format {
        Format::Json => {
            let v: Vec<_> = agents
                .iter()
                .map(|a| {
                    let inv: fleetmark_core::HostInventory =
                        a.inventory.clone().unwrap_or_default().into();
                    json!({
                        "agent_id": a.agent_id, "name": a.name, "state": a.state,
                        "labels": a.labels, "price_per_hour": a.price_per_hour,
                        "devices": a.devices.iter().map(|d| json!({"device": d.device, "kind": d.kind, "name": d.name})).collect::<Vec<_>>(),
                        "inventory": inv,
                        "last_seen_at": from_timestamp(a.last_seen_at),
                        "running_jobs": a.running_jobs,
                    })
                })
                .collect();
            format!("{}\n", serde_json::to_string_pretty(&v).expect("json"))
        }
        Format::Csv => csv(
            &[
                "agent_id",
                "name",
                "state",
                "devices",
                "cpu",
                "logical_cores",
                "memory_bytes",
                "gpus",
                "price_per_hour",
                "labels",
                "last_seen_at",
                "running_jobs",
            ],
            agents.iter().map(agent_csv_row).collect(),
        ),
        Format::Table => {
            let keep: Vec<bool> = header
                .iter()
                .map(|h| view.wide || AGENT_COMPACT.contains(h))
                .collect();
            let pick = |row: Vec<String>| -> Vec<String> {
                row.into_iter()
                    .zip(&keep)
                    .filter(|(_, k)| **k)
                    .map(|(v, _)| v)
                    .collect()
            };
            let shown: Vec<&str> = header
                .iter()
                .zip(&keep)
                .filter(|(_, k)| **k)
                .map(|(h, _)| *h)
                .collect();
            fitted_table(
                &shown,
                rows.into_iter().map(pick).collect(),
                usize::MAX,
                view.wide,
            )
        }
    }
}

/// The first characters of a sweep id, enough to name it in other commands.
pub const SHORT_ID: usize = 8;

pub fn sweeps(sweeps: &[pb::SweepSummary], view: View) -> String {
    let format = view.format;
    let header = ["sweep id", "name", "state", "created", "jobs", "finished"];
    let rows: Vec<Vec<String>> = sweeps
        .iter()
        .map(|s| {
            vec![
                if format == Format::Table && !view.wide {
                    s.sweep_id.chars().take(SHORT_ID).collect()
                } else {
                    s.sweep_id.clone()
                },
                s.name.clone(),
                s.state.clone(),
                from_timestamp(s.created_at)
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string(),
                s.jobs.to_string(),
                s.finished.to_string(),
            ]
        })
        .collect();
    match format {
        Format::Json => {
            let v: Vec<_> = sweeps
                .iter()
                .map(|s| {
                    json!({"sweep_id": s.sweep_id, "name": s.name, "state": s.state,
                           "created_at": from_timestamp(s.created_at), "jobs": s.jobs, "finished": s.finished})
                })
                .collect();
            format!("{}\n", serde_json::to_string_pretty(&v).expect("json"))
        }
        Format::Csv => csv(&header, rows),
        Format::Table => fitted_table(&header, rows, 4, view.wide),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_what_needs_quoting() {
        let out = csv(&["a", "b"], vec![vec!["x,y".into(), "say \"hi\"".into()]]);
        assert_eq!(out, "a,b\n\"x,y\",\"say \"\"hi\"\"\"\n");
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(43926.4), "43,926");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(ms(0.36312), "0.363");
        assert_eq!(ms(26.8), "26.80");
        assert_eq!(bytes(3 * 1024 * 1024), "3 MiB");
    }
}
