//! `fleetmark watch`: live progress of a sweep, one bar per running job and one for the whole
//! sweep, drawn on stderr. Without a terminal the bars hide themselves and each job's changes are
//! printed as lines instead. Reconnects when the coordinator restarts.

use std::{collections::HashMap, time::Duration};

use fleetmark_proto::v1 as pb;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tonic::Code;

use crate::{CliError, Remote};

fn label(j: &pb::JobStatus) -> String {
    match &j.spec {
        Some(s) => format!("b{} {} {}", s.batch_size, s.precision, s.target),
        None => j.job_id.clone(),
    }
}

struct View {
    multi: MultiProgress,
    overall: ProgressBar,
    bars: HashMap<String, ProgressBar>,
    last: HashMap<String, (String, String)>,
    plain: bool,
}

impl View {
    fn new(total: u64) -> Self {
        let multi = MultiProgress::new();
        let plain = multi.is_hidden();
        let overall = multi.add(ProgressBar::new(total));
        overall.set_style(
            ProgressStyle::with_template(
                "{prefix:>10} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        overall.set_prefix("sweep");
        View {
            multi,
            overall,
            bars: HashMap::new(),
            last: HashMap::new(),
            plain,
        }
    }

    fn update(&mut self, status: &pb::SweepStatus) {
        let done = status
            .jobs
            .iter()
            .filter(|j| matches!(j.state.as_str(), "succeeded" | "failed" | "cancelled"))
            .count();
        let failed = status.jobs.iter().filter(|j| j.state == "failed").count();
        self.overall.set_length(status.jobs.len() as u64);
        self.overall.set_position(done as u64);
        self.overall.set_message(format!(
            "{} {}",
            status.state,
            if failed > 0 {
                format!("({failed} failed)")
            } else {
                String::new()
            }
        ));
        for j in &status.jobs {
            let key = (j.state.clone(), j.phase.clone());
            if self.last.get(&j.job_id) != Some(&key) {
                if self.plain {
                    let who = if j.agent_name.is_empty() {
                        String::new()
                    } else {
                        format!(" on {} {}", j.agent_name, j.device)
                    };
                    let extra = match (j.state.as_str(), j.images_per_sec) {
                        ("succeeded", Some(ips)) => format!(": {ips:.1} img/s"),
                        ("failed", _) | ("pending", _) if !j.error.is_empty() => {
                            format!(": {}", j.error)
                        }
                        _ if j.state == "running" => format!(" ({})", j.phase),
                        _ => String::new(),
                    };
                    crate::note!("{:<28} {}{}{}", label(j), j.state, who, extra);
                }
                self.last.insert(j.job_id.clone(), key);
            }
            if j.state == "running" {
                let multi = &self.multi;
                let bar = self.bars.entry(j.job_id.clone()).or_insert_with(|| {
                    let b = multi.add(ProgressBar::new(1000));
                    b.set_style(
                        ProgressStyle::with_template("{prefix:>10} {bar:30} {msg}")
                            .expect("template")
                            .progress_chars("=> "),
                    );
                    b.set_prefix(label(j));
                    b
                });
                bar.set_position((j.fraction.clamp(0.0, 1.0) * 1000.0) as u64);
                bar.set_message(format!(
                    "{} {} it  {} {}",
                    j.phase, j.iterations, j.agent_name, j.device
                ));
            } else if let Some(bar) = self.bars.remove(&j.job_id) {
                bar.finish_and_clear();
                self.multi.remove(&bar);
                let outcome = match (j.state.as_str(), j.images_per_sec) {
                    ("succeeded", Some(ips)) => format!("{ips:.1} img/s"),
                    (s, _) if !j.error.is_empty() => format!("{s}: {}", j.error),
                    (s, _) => s.to_string(),
                };
                if !self.plain {
                    let _ = self.multi.println(format!(
                        "{:<28} {} on {} {}",
                        label(j),
                        outcome,
                        j.agent_name,
                        j.device
                    ));
                }
            }
        }
    }

    fn finish(self) {
        for (_, b) in self.bars {
            b.finish_and_clear();
        }
        self.overall.finish();
    }
}

/// Follows the sweep until it is no longer active. Ok(true) when every job succeeded.
pub async fn watch(remote: &mut Remote, sweep_id: &str) -> Result<bool, CliError> {
    let mut view: Option<View> = None;
    let mut last: Option<pb::SweepStatus> = None;
    let mut retries = 0u32;
    loop {
        let stream = remote
            .client
            .watch_sweep(pb::GetSweepRequest {
                sweep_id: sweep_id.to_string(),
            })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == Code::Unavailable && last.is_some() && retries < 120 => {
                // The coordinator went away mid-watch; it will be back.
                retries += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(s) => return Err(remote.err(s)),
        };
        loop {
            match stream.message().await {
                Ok(Some(status)) => {
                    retries = 0;
                    let v = view.get_or_insert_with(|| View::new(status.jobs.len() as u64));
                    v.update(&status);
                    last = Some(status);
                }
                Ok(None) => break,
                Err(_) => break,
            }
        }
        if let Some(s) = &last {
            if s.state != "active" {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if let Some(v) = view {
        v.finish();
    }
    let status = last.expect("at least one status was received");
    let failed: Vec<_> = status
        .jobs
        .iter()
        .filter(|j| j.state != "succeeded")
        .collect();
    crate::note!(
        "sweep {} {}: {} of {} jobs succeeded",
        status.sweep_id,
        status.state,
        status.jobs.len() - failed.len(),
        status.jobs.len()
    );
    for j in &failed {
        crate::note!("  {} {}: {}", label(j), j.state, j.error);
    }
    Ok(failed.is_empty())
}
