//! Speed of the `plot` stage's drawing at the paper's size, for bench/plot.sh (which compares it
//! with bench/plot_matplotlib.py, the same figures in matplotlib as the original draws them).
//!
//! ```text
//! cargo build --release -p pipe-stages --example plot_bench
//! plot_bench gen DIR N STEPS    # DIR/latents.parquet + DIR/latents.csv (N latents), DIR/metrics.jsonl (STEPS steps)
//! plot_bench draw DIR OUT       # every figure of the plot stage, PNG + SVG, into OUT
//! ```
//!
//! `gen`: `stages::plot::synthetic::synthetic_table(N, 1)` (the columns `scale` writes when
//! joined with `collect` statistics, shaped like a BatchTopK crosscoder's) and
//! `synthetic_metrics(STEPS, 50, 5000, 1.0)` (a line every 50 steps, validation every 5,000).
//! `draw`: reads the parquet table and `metrics.jsonl` as the stage does and calls
//! `stages::plot::stage::draw_figures` with the stage's default parameters (1600 × 1000, both
//! formats). Prints one JSON line: latents, figures, files, seconds (reading included), VmHWM.

use std::path::Path;
use std::time::Instant;

use stages::latents::{ClassThresholds, LatentTable};
use stages::plot::PlotParams;
use stages::plot::data::{Latents, TrainLog};
use stages::plot::stage::draw_figures;
use stages::plot::synthetic::{synthetic_metrics, synthetic_table};

fn vm_hwm_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("gen") if args.len() == 5 => {
            let dir = Path::new(&args[2]);
            let n: usize = args[3].parse().expect("N");
            let steps: usize = args[4].parse().expect("STEPS");
            std::fs::create_dir_all(dir).unwrap();
            let table = synthetic_table(n, 1);
            table.write_parquet(&dir.join("latents.parquet")).unwrap();
            table.write_csv(&dir.join("latents.csv")).unwrap();
            std::fs::write(dir.join("metrics.jsonl"), synthetic_metrics(steps, 50, 5000, 1.0)).unwrap();
        }
        Some("draw") if args.len() == 4 => {
            let (dir, out) = (Path::new(&args[2]), Path::new(&args[3]));
            std::fs::create_dir_all(out).unwrap();
            let params: PlotParams = serde_json::from_str("{}").unwrap();
            let start = Instant::now();
            let table = LatentTable::read_parquet(&dir.join("latents.parquet")).unwrap();
            let latents = Latents::from_table(&table, "synthetic", &ClassThresholds::default()).unwrap();
            let log = TrainLog::read(&dir.join("metrics.jsonl"), "synthetic").unwrap();
            let index = draw_figures(&params, &[latents], &[log], out).unwrap();
            let seconds = start.elapsed().as_secs_f64();
            let files = std::fs::read_dir(out).unwrap().count();
            println!(
                "{}",
                serde_json::json!({
                    "latents": table.rows(), "figures": index.len(), "files": files,
                    "seconds": seconds, "vm_hwm_mb": vm_hwm_mb(),
                })
            );
        }
        _ => {
            eprintln!("usage: plot_bench gen DIR N STEPS | plot_bench draw DIR OUT");
            std::process::exit(2);
        }
    }
}
