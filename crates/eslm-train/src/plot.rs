//! `eslm-train plot RUN_DIR... --out FILE.svg`: validation loss of several runs against training tokens,
//! paper-convention FLOPs, realized FLOPs and training wall-clock, one line per run, in one SVG (plotters' SVG
//! backend: no system fonts or libraries needed). Lines that do not parse (a partial last line left by a crash)
//! and evaluations with a non-finite loss (a diverged run) are skipped with a note on stderr; everything valid is
//! plotted.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::error::{Result, TrainError};
use crate::metrics::{read_metrics_lenient, EvalRecord};

/// Flags of `eslm-train plot`.
#[derive(Debug, Clone, clap::Args)]
pub struct PlotArgs {
    /// Run directories (each with a metrics.jsonl).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Output SVG file.
    #[arg(long, default_value = "eslm-runs.svg")]
    pub out: PathBuf,
}

fn perr(e: impl std::fmt::Display) -> TrainError {
    TrainError::Plot(e.to_string())
}

/// A run's name (its directory's last component), its finite evaluation records, and notes on what was
/// skipped.
fn load_run(dir: &Path) -> Result<(String, Vec<EvalRecord>, Vec<String>)> {
    let path = dir.join("metrics.jsonl");
    let r = read_metrics_lenient(&path)?;
    let mut notes: Vec<String> = r
        .skipped
        .iter()
        .map(|(line, e)| format!("{}: skipped line {line}: {e}", path.display()))
        .collect();
    let total = r.evals.len();
    let evals: Vec<EvalRecord> = r
        .evals
        .into_iter()
        .filter(|e| e.val_loss.is_finite())
        .collect();
    if evals.len() < total {
        notes.push(format!(
            "{}: skipped {} evaluation(s) with a non-finite val loss (a diverged run?)",
            path.display(),
            total - evals.len()
        ));
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string());
    Ok((name, evals, notes))
}

/// Draws the comparison chart of `runs` into `out` (SVG). Returns notes on what was skipped.
pub fn plot_runs(runs: &[PathBuf], out: &Path) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let mut data: Vec<(String, Vec<EvalRecord>)> = Vec::new();
    for d in runs {
        let (name, evals, n) = load_run(d)?;
        notes.extend(n);
        data.push((name, evals));
    }
    if data.iter().all(|(_, e)| e.is_empty()) {
        return Err(TrainError::Plot(
            "no eval records in any metrics.jsonl (train with evaluation on)".into(),
        ));
    }
    let root = SVGBackend::new(out, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(perr)?;
    let panels = root.split_evenly((2, 2));
    type Axis = fn(&EvalRecord) -> f64;
    let axes: [(&str, Axis); 4] = [
        ("training tokens", |e| e.tokens as f64),
        ("FLOPs (paper convention)", |e| e.flops_paper_total),
        ("FLOPs (realized)", |e| e.flops_realized_total),
        ("training wall-clock (s)", |e| e.wall_s),
    ];
    let all: Vec<&EvalRecord> = data.iter().flat_map(|(_, e)| e.iter()).collect();
    let (ymin, ymax) = all
        .iter()
        .map(|e| e.val_loss)
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    let pad = ((ymax - ymin) * 0.05).max(1e-3);
    for (panel, (label, f)) in panels.iter().zip(axes) {
        let xmax = all.iter().map(|e| f(e)).fold(0.0f64, f64::max).max(1e-9);
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("val loss vs {label}"), ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..xmax * 1.02, (ymin - pad)..(ymax + pad))
            .map_err(perr)?;
        chart
            .configure_mesh()
            .x_desc(label)
            .y_desc("val loss")
            .x_label_formatter(&|x| format!("{x:.3e}"))
            .draw()
            .map_err(perr)?;
        for (i, (name, evals)) in data.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let points: Vec<(f64, f64)> = evals.iter().map(|e| (f(e), e.val_loss)).collect();
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(perr)?
                .label(name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(perr)?;
    }
    root.present().map_err(perr)?;
    Ok(notes)
}

/// Runs `eslm-train plot`.
pub fn run_plot(args: &PlotArgs) -> Result<()> {
    for n in plot_runs(&args.runs, &args.out)? {
        eprintln!("note: {n}");
    }
    println!("wrote {}", args.out.display());
    Ok(())
}
