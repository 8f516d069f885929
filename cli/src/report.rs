//! `fleetmark report SWEEP`: one self-contained HTML page about a sweep, to keep or send: the
//! charts (inline SVG), the results, the correctness gate, GPU telemetry, the software
//! fingerprints, failed jobs and the sweep file. No scripts, no external resources.

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf, process::ExitCode};

use clap::Args;
use fleetmark_core::BenchResult;
use fleetmark_proto::{convert::from_timestamp, v1 as pb};

use crate::{
    compare,
    output::{bytes, ms, throughput},
    plot, CliError, Remote,
};

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The sweep: a full id, a unique prefix, or `latest`.
    pub sweep_id: String,
    /// Where to write the page [default: fleetmark-report-<first 8 characters of the id>.html].
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// A TrueType font for the charts' text [default: DejaVu Sans or another common font].
    #[arg(long)]
    pub font: Option<PathBuf>,
}

/// Text made safe for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str =
    "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}\
table{border-collapse:collapse;margin:1em 0;font-size:14px}\
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}\
th{background:#f3f3f3}td.l,th.l{text-align:left}\
.fail{color:#b00020;font-weight:bold}.ok{color:#1b7a1b}\
figure{margin:1em 0}figure svg{max-width:100%;height:auto;border:1px solid #eee}\
pre{background:#f7f7f7;padding:1em;overflow-x:auto}";

/// An HTML table; the first `left` columns are left-aligned.
fn table(header: &[&str], rows: &[Vec<String>], left: usize) -> String {
    let mut out = String::from("<table><thead><tr>");
    for (i, h) in header.iter().enumerate() {
        let class = if i < left { " class=\"l\"" } else { "" };
        let _ = write!(out, "<th{class}>{}</th>", esc(h));
    }
    out.push_str("</tr></thead><tbody>\n");
    for row in rows {
        out.push_str("<tr>");
        for (i, v) in row.iter().enumerate() {
            let class = if i < left { " class=\"l\"" } else { "" };
            let _ = write!(out, "<td{class}>{v}</td>");
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody></table>\n");
    out
}

fn who(r: &BenchResult) -> String {
    esc(&format!(
        "{} ({}) {} b{} rep {}",
        r.hardware_kind,
        r.agent_name,
        r.precision_label(),
        r.spec.batch_size,
        r.spec.repetition + 1
    ))
}

fn results_section(results: &[BenchResult]) -> String {
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            let l = &r.latency;
            vec![
                esc(&format!("{} ({})", r.hardware_kind, r.hardware_name)),
                esc(&r.agent_name),
                esc(&r.device),
                esc(&r.backend.path),
                esc(&r.precision_label()),
                r.spec.batch_size.to_string(),
                (r.spec.repetition + 1).to_string(),
                l.count.to_string(),
                ms(l.p50_ms),
                ms(l.p90_ms),
                ms(l.p99_ms),
                format!(
                    "{} ± {}",
                    ms(l.mean_ms),
                    ms((l.ci95_high_ms - l.ci95_low_ms) / 2.0)
                ),
                throughput(r.images_per_sec),
                esc(&bytes(r.peak_memory_bytes)),
            ]
        })
        .collect();
    table(
        &[
            "hardware",
            "agent",
            "device",
            "path",
            "precision",
            "batch",
            "rep",
            "iters",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "mean ms (95% CI)",
            "img/s",
            "peak mem",
        ],
        &rows,
        5,
    )
}

fn correctness_section(results: &[BenchResult]) -> String {
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| match &r.correctness {
            Some(c) => vec![
                who(r),
                esc(&c.reference),
                c.images_compared.to_string(),
                format!("{:.2e}", c.max_rel_error),
                format!("{:.2e}", c.max_abs_error),
                format!("{:.0}%", c.top1_agreement * 100.0),
                format!("{:.0e}", c.bound),
                if c.passed {
                    "<span class=\"ok\">passed</span>".into()
                } else {
                    "<span class=\"fail\">failed</span>".into()
                },
            ],
            None => vec![
                who(r),
                if r.backend.simulated {
                    "simulated device: no check".into()
                } else {
                    "not checked".into()
                },
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                "-".into(),
            ],
        })
        .collect();
    table(
        &[
            "result",
            "reference",
            "images",
            "max rel error",
            "max abs error",
            "top-1 agree",
            "bound",
            "gate",
        ],
        &rows,
        2,
    )
}

fn telemetry_section(results: &[BenchResult]) -> String {
    let mean = |m: &Option<fleetmark_core::MetricSummary>| {
        m.as_ref()
            .map(|m| format!("{:.0} ({:.0}–{:.0})", m.mean, m.min, m.max))
            .unwrap_or_else(|| "-".into())
    };
    let rows: Vec<Vec<String>> = results
        .iter()
        .filter_map(|r| {
            let t = r.telemetry.as_ref()?;
            Some(vec![
                who(r),
                t.samples.to_string(),
                mean(&t.sm_clock_mhz),
                mean(&t.memory_clock_mhz),
                mean(&t.power_watts),
                mean(&t.temperature_c),
                mean(&t.gpu_utilization_pct),
                if t.throttled {
                    format!(
                        "<span class=\"fail\">{}</span>",
                        esc(&t.throttle_reasons.join(", "))
                    )
                } else {
                    esc(&t.throttle_reasons.join(", "))
                },
            ])
        })
        .collect();
    if rows.is_empty() {
        return "<p>No GPU telemetry: these results come from CPUs or simulated devices.</p>\n"
            .into();
    }
    table(
        &[
            "result",
            "samples",
            "SM clock MHz",
            "memory clock MHz",
            "power W",
            "temperature °C",
            "utilisation %",
            "throttle reasons",
        ],
        &rows,
        1,
    )
}

fn fingerprint_section(results: &[BenchResult]) -> String {
    let mut by: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    for r in results {
        let e = &r.environment;
        let key = vec![
            e.fleetmark_version.clone(),
            e.git_commit.clone(),
            e.candle_version.clone(),
            e.rustc_version.clone(),
            e.cuda_driver_version.clone(),
            e.cudnn_version.clone(),
            format!("{} ({} cores)", r.host.cpu_model, r.host.logical_cores),
        ];
        *by.entry(key).or_default() += 1;
    }
    let rows: Vec<Vec<String>> = by
        .into_iter()
        .map(|(k, n)| {
            let mut row: Vec<String> = k
                .iter()
                .map(|v| if v.is_empty() { "-".into() } else { esc(v) })
                .collect();
            row.push(n.to_string());
            row
        })
        .collect();
    table(
        &[
            "fleetmark",
            "git commit",
            "candle",
            "rustc",
            "CUDA driver",
            "cuDNN",
            "host CPU",
            "results",
        ],
        &rows,
        7,
    )
}

fn charts_section(results: &[BenchResult]) -> Result<String, CliError> {
    let measured: Vec<BenchResult> = results.to_vec();
    let (columns, rows) = compare::build(&measured, None)?;
    let data = plot::ChartData::from_rows(&columns, &rows);
    let mut out = String::new();
    for which in plot::CHARTS {
        let svg = plot::svg(which, &data)?;
        let _ = writeln!(out, "<figure id=\"chart-{which}\">{svg}</figure>");
    }
    Ok(out)
}

/// The whole page.
pub fn render(status: &pb::SweepStatus, results: &[BenchResult]) -> Result<String, CliError> {
    let count = |s: &str| status.jobs.iter().filter(|j| j.state == s).count();
    let mut html = String::new();
    let title = format!("Fleetmark sweep {}", status.name);
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>{}</title><style>{STYLE}</style></head><body>\n<h1>{}</h1>\n",
        esc(&title),
        esc(&title)
    );
    let _ = writeln!(
        html,
        "<p>Sweep <code>{}</code>, {}, created {}. Jobs: {} succeeded, {} failed, {} cancelled, \
         {} pending or running, of {}.</p>",
        esc(&status.sweep_id),
        esc(&status.state),
        from_timestamp(status.created_at).format("%Y-%m-%d %H:%M:%S UTC"),
        count("succeeded"),
        count("failed"),
        count("cancelled"),
        count("pending") + count("running"),
        status.jobs.len()
    );
    html.push_str("<h2>Charts</h2>\n");
    if results.is_empty() {
        html.push_str("<p>No results yet.</p>\n");
    } else {
        html.push_str(&charts_section(results)?);
    }
    html.push_str("<h2>Results</h2>\n");
    html.push_str(&results_section(results));
    html.push_str("<h2>Correctness gate</h2>\n");
    html.push_str(&correctness_section(results));
    html.push_str("<h2>GPU telemetry</h2>\n");
    html.push_str(&telemetry_section(results));
    html.push_str("<h2>Fingerprints</h2>\n");
    html.push_str(&fingerprint_section(results));
    let failed: Vec<Vec<String>> = status
        .jobs
        .iter()
        .filter(|j| j.state == "failed" || j.state == "cancelled")
        .map(|j| {
            vec![
                esc(&j.spec.as_ref().map_or(j.job_id.clone(), |s| {
                    format!("b{} {} {}", s.batch_size, s.precision, s.target)
                })),
                esc(&j.state),
                j.attempt.to_string(),
                esc(&j.error),
            ]
        })
        .collect();
    if !failed.is_empty() {
        html.push_str("<h2>Jobs that did not succeed</h2>\n");
        html.push_str(&table(&["job", "state", "attempts", "error"], &failed, 4));
    }
    let _ = write!(
        html,
        "<h2>Sweep file</h2>\n<pre>{}</pre>\n</body></html>\n",
        esc(&status.spec_toml)
    );
    Ok(html)
}

pub async fn run(remote: &mut Remote, args: ReportArgs) -> Result<ExitCode, CliError> {
    plot::load_font(args.font.as_deref())?;
    let id = crate::sweeps::resolve(remote, &args.sweep_id).await?;
    let status = remote
        .client
        .get_sweep(pb::GetSweepRequest {
            sweep_id: id.clone(),
        })
        .await
        .map_err(|s| remote.err(s))?
        .into_inner();
    let results: Vec<BenchResult> = crate::fetch_results(
        remote,
        pb::ListResultsRequest {
            sweep_id: id.clone(),
            include_simulated: true,
            omit_latencies: true,
            ..Default::default()
        },
    )
    .await?
    .into_iter()
    .map(|l| l.result)
    .collect();
    let html = render(&status, &results)?;
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from(format!("fleetmark-report-{}.html", &id[..8])));
    std::fs::write(&out, html)
        .map_err(|e| CliError::Other(format!("cannot write {}: {e}", out.display())))?;
    note!("wrote {}", out.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
