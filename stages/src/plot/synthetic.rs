//! Synthetic inputs of paper-like shape for the figure tests and the plot benchmark: a latent
//! table with the columns a `scale` stage joined with `collect` statistics writes, and a
//! `metrics.jsonl` as `train` writes it. Seeded ([`SplitMix64`]), so the same call gives the same
//! table on every machine.

use crate::latents::{Class, ClassThresholds, Column, LatentTable};
use crate::rng::SplitMix64;

fn normal(r: &mut SplitMix64, mean: f64, std: f64) -> f64 {
    let (u, v) = (r.next_f64().max(1e-12), r.next_f64());
    mean + std * (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
}

/// `n` latents shaped like a BatchTopK crosscoder's: 85 % shared around Δ_norm 0.5, 5 % chat-only,
/// 2 % base-only, the rest spread over [0, 1], 2 % dead; the effective chat-only set is every
/// live chat-only latent, a third of it with ν near 0, the rest spread around 0.7; the shared
/// baseline (as many shared latents) has ν near 1; frequencies log-uniform on [1e-5, 1e-1].
pub fn synthetic_table(n: usize, seed: u64) -> LatentTable {
    let t = ClassThresholds::default();
    let mut r = SplitMix64::new(seed);
    let mut delta_norm = Vec::with_capacity(n);
    let mut cos_sim = Vec::with_capacity(n);
    let mut dead = Vec::with_capacity(n);
    for _ in 0..n {
        let u = r.next_f64();
        let d = if u < 0.85 {
            normal(&mut r, 0.5, 0.04)
        } else if u < 0.90 {
            0.9 + 0.1 * r.next_f64()
        } else if u < 0.92 {
            0.1 * r.next_f64()
        } else {
            r.next_f64()
        };
        let d = d.clamp(0.0, 1.0);
        delta_norm.push(d);
        let shared_like = (0.4..0.6).contains(&d);
        cos_sim.push(if shared_like {
            1.0 - normal(&mut r, 0.0, 0.05).abs()
        } else {
            r.next_f64() * 1.2 - 0.2
        });
        dead.push(r.next_f64() < 0.02);
    }
    let classes: Vec<Class> = delta_norm.iter().map(|d| Class::of(*d, &t)).collect();
    let chat_only: Vec<bool> = (0..n).map(|j| classes[j] == Class::ChatOnly && !dead[j]).collect();
    let k = chat_only.iter().filter(|x| **x).count();
    let mut shared = vec![false; n];
    for j in (0..n).filter(|j| classes[*j] == Class::Shared && !dead[*j]).take(k) {
        shared[j] = true;
    }
    let (mut error, mut reconstruction) = (vec![f64::NAN; n], vec![f64::NAN; n]);
    for j in 0..n {
        if chat_only[j] {
            let low = r.next_f64() < 0.35;
            error[j] = if low { normal(&mut r, 0.08, 0.06) } else { normal(&mut r, 0.7, 0.2) };
            reconstruction[j] = if low { normal(&mut r, 0.15, 0.1) } else { normal(&mut r, 0.8, 0.2) };
        } else if shared[j] {
            error[j] = normal(&mut r, 1.0, 0.08);
            reconstruction[j] = normal(&mut r, 1.0, 0.05);
        }
    }
    let chat_specific: Vec<bool> =
        (0..n).map(|j| chat_only[j] && error[j] < 0.2 && reconstruction[j] < 0.5).collect();
    let frequency: Vec<f64> =
        (0..n).map(|j| if dead[j] { 0.0 } else { 10f64.powf(-5.0 + 4.0 * r.next_f64()) }).collect();
    let template_share: Vec<f64> = (0..n).map(|_| r.next_f64().powi(3)).collect();
    let mut table = LatentTable::default();
    let columns = [
        ("latent", Column::I64((0..n as i64).collect())),
        ("delta_norm", Column::F64(delta_norm)),
        ("class", Column::Str(classes.iter().map(|c| c.name().to_string()).collect())),
        ("dec_cos_sim", Column::F64(cos_sim)),
        ("nu_error", Column::F64(error)),
        ("nu_reconstruction", Column::F64(reconstruction)),
        ("effective_chat_only", Column::Bool(chat_only)),
        ("shared_baseline", Column::Bool(shared)),
        ("chat_specific", Column::Bool(chat_specific)),
        ("frequency", Column::F64(frequency)),
        ("template_share", Column::F64(template_share)),
        ("dead", Column::Bool(dead)),
    ];
    for (name, c) in columns {
        table.push(name, c).expect("columns of one length");
    }
    table
}

/// A `metrics.jsonl` of `steps` training steps: a training line every `every` steps (loss
/// decaying to 0.2·`scale`, FVE rising to 1, L0 at 100, the dead fraction falling) and a
/// validation line every `val_every`.
pub fn synthetic_metrics(steps: usize, every: usize, val_every: usize, scale: f64) -> String {
    let mut out = String::new();
    for step in (0..=steps).step_by(every.max(1)) {
        let s = step as f64;
        let loss = scale * (0.2 + 2.0 * (-s / 300.0).exp());
        let line = serde_json::json!({
            "split": "train", "step": step, "loss": loss, "l0": 100.0,
            "frac_variance_explained": 1.0 - 0.4 * (-s / 250.0).exp(),
            "frac_dead": 0.3 * (-s / 800.0).exp(),
        });
        out.push_str(&line.to_string());
        out.push('\n');
        if step % val_every.max(1) == 0 {
            let line = serde_json::json!({"split": "val", "step": step, "loss": loss * 1.1, "l0": 98.0});
            out.push_str(&line.to_string());
            out.push('\n');
        }
    }
    out
}
