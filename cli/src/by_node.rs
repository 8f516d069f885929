//! `fleetmark compare --by-node`: how far nodes of one GPU kind disagree at each point.
//!
//! Two rented "H100" nodes can differ by 15% (clocks, power caps, PCIe, a noisy neighbour),
//! and a plain comparison hides it behind one median. Here every (model, precision, batch,
//! size, kind, path) point is split by node: a distinct GPU (its UUID) or, for CPUs and
//! records without one, a host and device. The coordinator aggregates each node in SQL
//! (`CompareRequest.by_node`); this module summarises the nodes of each point: how many, the
//! median of their medians, the slowest and fastest, the spread, and which nodes sit more than
//! [`SLOW_NODE_FRACTION`] below the median of their kind there.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    compare::Summary,
    output::{csv, fitted_table, throughput},
    Format, View,
};

/// A node more than this fraction below the median of its kind at a point is flagged.
pub const SLOW_NODE_FRACTION: f64 = 0.10;

/// One node at one point.
#[derive(Debug, Clone, Serialize)]
pub struct NodeCell {
    /// The GPU UUID, or host/device.
    pub node: String,
    /// The agents that ran on it, joined with '+'.
    pub agents: String,
    pub results: usize,
    /// Median throughput of the node's results at this point.
    pub images_per_sec: f64,
    /// images_per_sec / the point's median - 1.
    pub vs_median: f64,
    pub slow: bool,
    /// Some of its results came from a device whose health check in force was flagged.
    pub health_flagged: bool,
}

/// The nodes of one kind at one point.
#[derive(Debug, Clone, Serialize)]
pub struct NodeSpread {
    pub model: String,
    pub precision: String,
    pub batch_size: u32,
    pub image_size: u32,
    pub hardware_kind: String,
    pub path: String,
    /// How many distinct nodes the point rests on.
    pub nodes: usize,
    /// Median of the nodes' medians.
    pub median_images_per_sec: f64,
    pub min_images_per_sec: f64,
    pub max_images_per_sec: f64,
    /// max / min - 1 across nodes (0 with one node).
    pub spread: f64,
    pub node_cells: Vec<NodeCell>,
}

/// Groups per-node cells (from `CompareResults` with `by_node`) into one spread per point.
pub fn spreads(cells: &[Summary]) -> Vec<NodeSpread> {
    type Key = (String, String, u32, u32, String, String);
    let mut points: BTreeMap<Key, Vec<&Summary>> = BTreeMap::new();
    for c in cells {
        let key = (
            c.model.clone(),
            c.precision.clone(),
            c.batch_size,
            c.image_size,
            c.hardware_kind.clone(),
            c.path.clone(),
        );
        points.entry(key).or_default().push(c);
    }
    points
        .into_iter()
        .map(
            |((model, precision, batch_size, image_size, kind, path), nodes)| {
                let ips: Vec<f64> = nodes.iter().map(|n| n.images_per_sec).collect();
                let mid = fleetmark_core::stats::median(&ips).unwrap_or(0.0);
                let min = ips.iter().copied().fold(f64::INFINITY, f64::min);
                let max = ips.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let node_cells = nodes
                    .iter()
                    .map(|n| {
                        let vs = if mid > 0.0 {
                            n.images_per_sec / mid - 1.0
                        } else {
                            0.0
                        };
                        NodeCell {
                            node: n.node.clone(),
                            agents: n.agents.clone(),
                            results: n.results,
                            images_per_sec: n.images_per_sec,
                            vs_median: vs,
                            slow: vs < -SLOW_NODE_FRACTION,
                            health_flagged: n.health_flagged > 0,
                        }
                    })
                    .collect();
                NodeSpread {
                    model,
                    precision,
                    batch_size,
                    image_size,
                    hardware_kind: kind,
                    path,
                    nodes: nodes.len(),
                    median_images_per_sec: mid,
                    min_images_per_sec: min,
                    max_images_per_sec: max,
                    spread: if min > 0.0 { max / min - 1.0 } else { 0.0 },
                    node_cells,
                }
            },
        )
        .collect()
}

/// A node's name for a table: a GPU UUID shortened to its first 12 characters.
fn short(node: &str) -> String {
    if node.starts_with("GPU-") && node.chars().count() > 12 {
        format!("{}…", node.chars().take(12).collect::<String>())
    } else {
        node.to_string()
    }
}

/// The table (or CSV, or JSON) of [`spreads`].
pub fn render(spreads: &[NodeSpread], view: View) -> String {
    if view.format == Format::Json {
        return format!("{}\n", serde_json::to_string_pretty(spreads).expect("json"));
    }
    let plain = view.format == Format::Csv;
    let header = [
        "precision",
        "batch",
        "hardware",
        "nodes",
        "median img/s",
        "spread",
        "slow nodes",
        "health-flagged",
    ];
    let rows = spreads
        .iter()
        .map(|s| {
            let slow: Vec<String> = s
                .node_cells
                .iter()
                .filter(|n| n.slow)
                .map(|n| {
                    if plain {
                        format!("{}:{:.3}", n.node, n.vs_median)
                    } else if !view.wide {
                        format!("{} {:+.0}%", short(&n.node), n.vs_median * 100.0)
                    } else {
                        format!(
                            "{} ({}, {:+.0}%)",
                            short(&n.node),
                            n.agents,
                            n.vs_median * 100.0
                        )
                    }
                })
                .collect();
            let hardware = if s.path.is_empty() {
                s.hardware_kind.clone()
            } else {
                format!("{}/{}", s.hardware_kind, s.path)
            };
            vec![
                s.precision.clone(),
                s.batch_size.to_string(),
                hardware,
                s.nodes.to_string(),
                if plain {
                    format!("{:.1}", s.median_images_per_sec)
                } else {
                    throughput(s.median_images_per_sec)
                },
                if plain {
                    format!("{:.4}", s.spread)
                } else {
                    format!("{:.1}%", s.spread * 100.0)
                },
                if plain {
                    slow.join(";")
                } else if slow.is_empty() {
                    "-".into()
                } else {
                    slow.join(", ")
                },
                s.node_cells
                    .iter()
                    .filter(|n| n.health_flagged)
                    .count()
                    .to_string(),
            ]
        })
        .collect();
    if plain {
        return csv(&header, rows);
    }
    let mut out = fitted_table(&header, rows, 3, view.wide);
    out.push_str(&format!(
        "spread: fastest node / slowest - 1; slow: more than {:.0}% below the point's median node\n\
         health-flagged: nodes whose health check was more than 10% below their kind's median\n",
        SLOW_NODE_FRACTION * 100.0
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(kind: &str, node: &str, ips: f64) -> Summary {
        Summary {
            model: "resnet18".into(),
            precision: "f16".into(),
            batch_size: 16,
            image_size: 224,
            hardware_kind: kind.into(),
            path: "fused".into(),
            results: 2,
            images_per_sec: ips,
            p50_ms: 1.0,
            math: "f16".into(),
            peak_memory_bytes: 0,
            price_per_hour: None,
            images_per_sec_ci95: None,
            repetitions: None,
            windows: Vec::new(),
            node: node.into(),
            agents: format!("agent-{node}"),
            health_flagged: 0,
        }
    }

    #[test]
    fn a_node_well_below_its_kind_is_flagged_and_the_spread_counted() {
        let cells = [
            node("h100", "GPU-aaaaaaaa-1111", 10_000.0),
            node("h100", "GPU-bbbbbbbb-2222", 10_200.0),
            node("h100", "GPU-cccccccc-3333", 8_500.0),
            node("a100", "GPU-dddddddd-4444", 6_000.0),
        ];
        let s = spreads(&cells);
        assert_eq!(s.len(), 2);
        let h100 = s.iter().find(|s| s.hardware_kind == "h100").unwrap();
        assert_eq!(h100.nodes, 3);
        assert_eq!(h100.median_images_per_sec, 10_000.0);
        assert!((h100.spread - (10_200.0 / 8_500.0 - 1.0)).abs() < 1e-12);
        let slow: Vec<&str> = h100
            .node_cells
            .iter()
            .filter(|n| n.slow)
            .map(|n| n.node.as_str())
            .collect();
        assert_eq!(slow, ["GPU-cccccccc-3333"]);
        // One node: nothing to compare it with, so nothing is flagged.
        let a100 = s.iter().find(|s| s.hardware_kind == "a100").unwrap();
        assert_eq!((a100.nodes, a100.spread), (1, 0.0));
        assert!(a100.node_cells.iter().all(|n| !n.slow));
        let table = render(
            &s,
            View {
                format: Format::Table,
                wide: true,
            },
        );
        assert!(
            table.contains("GPU-cccccccc… (agent-GPU-cccccccc-3333, -15%)"),
            "{table}"
        );
        assert!(table.contains("20.0%"), "{table}");
    }
}
