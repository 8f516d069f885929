//! Every coordinator requires a token: the CLI and agents without one, or with a wrong one, are
//! refused with a message that says so, and fail at once instead of retrying forever.

use fleetmark_e2e::*;

fn assert_refused(out: &std::process::Output, needle: &str) {
    let err = stderr(out);
    // 4: authentication failed or permission denied (`fleetmark --help`).
    assert_eq!(out.status.code(), Some(4), "exit code; stderr:\n{err}");
    assert!(err.starts_with("error:"), "stderr:\n{err}");
    assert!(
        err.contains("token"),
        "the message mentions the token:\n{err}"
    );
    assert!(err.contains(needle), "expected {needle:?} in:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(stdout(out).is_empty(), "nothing on stdout: {}", stdout(out));
}

#[tokio::test]
async fn a_missing_or_wrong_token_is_refused_clearly() {
    let dir = scratch();
    let db = TestDb::new().await;
    let opts = CoordinatorOpts::default();
    let coord = Coordinator::start("coordinator", dir.path(), &db.url, free_port(), &opts).await;
    let url = coord.url.as_str();
    let pool = pool(&db.url).await;

    // The CLI, without a token and with a wrong one.
    assert_refused(&cli(url, Some(""), &["sweeps"]).await, "requires a token");
    assert_refused(&cli(url, Some("wrong"), &["sweeps"]).await, "wrong token");
    assert_refused(&cli(url, Some("wrong"), &["agents"]).await, "wrong token");
    let submit = [
        "submit",
        "--batch",
        "1",
        "--image-size",
        "32",
        "--min-iterations",
        "1",
        "--min-duration",
        "10ms",
    ];
    assert_refused(&cli(url, Some(""), &submit).await, "requires a token");
    let almost = format!("{}x", coord.token.as_deref().expect("admin token"));
    assert_refused(&cli(url, Some(&almost), &submit).await, "wrong token");
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM sweeps")
        .fetch_one(&pool)
        .await
        .expect("count sweeps");
    assert_eq!(queued, 0, "a refused submit queues nothing");

    // Agents: they give up at once, saying why.
    let mut wrong = start_agent("agent-wrong", dir.path(), url, "cpu", &["--token", "nope"]);
    let mut none = start_agent("agent-none", dir.path(), url, "cpu", &["--token", ""]);
    for agent in [&mut wrong, &mut none] {
        let status = agent.wait_exit(START_TIMEOUT).await;
        let log = agent.log();
        assert!(!status.success(), "{} must fail; log:\n{log}", agent.name());
        assert!(
            log.contains("refused"),
            "{} says it was refused:\n{log}",
            agent.name()
        );
        assert!(
            log.contains("token"),
            "{} mentions the token:\n{log}",
            agent.name()
        );
        assert!(!log.contains("panicked"), "{log}");
    }
    let registered: i64 = sqlx::query_scalar("SELECT count(*) FROM agents")
        .fetch_one(&pool)
        .await
        .expect("count agents");
    assert_eq!(registered, 0, "a refused agent is not registered");

    // With the right token everything works.
    let _good = start_agent("agent-good", dir.path(), url, "cpu", &[]);
    wait_agents_online(&coord.client(), &["agent-good"]).await;
    let out = cli(url, None, &["agents"]).await;
    assert_success(&out, "fleetmark agents with the token");
    assert!(stdout(&out).contains("agent-good"), "{}", stdout(&out));
    let out = cli(url, None, &submit).await;
    assert_success(&out, "fleetmark submit with the token");
    parse_id(&out);
}
