//! The planted-dictionary test of crosscoder training: activations are sparse combinations of
//! known atoms — shared atoms present in both models, chat-only atoms only in the chat copy,
//! base-only atoms only in the base copy. A BatchTopK crosscoder trained on them must recover
//! most atoms (cosine > 0.9) and put each chat-only atom in the chat-only decoder-norm class
//! (Δ_norm ≥ 0.9), each base-only atom in the base-only class (Δ_norm < 0.1) and each shared one
//! in the shared class (0.4 ≤ Δ_norm < 0.6).

use std::path::Path;

use candle_core::Device;
use engine::progress::Progress;
use stages::cache::ActivationCache;
use stages::cache::format::{CacheBuilder, StoreDtype};
use stages::rng::SplitMix64;
use stages::train::{StepPath, TrainEnv, TrainParams, load_crosscoder, train};

const D: usize = 16;
const SHARED: usize = 10;
const CHAT_ONLY: usize = 3;
const BASE_ONLY: usize = 3;

/// Atoms as (2, d) row-major, unit norm over both models.
fn atoms(rng: &mut SplitMix64) -> Vec<Vec<f32>> {
    let unit = |rng: &mut SplitMix64| -> Vec<f32> {
        let v: Vec<f64> = (0..D).map(|_| rng.next_f64() * 2.0 - 1.0).collect();
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter().map(|x| (x / n) as f32).collect()
    };
    let mut out = Vec::new();
    for _ in 0..SHARED {
        let u = unit(rng);
        let s = std::f32::consts::FRAC_1_SQRT_2;
        out.push(u.iter().chain(&u).map(|x| x * s).collect());
    }
    for _ in 0..CHAT_ONLY {
        out.push(std::iter::repeat_n(0.0, D).chain(unit(rng)).collect());
    }
    for _ in 0..BASE_ONLY {
        out.push(unit(rng).into_iter().chain(std::iter::repeat_n(0.0, D)).collect());
    }
    out
}

fn write_cache(dir: &Path, atoms: &[Vec<f32>], tokens: usize, seed: u64) -> ActivationCache {
    let mut rng = SplitMix64::new(seed);
    let mut b = CacheBuilder::new(dir, D, StoreDtype::F32, 4096).unwrap();
    let doc = 64;
    for _ in 0..tokens / doc {
        let mut acts = Vec::with_capacity(doc * 2 * D);
        for _ in 0..doc {
            let mut x = vec![0f32; 2 * D];
            for a in atoms {
                if rng.next_f64() < 0.12 {
                    let m = 1.0 + rng.next_f64() as f32;
                    x.iter_mut().zip(a).for_each(|(x, a)| *x += m * a);
                }
            }
            x.iter_mut().for_each(|x| *x += 0.01 * (rng.next_f64() as f32 - 0.5));
            acts.extend(x);
        }
        b.push_doc(&acts, &vec![0; doc]).unwrap();
    }
    b.finish("planted").unwrap();
    ActivationCache::open(dir).unwrap()
}

#[test]
fn batchtopk_recovers_planted_atoms_and_their_classes() {
    planted(StepPath::Auto);
}

/// The same through the sparse step that CUDA runs (here with the CPU step's loops as its
/// kernels), checked against autograd on the first batch: the GPU's host side, end to end.
#[test]
fn the_sparse_step_recovers_them_too() {
    planted(StepPath::Sparse);
}

fn planted(step: StepPath) {
    let tmp = tempfile::tempdir().unwrap();
    let atoms = atoms(&mut SplitMix64::new(7));
    let caches = vec![
        write_cache(&tmp.path().join("web"), &atoms, 24_576, 1),
        write_cache(&tmp.path().join("chat"), &atoms, 24_576, 2),
    ];
    let p: TrainParams = serde_json::from_value(serde_json::json!({
        "k": 2, "dict_size": 48, "batch_size": 256, "epochs": 5, "lr": 3e-3, "warmup_steps": 20,
        "shuffle_window": 4096, "threshold_start_step": 50, "dead_tokens": 20000, "log_every": 50,
    }))
    .unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let never = || false;
    let env = TrainEnv {
        device: Device::Cpu,
        work_dir: tmp.path().join("work"),
        out_dir: out.clone(),
        progress: Progress::detached("train"),
        cancelled: &never,
        step,
    };
    std::fs::create_dir_all(&env.work_dir).unwrap();
    train(&p, caches, Vec::new(), &env).unwrap();

    let (cc, _) = load_crosscoder(&out, &Device::Cpu).unwrap();
    let dec: Vec<Vec<Vec<f32>>> = cc.w_dec.as_tensor().to_vec3().unwrap();
    let latent = |j: usize| -> Vec<f32> { dec[0][j].iter().chain(&dec[1][j]).copied().collect() };
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let mut recovered = 0;
    for (i, atom) in atoms.iter().enumerate() {
        let (best, cos) = (0..cc.f)
            .map(|j| {
                let l = latent(j);
                (j, l.iter().zip(atom).map(|(a, b)| a * b).sum::<f32>() / norm(&l).max(1e-12))
            })
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap();
        if cos > 0.9 {
            recovered += 1;
        }
        let (nb, nc) = (norm(&dec[0][best]), norm(&dec[1][best]));
        let delta = 0.5 * ((nc - nb) / nb.max(nc) + 1.0);
        let class_ok = if i < SHARED {
            (0.4..0.6).contains(&delta)
        } else if i < SHARED + CHAT_ONLY {
            delta >= 0.9
        } else {
            delta < 0.1
        };
        assert!(cos <= 0.9 || class_ok, "atom {i}: best latent {best} (cos {cos:.3}) has Δ_norm {delta:.3}");
    }
    eprintln!("recovered {recovered} of {} planted atoms", atoms.len());
    assert!(recovered * 10 >= atoms.len() * 9, "recovered {recovered} of {} atoms", atoms.len());
}
