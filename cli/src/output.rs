//! Rendering of results, agents and sweeps as tables, CSV or JSON. Every renderer returns the
//! text so that tests can check it and `main` prints it to stdout.
//!
//! Tables fit the terminal: a compact set of columns by default (`--wide` for all of them),
//! wrapped to the terminal's width, or to [`PIPE_WIDTH`] columns when stdout is not a terminal.

use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, CellAlignment, ContentArrangement, Table};
use fleetmark_core::{BenchResult, LatencyStats, Percentile};
use fleetmark_proto::{convert::from_timestamp, v1 as pb};
use serde_json::json;

use crate::{Format, Listed, View};

/// The width of a compact table when stdout is not a terminal.
pub const PIPE_WIDTH: u16 = 80;
/// The note under a table that shows [`NOT_ENOUGH_SAMPLES`].
fn too_few_note() -> String {
    format!(
        "{TOO_FEW} {NOT_ENOUGH_SAMPLES} for a 95% interval of that percentile\n   \
         (p50 needs {}, p90 {}, p99 {} timed iterations)\n",
        Percentile::P50.min_samples(),
        Percentile::P90.min_samples(),
        Percentile::P99.min_samples()
    )
}

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

/// What a table says of a percentile the samples cannot support at 95% (in its note).
pub const NOT_ENOUGH_SAMPLES: &str = "not enough samples";
/// The cell of such a percentile, explained by the note under the table.
pub const TOO_FEW: &str = "n/a*";

/// A percentile for a table: its estimate when its 95% interval could be formed, [`TOO_FEW`]
/// ("not enough samples") when it could not, and the plain sample percentile for records that
/// predate the intervals.
pub fn percentile_cell(l: &LatencyStats, p: Percentile, plain: f64) -> String {
    match l.percentiles.get(p) {
        Some(e) => ms(e.ms),
        None if (l.count as usize) < p.min_samples() => TOO_FEW.into(),
        None => ms(plain),
    }
}

/// The same for CSV: a plain number, or empty.
fn percentile_csv(l: &LatencyStats, p: Percentile) -> [String; 3] {
    match l.percentiles.get(p) {
        Some(e) => [
            e.ms.to_string(),
            e.ci95_low_ms.to_string(),
            e.ci95_high_ms.to_string(),
        ],
        None => Default::default(),
    }
}

/// Throughput with a marker when the result's timing was not found stable.
pub fn throughput_marked(r: &BenchResult) -> String {
    if r.is_unstable() {
        format!("{} (unstable)", throughput(r.images_per_sec))
    } else {
        throughput(r.images_per_sec)
    }
}

/// The marker of a result from a device whose health check in force was flagged.
pub const HEALTH_FLAGGED: &str = "(flagged node)";

/// A listed result's health cell: its check's flags, "ok", or "-" when the device declared no
/// check.
fn health_text(health: &Option<Vec<String>>) -> String {
    match health {
        None => "-".into(),
        Some(flags) if flags.is_empty() => "ok".into(),
        Some(flags) => flags.join(", "),
    }
}

fn is_flagged(l: &Listed) -> bool {
    l.health.as_ref().is_some_and(|f| !f.is_empty())
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
    ("health", false),
];

/// Whether a table of these results shows "not enough samples" for some percentile.
fn any_too_few(results: &[Listed]) -> bool {
    results.iter().map(|l| &l.result).any(|r| {
        [Percentile::P50, Percentile::P90, Percentile::P99]
            .into_iter()
            .any(|p| percentile_cell(&r.latency, p, 0.0) == TOO_FEW)
    })
}

fn result_row(listed: &Listed, wide: bool) -> Vec<String> {
    let r = &listed.result;
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
        percentile_cell(l, Percentile::P50, l.p50_ms),
        percentile_cell(l, Percentile::P90, l.p90_ms),
        percentile_cell(l, Percentile::P99, l.p99_ms),
        format!("{} ± {}", ms(l.mean_ms), ms(ci)),
        if is_flagged(listed) {
            format!("{} {HEALTH_FLAGGED}", throughput_marked(r))
        } else {
            throughput_marked(r)
        },
        bytes(r.peak_memory_bytes),
        gate,
        throttled,
        health_text(&listed.health),
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
    "stable",
    "stop_reason",
    "window_spread",
    "p50_ci_ms",
    "p50_ci95_low_ms",
    "p50_ci95_high_ms",
    "p90_ci_ms",
    "p90_ci95_low_ms",
    "p90_ci95_high_ms",
    "p99_ci_ms",
    "p99_ci95_low_ms",
    "p99_ci95_high_ms",
    "health_flags",
];

/// One result as plain numbers, for spreadsheets and scripts.
fn result_csv_row(listed: &Listed) -> Vec<String> {
    let r = &listed.result;
    let l = &r.latency;
    let mut row = vec![
        listed.result_id.clone(),
        listed.sweep_id.clone(),
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
    ];
    let st = r.stability.as_ref();
    row.push(st.map(|s| s.stable.to_string()).unwrap_or_default());
    row.push(st.map(|s| s.stop_reason.to_string()).unwrap_or_default());
    row.push(
        st.and_then(|s| s.spread)
            .map(|v| v.to_string())
            .unwrap_or_default(),
    );
    for p in Percentile::ALL {
        row.extend(percentile_csv(l, p));
    }
    row.push(match &listed.health {
        None => "-".into(),
        Some(f) if f.is_empty() => "ok".into(),
        Some(f) => f.join(";"),
    });
    row
}

/// A sweep's results. JSON carries the whole record, raw latencies included. Repetitions are
/// numbered from 1 (`rep`).
pub fn results(results: &[Listed], view: View) -> String {
    match view.format {
        Format::Json => {
            let v: Vec<_> = results
                .iter()
                .map(|l| {
                    json!({ "result_id": l.result_id, "sweep_id": l.sweep_id, "result": l.result,
                            "health_flags": l.health })
                })
                .collect();
            format!("{}\n", serde_json::to_string_pretty(&v).expect("json"))
        }
        Format::Csv => csv(
            RESULT_CSV_COLUMNS,
            results.iter().map(result_csv_row).collect(),
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
                results.iter().map(|l| result_row(l, view.wide)).collect(),
                right_from,
                view.wide,
            );
            if any_too_few(results) {
                out.push_str(&too_few_note());
            }
            if results.iter().any(is_flagged) {
                out.push_str(&format!(
                    "{HEALTH_FLAGGED}: the device's health check was more than 10% below the \
                     median of its kind (--wide or `fleetmark agents` says where)\n"
                ));
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

/// An agent's health column: "ok" when every checked device is within 10% of its kind's
/// median, the flags otherwise (device: flag, ...), "-" when no device has a check.
fn health_cell(a: &pb::AgentStatus) -> String {
    if a.devices.iter().all(|d| d.health.is_none()) {
        return "-".into();
    }
    let flags: Vec<String> = a
        .devices
        .iter()
        .flat_map(|d| {
            d.health_flags
                .iter()
                .map(move |f| format!("{}: {f}", d.device))
        })
        .collect();
    if flags.is_empty() {
        "ok".into()
    } else {
        flags.join(", ")
    }
}

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
        "health",
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
                health_cell(a),
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
                        "devices": a.devices.iter().map(|d| json!({
                            "device": d.device, "kind": d.kind, "name": d.name,
                            "health": d.health.clone().and_then(|h| fleetmark_core::DeviceHealth::try_from(h).ok()),
                            "health_flags": d.health_flags,
                        })).collect::<Vec<_>>(),
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

/// Stored health checks (`fleetmark agents checks`): the headline metrics in the table, the
/// whole check in JSON.
pub fn health_checks(checks: &[pb::HealthCheckRecord], view: View) -> String {
    let rows: Vec<(fleetmark_core::DeviceHealth, &pb::HealthCheckRecord)> = checks
        .iter()
        .filter_map(|c| {
            let h = fleetmark_core::DeviceHealth::try_from(c.health.clone()?).ok()?;
            Some((h, c))
        })
        .collect();
    if view.format == Format::Json {
        let v: Vec<_> = rows
            .iter()
            .map(|(h, c)| {
                json!({
                    "id": c.id, "agent": c.agent_name, "device": c.device, "kind": c.kind,
                    "incarnation": c.incarnation, "in_force": c.in_force, "flags": c.flags,
                    "health": h,
                })
            })
            .collect();
        return format!("{}\n", serde_json::to_string_pretty(&v).expect("json"));
    }
    let plain = view.format == Format::Csv;
    let header = [
        "checked at",
        "agent",
        "device",
        "kind",
        "in force",
        "gemm TFLOP/s",
        "memory GB/s",
        "h2d GB/s",
        "clock MHz",
        "flags",
    ];
    let body = rows
        .iter()
        .map(|(h, c)| {
            let gemm: Vec<String> = h
                .gemm_tflops
                .iter()
                .map(|(p, v)| format!("{p} {v:.1}"))
                .collect();
            vec![
                if plain {
                    h.measured_at.to_rfc3339()
                } else {
                    h.measured_at.format("%Y-%m-%d %H:%M").to_string()
                },
                c.agent_name.clone(),
                c.device.clone(),
                c.kind.clone(),
                if c.in_force { "yes" } else { "no" }.into(),
                gemm.join(if plain { ";" } else { ", " }),
                format!("{:.0}", h.memory_gbps),
                h.host_to_device_gbps
                    .map(|v| format!("{v:.1}"))
                    .unwrap_or_else(|| "-".into()),
                h.sm_clock_under_load_mhz
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "-".into()),
                if c.flags.is_empty() {
                    "ok".into()
                } else {
                    c.flags.join(if plain { ";" } else { ", " })
                },
            ]
        })
        .collect();
    if plain {
        csv(&header, body)
    } else {
        fitted_table(&header, body, 5, view.wide)
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
    fn percentiles_without_enough_samples_say_so() {
        let five = LatencyStats::from_samples(&[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        assert_eq!(
            percentile_cell(&five, Percentile::P99, five.p99_ms),
            TOO_FEW
        );
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        let hundred = LatencyStats::from_samples(&xs).unwrap();
        assert_eq!(
            percentile_cell(&hundred, Percentile::P50, hundred.p50_ms),
            "50.50"
        );
        assert_eq!(
            percentile_cell(&hundred, Percentile::P99, hundred.p99_ms),
            TOO_FEW
        );
        // A record from before the intervals existed keeps its plain percentile.
        let old = LatencyStats {
            percentiles: Default::default(),
            ..hundred.clone()
        };
        assert_eq!(percentile_cell(&old, Percentile::P50, old.p50_ms), "50.50");
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
