//! The CLI as a person meets it, through the real binary: output piped into `head` ends
//! quietly, tables fit 80 columns when piped, repetitions are numbered, rough percentiles are
//! marked, sweep ids take prefixes and `latest`, the config file is read (and typos in it are
//! refused), and completions are printed.

mod common;

use std::{
    io::Read,
    process::{Command, Stdio},
    time::Duration,
};

use common::{fleetmark, record, token, write, Live};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn assert_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "status {:?}; stderr:\n{}",
        out.status,
        stderr(out)
    );
}

/// Imports `records` as one sweep and returns its id.
async fn import(live: &Live, dir: &std::path::Path, name: &str, records: &[String]) -> String {
    let file = write(dir, &format!("{name}.jsonl"), &(records.join("\n") + "\n"));
    let out = fleetmark(&live.url, &["import", &file, "--name", name]).await;
    assert_ok(&out);
    stdout(&out).trim().to_string()
}

/// Runs the binary with stdout a pipe whose reading end is closed before anything is written:
/// every write then fails with EPIPE, as it does for `fleetmark ... | head` once head exits.
fn run_into_closed_pipe(url: &str, args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetmark"))
        .env("FLEETMARK_TOKEN", token())
        .env_remove("FLEETMARK_CONFIG")
        .env("XDG_CONFIG_HOME", "/nonexistent/fleetmark-test-config")
        .env("RUST_BACKTRACE", "1")
        .arg("--coordinator")
        .arg(url)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fleetmark");
    drop(child.stdout.take());
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read stderr");
    let status = child.wait().expect("wait");
    (status.code(), err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_quietly_with_status_0() {
    let live = Live::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    // Big enough that the JSON (raw latencies included) overflows any pipe buffer.
    let records: Vec<String> = (0..4).map(|rep| record(1, rep, 20_000)).collect();
    let sweep = import(&live, dir.path(), "big", &records).await;

    let url = live.url.clone();
    let cases: Vec<Vec<String>> = vec![
        vec![
            "results".into(),
            sweep.clone(),
            "--format".into(),
            "json".into(),
        ],
        vec!["results".into(), sweep.clone()],
        vec![
            "results".into(),
            "latest".into(),
            "--format".into(),
            "csv".into(),
        ],
        vec!["sweeps".into()],
        vec!["agents".into(), "--format".into(), "json".into()],
        vec!["compare".into()],
        vec!["completions".into(), "bash".into()],
        vec!["--help".into()],
    ];
    for args in cases {
        let url = url.clone();
        let shown = args.clone();
        let (code, err) = tokio::task::spawn_blocking(move || {
            let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
            run_into_closed_pipe(&url, &args_ref)
        })
        .await
        .expect("join");
        let args = shown;
        assert_ne!(
            code,
            Some(101),
            "fleetmark {args:?} panicked; stderr:\n{err}"
        );
        assert_eq!(code, Some(0), "fleetmark {args:?}; stderr:\n{err}");
        assert!(!err.contains("panicked"), "fleetmark {args:?}: {err}");
        assert!(
            !err.contains("stack backtrace") && !err.contains("RUST_BACKTRACE"),
            "no stack trace, fleetmark {args:?}: {err}"
        );
        assert!(!err.contains("error"), "quietly, fleetmark {args:?}: {err}");
    }

    // The same through a shell, the way people hit it: `| head -c 100`, status from pipefail.
    let script = format!(
        "set -o pipefail; '{}' --coordinator '{}' results '{}' --format json | head -c 100 >/dev/null",
        env!("CARGO_BIN_EXE_fleetmark"),
        live.url,
        sweep
    );
    let out = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("FLEETMARK_TOKEN", token())
        .env_remove("FLEETMARK_CONFIG")
        .env("XDG_CONFIG_HOME", "/nonexistent/fleetmark-test-config")
        .output()
        .await
        .expect("bash");
    assert_ok(&out);
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_fit_80_columns_and_number_repetitions() {
    let live = Live::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    // Three repetitions of one point: 3 samples each, so p99 (and p90) are rough.
    let records: Vec<String> = (0..3).map(|rep| record(2, rep, 3)).collect();
    let sweep = import(&live, dir.path(), "reps", &records).await;

    let out = fleetmark(&live.url, &["results", &sweep]).await;
    assert_ok(&out);
    let table = stdout(&out);
    for line in table.lines() {
        assert!(
            line.chars().count() <= 80,
            "a line wider than 80 columns:\n{line}\nin:\n{table}"
        );
    }
    assert!(table.contains("rep"), "{table}");
    let reps: Vec<&str> = table
        .lines()
        .filter(|l| l.contains("cpu"))
        .map(|l| {
            l.split(['│', '┆'])
                .map(str::trim)
                .nth(5)
                .unwrap_or_else(|| panic!("no rep column in {l:?} of:\n{table}"))
        })
        .collect();
    assert_eq!(reps, ["1", "2", "3"], "{table}");
    assert!(
        table.contains("n/a*"),
        "p99 from 3 samples is not a number: {table}"
    );
    assert!(
        table.contains("not enough samples for a 95% interval"),
        "the mark is explained: {table}"
    );
    assert!(!table.contains("agent"), "compact by default: {table}");

    let wide = stdout(&fleetmark(&live.url, &["results", &sweep, "--wide"]).await);
    for column in [
        "agent",
        "device",
        "p90 ms",
        "peak mem",
        "throttled",
        "iters",
    ] {
        assert!(wide.contains(column), "--wide shows {column}:\n{wide}");
    }

    let csv = stdout(&fleetmark(&live.url, &["results", &sweep, "--format", "csv"]).await);
    let header: Vec<&str> = csv.lines().next().expect("header").split(',').collect();
    let rep = header
        .iter()
        .position(|h| *h == "rep")
        .expect("a rep column");
    let reps: Vec<String> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(rep).expect("rep").to_string())
        .collect();
    assert_eq!(reps, ["1", "2", "3"], "{csv}");

    // Sweeps list short ids by default.
    let sweeps = stdout(&fleetmark(&live.url, &["sweeps"]).await);
    assert!(
        sweeps.contains(&sweep[..8]) && !sweeps.contains(&sweep),
        "{sweeps}"
    );
    for line in sweeps.lines() {
        assert!(line.chars().count() <= 80, "{sweeps}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_ids_take_unique_prefixes_and_latest() {
    let live = Live::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let first = import(&live, dir.path(), "first", &[record(1, 0, 3)]).await;
    let second = import(&live, dir.path(), "second", &[record(4, 0, 3)]).await;

    // `latest` is the newest sweep.
    let out = fleetmark(&live.url, &["results", "latest", "--format", "csv"]).await;
    assert_ok(&out);
    assert!(stdout(&out).contains(&second), "{}", stdout(&out));

    // A unique prefix (upper case too) names the sweep.
    for typed in [&first[..8], &first[..8].to_uppercase()] {
        let out = fleetmark(&live.url, &["results", typed, "--format", "csv"]).await;
        assert_ok(&out);
        assert!(stdout(&out).contains(&first), "{typed}: {}", stdout(&out));
    }

    // Two sweeps that share a prefix: the prefix is ambiguous, and both are listed.
    for (id, name) in [
        ("abcd0000-0000-4000-8000-000000000001", "twin one"),
        ("abcd0000-0000-4000-8000-000000000002", "twin two"),
    ] {
        sqlx::query(
            "INSERT INTO sweeps (id, name, spec, spec_toml, state) \
             VALUES ($1::uuid, $2, '{}'::jsonb, '', 'imported')",
        )
        .bind(id)
        .bind(name)
        .execute(&live.pool)
        .await
        .expect("insert a sweep");
    }
    let out = fleetmark(&live.url, &["cancel", "abcd"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("ambiguous"), "{err}");
    assert!(
        err.contains("abcd0000-0000-4000-8000-000000000001")
            && err.contains("abcd0000-0000-4000-8000-000000000002"),
        "candidates are listed: {err}"
    );
    let out = fleetmark(
        &live.url,
        &[
            "results",
            "abcd0000-0000-4000-8000-00000000000",
            "--format",
            "csv",
        ],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "still ambiguous: {}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_file_is_read_and_flags_win() {
    let live = Live::start().await;
    let home = tempfile::tempdir().expect("temp dir");
    let dir = home.path().join("fleetmark");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    // The token comes from the file's token_file (relative to the file's folder).
    std::fs::write(dir.join("token"), format!("{}\n", token())).expect("write token");
    let run = |config: String, args: Vec<String>| {
        std::fs::write(dir.join("config.toml"), config).expect("write config");
        let home = home.path().to_path_buf();
        async move {
            tokio::time::timeout(
                Duration::from_secs(60),
                tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetmark"))
                    .env_remove("FLEETMARK_COORDINATOR")
                    .env_remove("FLEETMARK_TOKEN")
                    .env_remove("FLEETMARK_TOKEN_FILE")
                    .env_remove("FLEETMARK_CONFIG")
                    .env("XDG_CONFIG_HOME", &home)
                    .args(&args)
                    .output(),
            )
            .await
            .expect("fleetmark hung")
            .expect("run fleetmark")
        }
    };

    // The coordinator and the token come from the file.
    let out = run(
        format!("coordinator = \"{}\"\ntoken_file = \"token\"\n", live.url),
        vec!["sweeps".into()],
    )
    .await;
    assert_ok(&out);

    // A flag beats the file.
    let out = run(
        format!("coordinator = \"{dead}\"\ntoken_file = \"token\"\n"),
        vec!["--coordinator".into(), live.url.clone(), "sweeps".into()],
    )
    .await;
    assert_ok(&out);
    let out = run(
        format!("coordinator = \"{dead}\"\ntoken_file = \"token\"\n"),
        vec!["sweeps".into()],
    )
    .await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains(&dead), "{}", stderr(&out));

    // A typo is refused, naming the file and the key.
    let out = run(
        format!("coordinater = \"{}\"\n", live.url),
        vec!["sweeps".into()],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("config.toml") && err.contains("coordinater") && err.contains("allowed keys"),
        "{err}"
    );

    // A missing token file, and an empty one, are named as such.
    let out = run(
        format!("coordinator = \"{}\"\ntoken_file = \"missing\"\n", live.url),
        vec!["sweeps".into()],
    )
    .await;
    std::fs::write(dir.join("token"), "").expect("write token");
    let out2 = run(
        format!("coordinator = \"{}\"\ntoken_file = \"token\"\n", live.url),
        vec!["sweeps".into()],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("token file"), "{}", stderr(&out));
    assert_eq!(out2.status.code(), Some(2), "{}", stderr(&out2));
    assert!(stderr(&out2).contains("is empty"), "{}", stderr(&out2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_help_are_printed() {
    let out = fleetmark("http://127.0.0.1:1", &["completions", "bash"]).await;
    assert_ok(&out);
    let script = stdout(&out);
    assert!(
        script.contains("complete") && script.contains("fleetmark"),
        "{script}"
    );
    assert!(script.contains("--wide"), "subcommand flags are completed");
    let out = fleetmark("http://127.0.0.1:1", &["completions", "zsh"]).await;
    assert_ok(&out);
    assert!(stdout(&out).contains("#compdef fleetmark"));

    let out = fleetmark("http://127.0.0.1:1", &["--help"]).await;
    assert_ok(&out);
    let help = stdout(&out);
    assert!(help.contains("Exit status:"), "{help}");
    for code in ["  3  ", "  4  ", "  5  "] {
        assert!(help.contains(code), "{help}");
    }
    let out = fleetmark("http://127.0.0.1:1", &["completions", "tcsh"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_offline_for_good_are_pruned_and_come_back_if_they_return() {
    use fleetmark_proto::v1 as pb;
    let live = Live::start().await;
    let ch = tonic::transport::Channel::from_shared(live.url.clone())
        .expect("url")
        .connect_lazy();
    // Registered with the test's admin token, which may register agents.
    let bearer: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", token()).parse().expect("header");
    let mut agents = pb::agent_service_client::AgentServiceClient::with_interceptor(
        ch,
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", bearer.clone());
            Ok(r)
        },
    );
    let register = pb::RegisterRequest {
        name: "gone-for-good".into(),
        inventory: Some(Default::default()),
        devices: vec![pb::AgentDevice {
            device: "cpu".into(),
            kind: "cpu".into(),
            name: "cpu".into(),
            precisions: vec![],
            health: None,
            health_flags: vec![],
        }],
        ..Default::default()
    };
    for name in ["gone-for-good", "still-here"] {
        agents
            .register(pb::RegisterRequest {
                name: name.into(),
                ..register.clone()
            })
            .await
            .expect("register");
    }
    sqlx::query(
        "UPDATE agents SET last_seen_at = now() - interval '2 hours' WHERE name = 'gone-for-good'",
    )
    .execute(&live.pool)
    .await
    .expect("age the agent");
    let listed = |out: &std::process::Output| {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        v.as_array()
            .expect("an array")
            .iter()
            .map(|a| a["name"].as_str().expect("name").to_string())
            .collect::<Vec<_>>()
    };

    let out = fleetmark(
        &live.url,
        &["agents", "prune", "--offline-for", "1h", "--dry-run"],
    )
    .await;
    assert_ok(&out);
    assert_eq!(stdout(&out), "gone-for-good\n");
    let out = fleetmark(&live.url, &["agents", "--format", "json"]).await;
    assert_eq!(
        listed(&out),
        ["gone-for-good", "still-here"],
        "a dry run changes nothing"
    );

    let out = fleetmark(&live.url, &["agents", "prune", "--offline-for", "1h"]).await;
    assert_ok(&out);
    assert_eq!(stdout(&out), "gone-for-good\n");
    let out = fleetmark(&live.url, &["agents", "--format", "json"]).await;
    assert_eq!(listed(&out), ["still-here"]);

    // Too short a window could retire healthy agents: refused.
    let out = fleetmark(&live.url, &["agents", "prune", "--offline-for", "5s"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("at least 60"), "{}", stderr(&out));

    // It comes back when it registers again.
    agents.register(register).await.expect("register again");
    let out = fleetmark(&live.url, &["agents", "--format", "json"]).await;
    assert_eq!(listed(&out), ["gone-for-good", "still-here"]);
}

/// `record(batch, rep, samples)` as another agent and hardware kind, with labels.
fn record_as(batch: u32, rep: u32, agent: &str, kind: &str, labels: &[(&str, &str)]) -> String {
    let mut r: serde_json::Value = serde_json::from_str(&record(batch, rep, 30)).expect("json");
    r["agent_name"] = agent.into();
    r["hardware_kind"] = kind.into();
    r["hardware_name"] = format!("{kind} test device").into();
    r["agent_labels"] = labels
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    r.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_filters_by_sweep_agent_label_and_time_and_shows_intervals() {
    let live = Live::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    // Sweep A: two repetitions on an EU cpu node, one on a US t4 node; sweep B: one more t4.
    let a = import(
        &live,
        dir.path(),
        "a",
        &[
            record_as(1, 0, "eu-node", "cpu", &[("region", "eu")]),
            record_as(1, 1, "eu-node", "cpu", &[("region", "eu")]),
            record_as(1, 0, "us-node", "t4", &[("region", "us")]),
        ],
    )
    .await;
    let b = import(
        &live,
        dir.path(),
        "b",
        &[record_as(1, 2, "us-node", "t4", &[("region", "us")])],
    )
    .await;
    let columns = |args: &[&str]| {
        let url = live.url.clone();
        let args: Vec<String> = ["compare", "--format", "json"]
            .iter()
            .chain(args)
            .map(|s| s.to_string())
            .collect();
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = fleetmark(&url, &refs).await;
            assert_ok(&out);
            let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
            let mut cells: Vec<(String, u64)> = rows
                .as_array()
                .expect("rows")
                .iter()
                .flat_map(|row| {
                    row["hardware"]
                        .as_object()
                        .expect("hardware")
                        .iter()
                        .map(|(k, c)| (k.clone(), c["results"].as_u64().expect("results")))
                        .collect::<Vec<_>>()
                })
                .collect();
            cells.sort();
            (cells, rows)
        }
    };

    let (all, rows) = columns(&[]).await;
    assert_eq!(all, [("cpu".to_string(), 2), ("t4".to_string(), 2)]);
    // Each cell carries its 95% interval, around its median.
    for cell in rows[0]["hardware"].as_object().expect("hardware").values() {
        let ips = cell["images_per_sec"].as_f64().expect("img/s");
        let ci = cell["images_per_sec_ci95"].as_array().expect("an interval");
        let (lo, hi) = (ci[0].as_f64().unwrap(), ci[1].as_f64().unwrap());
        assert!(lo <= hi && lo > 0.0, "{cell}");
        assert!(lo <= ips * 1.5 && hi >= ips / 1.5, "{cell}");
    }

    let (by_sweep, _) = columns(&["--sweep", &b[..8]]).await;
    assert_eq!(by_sweep, [("t4".to_string(), 1)]);
    let (by_sweep, _) = columns(&["--sweep", &a]).await;
    assert_eq!(by_sweep, [("cpu".to_string(), 2), ("t4".to_string(), 1)]);
    // Imported results are filed under "imported/<name>".
    let (by_agent, _) = columns(&["--agent", "imported/eu-node"]).await;
    assert_eq!(by_agent, [("cpu".to_string(), 2)]);
    let (by_label, _) = columns(&["--label", "region=us"]).await;
    assert_eq!(by_label, [("t4".to_string(), 2)]);
    let (both, _) = columns(&["--label", "region=us", "--sweep", "latest"]).await;
    assert_eq!(both, [("t4".to_string(), 1)]);
    let (recent, _) = columns(&["--since", "1h"]).await;
    assert_eq!(recent, all);
    let (before, _) = columns(&["--until", "2020-01-01T00:00:00Z"]).await;
    assert!(before.is_empty(), "{before:?}");

    // The table shows the interval's half width.
    let out = fleetmark(&live.url, &["compare"]).await;
    assert_ok(&out);
    assert!(stdout(&out).contains('±'), "{}", stdout(&out));

    // Bad filters are bad input.
    for bad in [
        vec!["compare", "--label", "region"],
        vec!["compare", "--since", "yesterday-ish"],
        vec!["compare", "--since", "1h", "--until", "2h"],
    ] {
        let out = fleetmark(&live.url, &bad).await;
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", stderr(&out));
    }
}
