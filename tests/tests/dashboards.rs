//! The Grafana dashboard's SQL, run against a real, migrated and seeded database.
//!
//! Grafana only finds out that a panel's query is wrong when someone opens the dashboard. This
//! runs every panel's and every variable's SQL from `dashboards/fleetmark.json`, with Grafana's
//! macros and variables substituted as the PostgreSQL data source does, and checks the columns
//! each panel needs: the fields its transformation names, a `time` column for time series, and
//! the columns listed below for each panel. It also checks the two memory panels keep GPU pool
//! peaks and CPU RSS apart, and that simulated results never show.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;
use sqlx::{
    postgres::PgPoolOptions, AssertSqlSafe, Column, Executor, PgPool, Row, SqlSafeStr, Statement,
    TypeInfo,
};
use uuid::Uuid;

use fleetmark_e2e::TestDb;

/// What a column's values are, as Grafana sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Number,
    Time,
}

fn kind_of(pg_type: &str) -> Option<Kind> {
    match pg_type {
        "TEXT" | "VARCHAR" | "NAME" => Some(Kind::Text),
        "INT2" | "INT4" | "INT8" | "FLOAT4" | "FLOAT8" | "NUMERIC" => Some(Kind::Number),
        "TIMESTAMPTZ" | "TIMESTAMP" => Some(Kind::Time),
        _ => None,
    }
}

/// The columns each panel must return, by panel title. A panel without an entry fails the test,
/// so a new panel comes with its expectation.
fn expected_columns() -> BTreeMap<&'static str, Vec<(&'static str, Kind)>> {
    use Kind::*;
    let by_batch = |value| vec![("batch", Text), ("hardware_kind", Text), (value, Number)];
    BTreeMap::from([
        ("Images/s by batch size", by_batch("images_per_sec")),
        ("p50 latency by batch size", by_batch("p50_ms")),
        (
            "Images/s over time",
            vec![("time", Time), ("metric", Text), ("images_per_sec", Number)],
        ),
        ("Peak GPU memory by batch size", by_batch("peak_bytes")),
        (
            "Peak CPU memory (process RSS) by batch size",
            by_batch("peak_bytes"),
        ),
        (
            "Latency by GPU kind and batch size",
            vec![
                ("hardware_kind", Text),
                ("batch_size", Number),
                ("runs", Number),
                ("p50_ms", Number),
                ("p99_ms", Number),
                ("images_per_sec", Number),
            ],
        ),
        (
            "Throttled runs",
            vec![
                ("hardware_kind", Text),
                ("throttled", Number),
                ("runs", Number),
            ],
        ),
        (
            "Agents",
            vec![
                ("name", Text),
                ("origin", Text),
                ("last_seen_at", Time),
                ("devices", Number),
                ("price_per_hour", Number),
            ],
        ),
        (
            "Sweeps",
            vec![
                ("name", Text),
                ("state", Text),
                ("created_at", Time),
                ("jobs", Number),
                ("succeeded", Number),
                ("failed", Number),
            ],
        ),
    ])
}

/// The values the dashboard's variables take in this test (the seeded data's values).
const MODEL: &str = "resnet18";
const PRECISION: &str = "f16";
const IMAGE_SIZE: i32 = 224;
const GPU_KINDS: [&str; 2] = ["t4", "a100"];

/// Substitutes Grafana's macros and variables the way its PostgreSQL data source does:
/// `$__timeFilter(col)` becomes a BETWEEN over the dashboard's range, single-value variables are
/// inserted as they are (the SQL quotes them), and multi-value variables become a quoted list.
fn render(sql: &str) -> String {
    let mut out = String::new();
    let mut rest = sql;
    while let Some(i) = rest.find("$__timeFilter(") {
        out.push_str(&rest[..i]);
        let after = &rest[i + "$__timeFilter(".len()..];
        let close = after
            .find(')')
            .expect("$__timeFilter( has its closing parenthesis");
        let col = after[..close].trim();
        out.push_str(&format!(
            "{col} BETWEEN '2020-01-01T00:00:00Z' AND '2100-01-01T00:00:00Z'"
        ));
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    let hardware: Vec<String> = GPU_KINDS
        .iter()
        .chain(["cpu"].iter())
        .map(|k| format!("'{k}'"))
        .collect();
    let out = out
        .replace("$hardware", &hardware.join(","))
        .replace("$model", MODEL)
        .replace("$precision", PRECISION)
        .replace("$image_size", &IMAGE_SIZE.to_string());
    assert!(
        !out.contains('$'),
        "a Grafana macro or variable the test does not know is left in: {out}"
    );
    out
}

fn dashboard() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../dashboards/fleetmark.json");
    let text = std::fs::read_to_string(path).expect("dashboards/fleetmark.json is readable");
    serde_json::from_str(&text).expect("dashboards/fleetmark.json is JSON")
}

/// One result row per (GPU kind, batch), plus a CPU and a simulated result, all in one
/// imported sweep (imported sweeps may hold succeeded jobs and their results directly).
async fn seed(pool: &PgPool) {
    let agent = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO agents (id, name, inventory, devices, origin, price_per_hour)
         VALUES ($1, 'seed-agent', '{}'::jsonb, '[{\"id\": \"cuda:0\"}]'::jsonb, 'imported', 1.5)",
    )
    .bind(agent)
    .execute(pool)
    .await
    .expect("seed agent");
    let sweep = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO sweeps (id, name, spec, spec_toml, state) \
         VALUES ($1, 'seed', '{}'::jsonb, '', 'imported')",
    )
    .bind(sweep)
    .execute(pool)
    .await
    .expect("seed sweep");
    let mut rows: Vec<(&str, i32, &str, bool)> = Vec::new();
    for kind in GPU_KINDS {
        for batch in [1, 8, 32] {
            rows.push((kind, batch, "device-allocations", false));
        }
    }
    rows.push(("cpu", 1, "process-rss", false));
    rows.push(("cpu", 8, "process-rss", false));
    rows.push(("t4", 64, "simulated", true));
    for (seq, (kind, batch, scope, simulated)) in rows.into_iter().enumerate() {
        let job = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO jobs (id, sweep_id, seq, spec, target, state, attempt, finished_at) \
             VALUES ($1, $2, $3, '{}'::jsonb, $4, 'succeeded', 1, now())",
        )
        .bind(job)
        .bind(sweep)
        .bind(seq as i32)
        .bind(kind)
        .execute(pool)
        .await
        .expect("seed job");
        let ips = 100.0 * f64::from(batch) * if kind == "a100" { 4.0 } else { 1.0 };
        sqlx::query(
            "INSERT INTO results (id, job_id, sweep_id, agent_id, attempt, model, batch_size, \
               precision, image_size, hardware_kind, hardware_name, device, backend, path, math, \
               simulated, throttled, mean_ms, std_ms, p50_ms, p90_ms, p99_ms, ci95_low_ms, \
               ci95_high_ms, images_per_sec, peak_memory_bytes, latencies_ms, record, finished_at) \
             VALUES ($1, $2, $3, $4, 1, $5, $6, $7, $8, $9, $9, 'cuda:0', 'candle', 'stock', \
               'default', $10, $11, 2.0, 0.1, 2.0, 2.1, 2.5, 1.9, 2.1, $12, $13, \
               ARRAY[2.0, 2.1]::float8[], jsonb_build_object('memory_scope', $14::text), now())",
        )
        .bind(Uuid::new_v4())
        .bind(job)
        .bind(sweep)
        .bind(agent)
        .bind(MODEL)
        .bind(batch)
        .bind(PRECISION)
        .bind(IMAGE_SIZE)
        .bind(kind)
        .bind(simulated)
        .bind(batch == 32)
        .bind(ips)
        .bind(i64::from(batch) * (1 << 20))
        .bind(scope)
        .execute(pool)
        .await
        .expect("seed result");
    }
}

/// Runs one query and returns its column names with their kinds, and its rows as text
/// (`NULL` for nulls) by column name.
async fn run(
    pool: &PgPool,
    what: &str,
    sql: &str,
) -> (Vec<(String, Kind)>, Vec<BTreeMap<String, String>>) {
    let rendered = render(sql);
    // Column types come from the prepared statement, as Grafana's driver sees them.
    let stmt = pool
        .prepare(AssertSqlSafe(rendered.clone()).into_sql_str())
        .await
        .unwrap_or_else(|e| panic!("{what}: the query fails: {e}\n{rendered}"));
    let columns: Vec<(String, Kind)> = stmt
        .columns()
        .iter()
        .map(|c| {
            let ty = c.type_info().name().to_string();
            let kind =
                kind_of(&ty).unwrap_or_else(|| panic!("{what}: column {} has type {ty}", c.name()));
            (c.name().to_string(), kind)
        })
        .collect();
    let as_text = format!(
        "SELECT {} FROM ({rendered}) AS q",
        columns
            .iter()
            .map(|(n, _)| format!("\"{n}\"::text AS \"{n}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let rows = sqlx::query(AssertSqlSafe(as_text))
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"))
        .into_iter()
        .map(|r| {
            columns
                .iter()
                .map(|(n, _)| {
                    let v: Option<String> = r.try_get(n.as_str()).expect("text column");
                    (n.clone(), v.unwrap_or_else(|| "NULL".into()))
                })
                .collect()
        })
        .collect();
    (columns, rows)
}

fn panel_sql(panel: &Value) -> Vec<(String, String)> {
    panel["targets"]
        .as_array()
        .unwrap_or_else(|| panic!("panel {} has no targets", panel["title"]))
        .iter()
        .map(|t| {
            (
                t["format"].as_str().unwrap_or("table").to_string(),
                t["rawSql"]
                    .as_str()
                    .unwrap_or_else(|| {
                        panic!("panel {} has a target without rawSql", panel["title"])
                    })
                    .to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn every_panel_query_returns_the_columns_its_panel_needs() {
    let db = TestDb::new().await;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&db.url)
        .await
        .expect("connect");
    sqlx::migrate!("../migrations")
        .run(&pool)
        .await
        .expect("migrations apply");
    seed(&pool).await;

    let dash = dashboard();
    let mut expected = expected_columns();
    let mut seen = BTreeSet::new();
    for panel in dash["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().expect("panel title");
        let want = expected
            .remove(title)
            .unwrap_or_else(|| panic!("panel {title:?} has no expected columns in this test"));
        seen.insert(title);
        for (format, sql) in panel_sql(panel) {
            let (columns, rows) = run(&pool, title, &sql).await;
            let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
            let got: Vec<(&str, Kind)> = columns.iter().map(|(n, k)| (n.as_str(), *k)).collect();
            assert_eq!(got, want, "panel {title:?}: columns");
            assert!(
                !rows.is_empty(),
                "panel {title:?} shows nothing on seeded data"
            );
            if format == "time_series" || panel["type"] == "timeseries" {
                assert_eq!(
                    columns.first().map(|(n, k)| (n.as_str(), *k)),
                    Some(("time", Kind::Time)),
                    "panel {title:?}: a time series needs a leading time column"
                );
            }
            for t in panel["transformations"].as_array().into_iter().flatten() {
                if t["id"] == "groupingToMatrix" {
                    let o = &t["options"];
                    let (row, col, val) = (
                        o["rowField"].as_str().expect("rowField"),
                        o["columnField"].as_str().expect("columnField"),
                        o["valueField"].as_str().expect("valueField"),
                    );
                    for f in [row, col, val] {
                        assert!(
                            names.contains(&f),
                            "panel {title:?}: no column {f} for the matrix"
                        );
                    }
                    // A repeated (row, column) pair would be silently dropped by the matrix.
                    let pairs: BTreeSet<(&String, &String)> =
                        rows.iter().map(|r| (&r[row], &r[col])).collect();
                    assert_eq!(pairs.len(), rows.len(), "panel {title:?}: repeated cells");
                }
            }
            check_panel_rows(title, &rows);
        }
    }
    assert!(
        expected.is_empty(),
        "expected panels missing from the dashboard: {:?}",
        expected.keys()
    );

    for var in dash["templating"]["list"].as_array().expect("variables") {
        if var["type"] != "query" {
            continue;
        }
        let name = var["name"].as_str().expect("variable name");
        let sql = var["query"].as_str().expect("variable query");
        let (columns, rows) = run(&pool, name, sql).await;
        assert_eq!(columns.len(), 1, "variable {name} returns one column");
        assert!(!rows.is_empty(), "variable {name} offers no values");
    }
}

/// Row checks that need the seeded values: GPU and CPU memory apart, no simulated results.
fn check_panel_rows(title: &str, rows: &[BTreeMap<String, String>]) {
    let kinds: BTreeSet<&str> = rows
        .iter()
        .filter_map(|r| r.get("hardware_kind").map(String::as_str))
        .collect();
    match title {
        "Peak GPU memory by batch size" => {
            assert_eq!(kinds, BTreeSet::from(GPU_KINDS), "{title}: only GPU kinds")
        }
        "Peak CPU memory (process RSS) by batch size" => {
            assert_eq!(kinds, BTreeSet::from(["cpu"]), "{title}: only CPU")
        }
        _ => {}
    }
    // The simulated result is the only batch 64 row.
    for r in rows {
        for col in ["batch", "batch_size"] {
            assert_ne!(
                r.get(col).map(String::as_str),
                Some("64"),
                "{title}: a simulated result is shown"
            );
        }
    }
}

#[test]
fn the_dashboard_imports_with_a_data_source_picker() {
    let dash = dashboard();
    let inputs = dash["__inputs"].as_array().expect("__inputs");
    let input = inputs
        .iter()
        .find(|i| i["type"] == "datasource")
        .expect("a datasource input");
    let name = input["name"].as_str().expect("input name");
    let plugin = input["pluginId"].as_str().expect("pluginId");
    // The data source variable defaults to the picked data source; every panel and query uses
    // the variable, so nothing points at a data source uid of the author's Grafana.
    let var = dash["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a data source variable");
    assert_eq!(var["query"], plugin);
    assert_eq!(var["current"]["value"], format!("${{{name}}}"));
    let var_ref = format!("${{{}}}", var["name"].as_str().expect("name"));
    let text = dash.to_string();
    for p in dash["panels"].as_array().expect("panels") {
        assert_eq!(p["datasource"]["uid"], var_ref.as_str(), "{}", p["title"]);
        for t in p["targets"].as_array().expect("targets") {
            assert_eq!(t["datasource"]["uid"], var_ref.as_str(), "{}", p["title"]);
        }
    }
    assert!(
        !text.contains("fleetmark-pg"),
        "a hard-coded data source uid"
    );
}
