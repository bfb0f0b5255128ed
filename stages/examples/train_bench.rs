//! Training speed and memory of the `train` stage's loop (`stages::train::train`) on synthetic
//! activation caches, for bench/train.sh (which compares it with bench/train_torch.py).
//!
//! ```text
//! cargo build --release -p pipe-stages --example train_bench
//! train_bench gen DIR TOKENS D DTYPE [SEED]   # two caches DIR/web, DIR/chat of TOKENS pairs each
//! train_bench run DIR LOSS STEPS [KEY=VALUE...]  # LOSS = batchtopk | l1; extra TrainParams as JSON values
//! TRAIN_BENCH_AUTOGRAD=1 train_bench run ...     # through candle's autograd, not the CPU step
//! ```
//!
//! `gen`: every token is a sparse combination of 16 of 1,024 random unit atoms over (2, d) (shared
//! by both models, chat-only or base-only), magnitudes in [0.5, 1.5), plus uniform noise of
//! amplitude 0.01; DTYPE = f32 | bf16 | f16; shards of 100,000 tokens.
//!
//! `run`: d from the caches; k = 32, dict_size = 4096, batch 512, lr 1e-4, log_every 50,
//! checkpoint_every 10⁹ unless overridden, `max_steps` = STEPS. Prints one JSON line: the wall time
//! of `train()` (init, the steps, the final write; cache writing excluded), steps/s, and memory:
//! VmHWM (peak RSS, which counts the touched pages of the mmapped caches too) and the peaks of
//! RssAnon and RssFile sampled every 20 ms by a thread.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::Device;
use engine::progress::Progress;
use stages::cache::ActivationCache;
use stages::cache::format::{CacheBuilder, StoreDtype};
use stages::rng::SplitMix64;
use stages::train::{StepPath, TrainEnv, TrainParams, train};

const ATOMS: usize = 1024;
const ACTIVE: usize = 16;

fn generate(dir: &Path, tokens: usize, d: usize, dtype: StoreDtype, seed: u64) {
    let mut rng = SplitMix64::new(seed);
    let unit = |rng: &mut SplitMix64, n: usize| -> Vec<f32> {
        let v: Vec<f64> = (0..n).map(|_| rng.next_f64() * 2.0 - 1.0).collect();
        let s = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter().map(|x| (x / s) as f32).collect()
    };
    // The same atoms in both caches (seed 7); 80% shared, 10% chat-only, 10% base-only.
    let mut arng = SplitMix64::new(7);
    let atoms: Vec<Vec<f32>> = (0..ATOMS)
        .map(|i| match i * 10 / ATOMS {
            0 => std::iter::repeat_n(0.0, d).chain(unit(&mut arng, d)).collect(),
            1 => unit(&mut arng, d).into_iter().chain(std::iter::repeat_n(0.0, d)).collect(),
            _ => unit(&mut arng, 2 * d),
        })
        .collect();
    let mut b = CacheBuilder::new(dir, d, dtype, 100_000).unwrap();
    let doc = 1000;
    let mut left = tokens;
    while left > 0 {
        let n = doc.min(left);
        let mut acts = vec![0f32; n * 2 * d];
        for row in acts.chunks_exact_mut(2 * d) {
            for x in row.iter_mut() {
                *x = 0.02 * (rng.next_f64() as f32 - 0.5);
            }
            for _ in 0..ACTIVE {
                let a = &atoms[rng.below(ATOMS as u64) as usize];
                let m = 0.5 + rng.next_f64() as f32;
                row.iter_mut().zip(a).for_each(|(x, a)| *x += m * a);
            }
        }
        b.push_doc(&acts, &vec![0; n]).unwrap();
        left -= n;
    }
    b.finish("train_bench synthetic").unwrap();
}

/// (VmHWM, RssAnon, RssFile) in bytes, from /proc/self/status.
fn mem() -> (u64, u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> u64 {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmHWM:"), field("RssAnon:"), field("RssFile:"))
}

fn run(dir: &Path, loss: &str, steps: u64, extra: &[String]) {
    let mut params = serde_json::json!({
        "loss": loss, "k": 32, "dict_size": 4096, "batch_size": 512, "lr": 1e-4, "log_every": 50,
        "checkpoint_every": 1_000_000_000u64, "max_steps": steps, "epochs": 1000,
    });
    for kv in extra {
        let (k, v) = kv.split_once('=').expect("KEY=VALUE");
        params[k] = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.into()));
    }
    let p: TrainParams = serde_json::from_value(params.clone()).unwrap();
    let caches: Vec<ActivationCache> =
        ["web", "chat"].iter().map(|c| ActivationCache::open(&dir.join(c)).unwrap()).collect();
    let tokens: u64 = caches.iter().map(|c| c.len()).sum();
    let scratch = tempfile::tempdir_in(dir).unwrap();
    let env_dirs = (scratch.path().join("work"), scratch.path().join("out"));
    std::fs::create_dir_all(&env_dirs.0).unwrap();
    std::fs::create_dir_all(&env_dirs.1).unwrap();
    let never = || false;
    let env = TrainEnv {
        device: Device::Cpu,
        work_dir: env_dirs.0,
        out_dir: env_dirs.1,
        progress: Progress::detached("train"),
        cancelled: &never,
        // TRAIN_BENCH_AUTOGRAD=1: candle's autograd instead of the CPU step (before/after
        // comparisons); TRAIN_BENCH_SPARSE=1: the GPU's sparse BatchTopK step.
        step: if std::env::var("TRAIN_BENCH_AUTOGRAD").is_ok_and(|v| v == "1") {
            StepPath::Autograd
        } else if std::env::var("TRAIN_BENCH_SPARSE").is_ok_and(|v| v == "1") {
            StepPath::Sparse
        } else {
            StepPath::Auto
        },
    };

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut anon, mut file) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let (_, a, f) = mem();
                anon = anon.max(a);
                file = file.max(f);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            (anon, file)
        })
    };
    let t = Instant::now();
    let summary = train(&p, caches, Vec::new(), &env).unwrap();
    let secs = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (anon, file) = sampler.join().unwrap();
    let (hwm, _, _) = mem();
    let get = |k: &str| summary.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let out = serde_json::json!({
        "impl": match env.step { StepPath::Autograd => "pipe-autograd", StepPath::Sparse => "pipe-sparse", StepPath::Auto => "pipe" }, "loss": loss, "steps": steps, "tokens_in_store": tokens, "seconds": secs,
        "steps_per_s": steps as f64 / secs, "vm_hwm": hwm, "peak_rss_anon": anon, "peak_rss_file": file,
        "final_loss": get("train/loss"), "final_l0": get("train/l0"),
        "final_fve": get("train/frac_variance_explained"),
        "threads": rayon_threads(),
    });
    println!("{out}");
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("gen") if args.len() >= 5 => {
            let dir = Path::new(&args[1]);
            let (tokens, d) = (args[2].parse().unwrap(), args[3].parse().unwrap());
            let dtype: StoreDtype =
                serde_json::from_value(serde_json::Value::String(args[4].clone())).unwrap();
            let seed: u64 = args.get(5).map_or(1, |s| s.parse().unwrap());
            let t = Instant::now();
            generate(&dir.join("web"), tokens, d, dtype, seed);
            generate(&dir.join("chat"), tokens, d, dtype, seed + 1);
            eprintln!(
                "wrote 2 × {tokens} pairs of d = {d} ({dtype:?}) in {:.1} s",
                t.elapsed().as_secs_f64()
            );
        }
        Some("run") if args.len() >= 4 => {
            run(Path::new(&args[1]), &args[2], args[3].parse().unwrap(), &args[4..]);
        }
        _ => {
            eprintln!("usage: train_bench gen DIR TOKENS D DTYPE [SEED] | run DIR LOSS STEPS [KEY=VALUE...]");
            std::process::exit(2);
        }
    }
}
