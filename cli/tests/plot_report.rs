//! `fleetmark plot` and `fleetmark report` through the real binary: the PNG files are PNGs of
//! the promised size, the SVG files parse as SVG with the charts' text in them, and the report
//! renders in headless Chromium with its three charts present.
//!
//! Chromium comes from Debian (`.ci/install-chromium.sh`). Without it the report test fails,
//! saying so, unless FLEETMARK_SKIP_BROWSER=1.

mod common;

use std::path::Path;

use common::{fleetmark, record, write, Live};

/// Results for two hardware kinds at three batch sizes, so lines and bars have company.
fn records() -> Vec<String> {
    let mut out = Vec::new();
    for (kind, agent, speed) in [("cpu", "cpu-node", 1.0), ("t4", "t4-node", 0.25)] {
        for batch in [1, 2, 4] {
            let mut r: serde_json::Value = serde_json::from_str(&record(batch, 0, 30)).unwrap();
            r["hardware_kind"] = kind.into();
            r["hardware_name"] = format!("{kind} test device").into();
            r["agent_name"] = agent.into();
            // Faster hardware: scale every latency figure down.
            for key in [
                "mean_ms",
                "std_ms",
                "min_ms",
                "max_ms",
                "p50_ms",
                "p90_ms",
                "p99_ms",
                "ci95_low_ms",
                "ci95_high_ms",
            ] {
                let v = r["latency"][key].as_f64().unwrap() * speed;
                r["latency"][key] = v.into();
            }
            let lat: Vec<f64> = r["latencies_ms"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() * speed)
                .collect();
            r["latencies_ms"] = lat.into();
            let mean = r["latency"]["mean_ms"].as_f64().unwrap();
            r["images_per_sec"] = (batch as f64 * 1000.0 / mean).into();
            out.push(r.to_string());
        }
    }
    out
}

async fn imported(live: &Live, dir: &Path) -> String {
    let file = write(dir, "fleet.jsonl", &(records().join("\n") + "\n"));
    let out = fleetmark(&live.url, &["import", &file, "--name", "two kinds"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Width and height from a PNG's signature and IHDR chunk.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert!(bytes.len() > 24, "too short for a PNG");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR", "IHDR first");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    (w, h)
}

/// Every text node of an SVG document, after parsing it as XML with an <svg> root.
fn svg_texts(text: &str) -> Vec<String> {
    let doc = roxmltree::Document::parse(text).expect("the SVG parses as XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    doc.descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text().map(|t| t.trim().to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plot_writes_valid_png_and_svg_charts() {
    let live = Live::start().await;
    let dir = tempfile::tempdir().unwrap();
    imported(&live, dir.path()).await;
    let out_dir = dir.path().join("charts");
    let out = fleetmark(
        &live.url,
        &[
            "plot",
            "--out-dir",
            out_dir.to_str().unwrap(),
            "--baseline",
            "cpu",
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for chart in ["throughput", "latency", "speedup"] {
        let png = std::fs::read(out_dir.join(format!("{chart}.png"))).expect("the PNG exists");
        assert_eq!(png_size(&png), (1000, 600), "{chart}.png");
        // A drawn chart, not a blank canvas: it compresses far worse than an empty one.
        assert!(png.len() > 10_000, "{chart}.png is {} bytes", png.len());
        let svg = std::fs::read_to_string(out_dir.join(format!("{chart}.svg"))).unwrap();
        let texts = svg_texts(&svg);
        for series in ["cpu", "t4"] {
            assert!(
                texts.iter().any(|t| t == series),
                "{chart}.svg names {series}: {texts:?}"
            );
        }
    }
    let throughput = svg_texts(&std::fs::read_to_string(out_dir.join("throughput.svg")).unwrap());
    assert!(
        throughput.iter().any(|t| t.contains("batch size")),
        "{throughput:?}"
    );
    let speedup = svg_texts(&std::fs::read_to_string(out_dir.join("speedup.svg")).unwrap());
    assert!(speedup.iter().any(|t| t == "b4"), "{speedup:?}");

    // Filters that match nothing are an error (5), and write nothing.
    let empty = dir.path().join("empty");
    let out = fleetmark(
        &live.url,
        &[
            "plot",
            "--agent",
            "nobody",
            "--out-dir",
            empty.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!empty.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_renders_in_a_browser_with_its_charts() {
    let live = Live::start().await;
    let dir = tempfile::tempdir().unwrap();
    let sweep = imported(&live, dir.path()).await;
    let page = dir.path().join("report.html");
    let out = fleetmark(
        &live.url,
        &["report", &sweep[..8], "--out", page.to_str().unwrap()],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = std::fs::read_to_string(&page).unwrap();
    // Inline SVG carries namespace URIs (xmlns="http://www.w3.org/2000/svg"), which fetch
    // nothing; what would fetch is a src/href/url()/@import pointing outside the page.
    let external = [
        "src=\"http",
        "href=\"http",
        "src='http",
        "href='http",
        "url(http",
        "@import",
    ];
    let fetches: Vec<&&str> = external.iter().filter(|e| html.contains(**e)).collect();
    assert!(
        !html.contains("<script") && fetches.is_empty(),
        "self-contained: no scripts, no external resources ({fetches:?})"
    );
    for section in [
        "Correctness gate",
        "GPU telemetry",
        "Fingerprints",
        "Sweep file",
        "Results",
    ] {
        assert!(html.contains(section), "{section}");
    }

    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| {
            std::process::Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
    let Some(chromium) = chromium else {
        if std::env::var("FLEETMARK_SKIP_BROWSER").as_deref() == Ok("1") {
            eprintln!("FLEETMARK_SKIP_BROWSER=1: not rendering the report");
            return;
        }
        panic!(
            "chromium is not installed, so the report cannot be rendered: run .ci/install-chromium.sh \
             (or set FLEETMARK_SKIP_BROWSER=1 to skip this check)"
        );
    };
    let profile = tempfile::tempdir().unwrap();
    let dom = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        tokio::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("--dump-dom")
            .arg(format!("file://{}", page.display()))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finishes")
    .expect("run chromium");
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let dom = String::from_utf8_lossy(&dom.stdout);
    for chart in ["chart-throughput", "chart-latency", "chart-speedup"] {
        let at = dom
            .find(&format!("id=\"{chart}\""))
            .unwrap_or_else(|| panic!("{chart} in the DOM"));
        let figure = &dom[at..];
        let end = figure.find("</figure>").expect("the figure closes");
        assert!(
            figure[..end].contains("<svg"),
            "{chart} holds an svg element"
        );
        assert!(
            figure[..end].contains("<polyline") || figure[..end].contains("<rect"),
            "{chart} has drawn shapes"
        );
    }
}
