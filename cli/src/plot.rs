//! `fleetmark plot`, and the charts inside `fleetmark report`: throughput and latency against
//! batch size (one line per hardware column and precision, so several GPUs share a chart) and
//! speed-up bars against a baseline, drawn with plotters as SVG and PNG.
//!
//! The data is `compare`'s: the same filters, the same columns, the same median per cell.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::OnceLock,
};

use clap::Args;
use plotters::{
    coord::Shift,
    prelude::*,
    style::{register_font, FontStyle},
};

use crate::{
    compare::{self, Cell, Filters, Row},
    CliError, Remote,
};

/// Size of every chart, in pixels (PNG) or user units (SVG).
pub const CHART_SIZE: (u32, u32) = (1000, 600);

/// TrueType fonts tried, in order, when `--font` is not given (Debian, Ubuntu, Fedora, Arch,
/// macOS). The text of a chart must be drawn with some font.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

/// Line and bar colours, distinguishable and in a fixed order so charts are reproducible.
const COLOURS: &[RGBColor] = &[
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

#[derive(Debug, Args)]
pub struct PlotArgs {
    #[command(flatten)]
    pub filters: Filters,
    /// The hardware column the speed-up bars are measured against (as `compare --baseline`).
    #[arg(long)]
    pub baseline: Option<String>,
    /// The folder the charts are written to (created if missing).
    #[arg(long, default_value = "fleetmark-plots")]
    pub out_dir: PathBuf,
    /// A TrueType font for the charts' text [default: DejaVu Sans or another common font].
    #[arg(long)]
    pub font: Option<PathBuf>,
}

/// One line on a chart: a name and (batch size, value) points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// What the three charts show, taken from `compare`'s rows.
#[derive(Debug, Clone)]
pub struct ChartData {
    pub throughput: Vec<Series>,
    pub latency: Vec<Series>,
    /// Bar groups (one per precision and batch size) and, per column, one value per group.
    pub groups: Vec<String>,
    pub bars: Vec<(String, Vec<Option<f64>>)>,
    pub baseline: Option<String>,
}

impl ChartData {
    pub fn from_rows(columns: &[String], rows: &[Row]) -> ChartData {
        let precisions: std::collections::BTreeSet<&str> =
            rows.iter().map(|r| r.precision.as_str()).collect();
        let sizes: std::collections::BTreeSet<u32> = rows.iter().map(|r| r.image_size).collect();
        let name = |col: &str, r: &Row| {
            let mut n = col.to_string();
            if precisions.len() > 1 {
                n.push_str(&format!(" {}", r.precision));
            }
            if sizes.len() > 1 {
                n.push_str(&format!(" {}px", r.image_size));
            }
            n
        };
        let series = |metric: fn(&Cell) -> f64| {
            let mut out: Vec<Series> = Vec::new();
            for col in columns {
                for r in rows {
                    if let Some(cell) = r.hardware.get(col) {
                        let n = name(col, r);
                        let point = (r.batch_size as f64, metric(cell));
                        match out.iter_mut().find(|s| s.name == n) {
                            Some(s) => s.points.push(point),
                            None => out.push(Series {
                                name: n,
                                points: vec![point],
                            }),
                        }
                    }
                }
            }
            for s in &mut out {
                s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
            out
        };
        let groups = rows
            .iter()
            .map(|r| {
                let mut g = format!("b{}", r.batch_size);
                if precisions.len() > 1 {
                    g.push_str(&format!(" {}", r.precision));
                }
                if sizes.len() > 1 {
                    g.push_str(&format!(" {}px", r.image_size));
                }
                g
            })
            .collect();
        let bars = columns
            .iter()
            .map(|c| {
                (
                    c.clone(),
                    rows.iter()
                        .map(|r| r.hardware.get(c).and_then(|cell| cell.speedup))
                        .collect(),
                )
            })
            .collect();
        ChartData {
            throughput: series(|c| c.images_per_sec),
            latency: series(|c| c.p50_ms),
            groups,
            bars,
            baseline: columns.first().cloned(),
        }
    }
}

/// Makes the font available to plotters, once per process: `font`, or the first candidate
/// that exists.
pub fn load_font(font: Option<&Path>) -> Result<(), CliError> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    let explicit = font.map(Path::to_path_buf);
    LOADED
        .get_or_init(|| {
            let candidates: Vec<PathBuf> = match explicit {
                Some(p) => vec![p],
                None => FONT_CANDIDATES.iter().map(PathBuf::from).collect(),
            };
            for path in &candidates {
                let Ok(bytes) = std::fs::read(path) else {
                    continue;
                };
                // plotters keeps fonts for the life of the process; this happens once.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| format!("{} is not a TrueType/OpenType font", path.display()));
            }
            Err(format!(
                "no font to draw the charts' text with (looked for {}); install fonts-dejavu-core or pass --font FILE",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
        .clone()
        .map_err(CliError::Input)
}

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

fn draw_err<E: std::fmt::Debug>(e: E) -> CliError {
    CliError::Other(format!("cannot draw the chart: {e:?}"))
}

/// Lines against batch size (log scale), one per series, with a legend.
pub fn line_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    y_desc: &str,
    series: &[Series],
) -> Result<(), CliError> {
    area.fill(&WHITE).map_err(draw_err)?;
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (lo, hi) = xs.fold((f64::INFINITY, 0.0f64), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    let (lo, hi) = if lo.is_finite() && hi > 0.0 {
        (lo / 1.5, hi * 1.5)
    } else {
        (0.5, 2.0)
    };
    let y_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0f64, f64::max)
        .max(f64::MIN_POSITIVE)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..y_max)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("batch size")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| crate::output::throughput(*y))
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(draw_err)?;
    for (i, s) in series.iter().enumerate() {
        let c = colour(i);
        chart
            .draw_series(LineSeries::new(s.points.clone(), c.stroke_width(3)))
            .map_err(draw_err)?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3)));
        chart
            .draw_series(s.points.iter().map(|p| Circle::new(*p, 5, c.filled())))
            .map_err(draw_err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err)?;
    area.present().map_err(draw_err)
}

/// Grouped bars of speed-up against the baseline (which is 1 by definition), one group per
/// batch size.
pub fn speedup_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    data: &ChartData,
) -> Result<(), CliError> {
    area.fill(&WHITE).map_err(draw_err)?;
    let n = data.groups.len().max(1) as f64;
    let y_max = data
        .bars
        .iter()
        .flat_map(|(_, v)| v.iter().flatten().copied())
        .fold(1.0f64, f64::max)
        * 1.2;
    let title = match &data.baseline {
        Some(b) => format!("Speed-up over {b}"),
        None => "Speed-up".to_string(),
    };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(20)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..n, -y_max * 0.08..y_max)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("× throughput of the baseline")
        .y_label_formatter(&|y| {
            if *y < 0.0 {
                String::new()
            } else {
                format!("{y:.1}")
            }
        })
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(draw_err)?;
    let width = 0.8 / data.bars.len().max(1) as f64;
    for (j, (name, values)) in data.bars.iter().enumerate() {
        let c = colour(j);
        chart
            .draw_series(values.iter().enumerate().filter_map(|(g, v)| {
                let v = (*v)?;
                let x0 = g as f64 + 0.1 + j as f64 * width;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.92, v)],
                    c.filled(),
                ))
            }))
            .map_err(draw_err)?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], c.filled()));
    }
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, 1.0), (n, 1.0)],
            BLACK.stroke_width(1),
        ))
        .map_err(draw_err)?;
    let label_style = TextStyle::from(("sans-serif", 15).into_font()).pos(
        plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Center,
        ),
    );
    chart
        .draw_series(data.groups.iter().enumerate().map(|(g, name)| {
            Text::new(
                name.clone(),
                (g as f64 + 0.5, -y_max * 0.04),
                label_style.clone(),
            )
        }))
        .map_err(draw_err)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err)?;
    area.present().map_err(draw_err)
}

/// The three charts, by file stem.
pub const CHARTS: &[&str] = &["throughput", "latency", "speedup"];

fn draw<DB: DrawingBackend>(
    which: &str,
    area: &DrawingArea<DB, Shift>,
    data: &ChartData,
) -> Result<(), CliError> {
    match which {
        "throughput" => line_chart(
            area,
            "Throughput against batch size",
            "images/s (median)",
            &data.throughput,
        ),
        "latency" => line_chart(
            area,
            "Latency against batch size",
            "p50 latency per batch, ms",
            &data.latency,
        ),
        _ => speedup_chart(area, data),
    }
}

/// One chart as SVG text (for files and for inlining in the report).
pub fn svg(which: &str, data: &ChartData) -> Result<String, CliError> {
    let mut out = String::new();
    {
        let area = SVGBackend::with_string(&mut out, CHART_SIZE).into_drawing_area();
        draw(which, &area, data)?;
    }
    Ok(out)
}

/// One chart as a PNG file.
pub fn png(which: &str, data: &ChartData, path: &Path) -> Result<(), CliError> {
    let area = BitMapBackend::new(path, CHART_SIZE).into_drawing_area();
    draw(which, &area, data)
}

pub async fn run(remote: &mut Remote, args: PlotArgs) -> Result<ExitCode, CliError> {
    load_font(args.font.as_deref())?;
    let cells = args.filters.cells(remote).await?;
    if cells.is_empty() {
        return Err(CliError::NotFound(format!(
            "no results to plot for model {} with these filters",
            args.filters.model
        )));
    }
    let (columns, rows) = compare::build_from(&cells, args.baseline.as_deref())?;
    let data = ChartData::from_rows(&columns, &rows);
    std::fs::create_dir_all(&args.out_dir)
        .map_err(|e| CliError::Other(format!("cannot create {}: {e}", args.out_dir.display())))?;
    for which in CHARTS {
        let svg_path = args.out_dir.join(format!("{which}.svg"));
        std::fs::write(&svg_path, svg(which, &data)?)
            .map_err(|e| CliError::Other(format!("cannot write {}: {e}", svg_path.display())))?;
        let png_path = args.out_dir.join(format!("{which}.png"));
        png(which, &data, &png_path)?;
        note!("wrote {} and {}", svg_path.display(), png_path.display());
    }
    Ok(ExitCode::SUCCESS)
}
