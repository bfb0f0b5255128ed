//! The `scale` stage: Latent Scaling over N tokens of one or more caches, the ν ratios, the
//! effective chat-only set and its shared baseline, merged into the latent table.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use engine::{Arity, DeviceUse, InputSpec, ParamError, Stage, StageContext, StageError};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Accumulators, Betas};
use crate::cache::{ActivationCache, PairedDataset};
use crate::latents::{Class, ClassThresholds, Column, DecoderStats, LatentTable, decoder_columns};
use crate::rng::SplitMix64;
use crate::train::{load_crosscoder, load_normalizer};

pub struct ScaleStage;

/// Parameters of the `scale` stage. Inputs: `crosscoder` (a `train` or `crosscoder` stage),
/// `activations` (caches; the paper: the training split of both datasets), optionally
/// `statistics` (a `collect` stage, whose per-latent statistics join the table).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleParams {
    /// Tokens used from each cache, from its start (the paper: 25M each for Gemma 2 2B and
    /// Llama 3.2 1B, 5M each for Llama 3.1 8B). Default: all.
    #[serde(default)]
    pub tokens_per_cache: Option<u64>,
    /// The effective chat-only set: this many latents with the largest Δ_norm (the paper's
    /// Gemma run: 3176, its number of chat-only latents). Default: every chat-only latent.
    #[serde(default)]
    pub effective_chat_only: Option<usize>,
    /// Seed of the shared baseline: a random sample of shared latents as large as the effective
    /// chat-only set.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// "Chat-specific": effective chat-only, ν_ε below this and ν_r below `nu_reconstruction`
    /// (the paper: 0.2 and 0.5).
    #[serde(default = "default_nu_error")]
    pub nu_error: f64,
    #[serde(default = "default_nu_reconstruction")]
    pub nu_reconstruction: f64,
    #[serde(default)]
    pub classes: ClassThresholds,
    /// Also write `latents.csv`.
    #[serde(default)]
    pub csv: bool,
    /// Tokens per forward. Not in the key.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

fn default_seed() -> u64 {
    42
}
fn default_nu_error() -> f64 {
    0.2
}
fn default_nu_reconstruction() -> f64 {
    0.5
}
fn default_batch() -> usize {
    4096
}

impl Stage for ScaleStage {
    type Params = ScaleParams;
    const KIND: &'static str = "scale";
    const VERSION: u32 = 1;
    const DOC: &'static str = "Latent Scaling: closed-form betas, the ν ratios and chat-specific latents.";
    const UNKEYED: &'static [&'static str] = &["batch_size"];

    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            crate::train::crosscoder_input(),
            InputSpec::stage_of(
                "activations",
                &["cache"],
                Arity::Many,
                "Caches whose tokens the betas are fit on.",
            ),
            InputSpec::stage_of(
                "statistics",
                &["collect"],
                Arity::Optional,
                "Per-latent statistics to join into the table.",
            ),
        ]
    }

    fn device(&self) -> DeviceUse {
        DeviceUse::Accelerator
    }

    fn check(&self, p: &ScaleParams) -> Result<(), ParamError> {
        if p.batch_size == 0 {
            return Err(ParamError::new(&["batch_size"], "must be at least 1"));
        }
        if p.tokens_per_cache == Some(0) {
            return Err(ParamError::new(&["tokens_per_cache"], "must be at least 1 (leave it out for all)"));
        }
        if p.effective_chat_only == Some(0) {
            return Err(ParamError::new(
                &["effective_chat_only"],
                "must be at least 1 (leave it out for all)",
            ));
        }
        Ok(())
    }

    /// `pipe diff`: see [`crate::plot::compare_latents`].
    fn compare(
        &self,
        outputs: &[engine::Compared],
        dest: &std::path::Path,
    ) -> Result<Vec<std::path::PathBuf>, StageError> {
        crate::plot::compare_latents(outputs, dest)
    }

    fn run(&self, p: &ScaleParams, ctx: &mut StageContext) -> Result<(), StageError> {
        run(p, ctx)
    }
}

fn candle(e: candle_core::Error) -> StageError {
    StageError::failed(format!("tensor operation failed: {e}"))
}

fn run(p: &ScaleParams, ctx: &mut StageContext) -> Result<(), StageError> {
    let device = crate::device::candle_device(ctx.device())?;
    let cc_dir = ctx.input("crosscoder")?.dir.clone();
    let (cc, threshold) = load_crosscoder(&cc_dir, &device)?;
    let normalizer = load_normalizer(&cc_dir)?;
    let caches: Vec<ActivationCache> = ctx
        .inputs("activations")
        .iter()
        .map(|u| {
            ActivationCache::open(&u.dir).map_err(|e| StageError::failed(format!("input `{}`: {e}", u.stage)))
        })
        .collect::<Result<_, _>>()?;
    if let Some(c) = caches.iter().find(|c| c.d_model() != cc.d) {
        return Err(StageError::failed(format!(
            "the crosscoder has d = {} but {} holds d = {}",
            cc.d,
            c.dir().display(),
            c.d_model()
        )));
    }
    let limits: Vec<Option<u64>> =
        caches.iter().map(|c| Some(p.tokens_per_cache.map_or(c.len(), |n| n.min(c.len())))).collect();
    let data = PairedDataset::new(caches, &limits).map_err(|e| StageError::failed(format!("{e}")))?;
    let total = data.len();
    let progress = ctx.progress().clone();
    progress.set_total(total, "tokens");
    tracing::info!("latent scaling of {} latents over {total} tokens", cc.f);

    let mut acc = Accumulators::new(cc.f);
    let width = 2 * cc.d;
    let mut start = 0u64;
    let mut host = Vec::new();
    while start < total {
        ctx.check_cancelled()?;
        let end = (start + p.batch_size as u64).min(total);
        let n = (end - start) as usize;
        host.resize(n * width, 0.0);
        let idx: Vec<u64> = (start..end).collect();
        data.batch_into(&idx, &mut host);
        if let Some(norm) = &normalizer {
            norm.apply(&mut host);
        }
        let x = Tensor::from_slice(&host, (n, 2, cc.d), &device).map_err(candle)?;
        acc.update(&cc, threshold, &x).map_err(candle)?;
        start = end;
        progress.set_done(start);
    }
    let betas = acc.betas(&cc).map_err(candle)?;

    let w_dec: Vec<f32> = cc.w_dec.as_tensor().flatten_all().and_then(|t| t.to_vec1()).map_err(candle)?;
    let dec = DecoderStats::new(&w_dec, cc.f, cc.d);
    let mut table = decoder_columns(&dec, &p.classes);
    let (effective, baseline) = latent_sets(&dec, p);
    let nu_e = betas.ratio("error");
    let nu_r = betas.ratio("reconstruction");
    let chat_specific: Vec<bool> = (0..cc.f)
        .map(|j| effective[j] && nu_e[j].abs() < p.nu_error && nu_r[j].abs() < p.nu_reconstruction)
        .collect();
    let push = |t: &mut LatentTable, name: &str, c: Column| t.push(name, c).map_err(StageError::other);
    for (name, values) in &betas.betas {
        let (model, target) = name.split_once('_').expect("model_target");
        push(&mut table, &format!("beta_{target}_{model}"), Column::F64(values.clone()))?;
    }
    push(&mut table, "nu_error", Column::F64(nu_e.clone()))?;
    push(&mut table, "nu_reconstruction", Column::F64(nu_r.clone()))?;
    push(&mut table, "beta_activation_ratio", Column::F64(betas.ratio("activation")))?;
    push(&mut table, "beta_activation_no_bias_ratio", Column::F64(betas.ratio("activation_no_bias")))?;
    push(&mut table, "count_active", Column::I64(betas.count_active.iter().map(|c| *c as i64).collect()))?;
    push(&mut table, "effective_chat_only", Column::Bool(effective.clone()))?;
    push(&mut table, "shared_baseline", Column::Bool(baseline.clone()))?;
    push(&mut table, "chat_specific", Column::Bool(chat_specific.clone()))?;
    if let Ok(stats) = ctx.input("statistics") {
        join_statistics(&mut table, &stats.dir.join("stats.safetensors"), cc.f)?;
    }

    let out = ctx.out_dir().to_owned();
    write_betas(&out.join("betas.safetensors"), &betas)?;
    table.write_parquet(&out.join("latents.parquet")).map_err(StageError::other)?;
    if p.csv {
        table.write_csv(&out.join("latents.csv")).map_err(StageError::other)?;
    }
    let median = |sel: &[bool], v: &[f64]| -> Option<f64> {
        let mut x: Vec<f64> =
            v.iter().zip(sel).filter(|(v, s)| **s && v.is_finite()).map(|(v, _)| *v).collect();
        x.sort_by(f64::total_cmp);
        x.get(x.len() / 2).copied()
    };
    let count = |v: &[bool]| v.iter().filter(|b| **b).count() as u64;
    ctx.record_metric("tokens", total);
    ctx.record_metric("effective_chat_only", count(&effective));
    ctx.record_metric("shared_baseline", count(&baseline));
    ctx.record_metric("chat_specific", count(&chat_specific));
    for (name, sel) in [("chat_only", &effective), ("shared", &baseline)] {
        if let Some(m) = median(sel, &nu_e) {
            ctx.record_metric(&format!("median_nu_error_{name}"), m);
        }
        if let Some(m) = median(sel, &nu_r) {
            ctx.record_metric(&format!("median_nu_reconstruction_{name}"), m);
        }
    }
    tracing::info!(
        "{} effective chat-only latents, {} of them chat-specific (ν_ε < {}, ν_r < {})",
        count(&effective),
        count(&chat_specific),
        p.nu_error,
        p.nu_reconstruction
    );
    Ok(())
}

/// The effective chat-only set (the `effective_chat_only` latents with the largest Δ_norm, or
/// every chat-only latent) and the shared baseline (a seeded sample of shared latents of the same
/// size, or all of them if there are fewer).
fn latent_sets(dec: &DecoderStats, p: &ScaleParams) -> (Vec<bool>, Vec<bool>) {
    let f = dec.delta_norm.len();
    let mut effective = vec![false; f];
    match p.effective_chat_only {
        Some(n) => {
            let mut order: Vec<usize> = (0..f).collect();
            order.sort_by(|a, b| dec.delta_norm[*b].total_cmp(&dec.delta_norm[*a]).then(a.cmp(b)));
            order.into_iter().take(n).for_each(|j| effective[j] = true);
        }
        None => {
            for (e, delta) in effective.iter_mut().zip(&dec.delta_norm) {
                *e = Class::of(*delta, &p.classes) == Class::ChatOnly;
            }
        }
    }
    let size = effective.iter().filter(|e| **e).count();
    let mut shared: Vec<usize> =
        (0..f).filter(|j| Class::of(dec.delta_norm[*j], &p.classes) == Class::Shared).collect();
    SplitMix64::stream(p.seed, &[0x5ca1e]).shuffle(&mut shared);
    let mut baseline = vec![false; f];
    shared.into_iter().take(size).for_each(|j| baseline[j] = true);
    (effective, baseline)
}

/// Adds a `collect` stage's per-latent statistics (every F-sized f32 tensor of its
/// `stats.safetensors`) as columns.
fn join_statistics(table: &mut LatentTable, path: &Path, f: usize) -> Result<(), StageError> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| StageError::failed(format!("{}: {e}", path.display())))?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    if let Some(max) = tensors.get("max_activation") {
        let v: Vec<f32> = max.to_dtype(DType::F32).and_then(|t| t.to_vec1()).map_err(candle)?;
        if v.len() == f {
            table
                .push("dead", Column::Bool(v.iter().map(|m| *m <= 0.0).collect()))
                .map_err(StageError::other)?;
        }
    }
    for name in names {
        let t = &tensors[name];
        if t.dims() == [f] {
            let v: Vec<f32> = t.to_dtype(DType::F32).and_then(|t| t.to_vec1()).map_err(candle)?;
            table
                .push(&name.replace('.', "_"), Column::F64(v.into_iter().map(f64::from).collect()))
                .map_err(StageError::other)?;
        }
    }
    Ok(())
}

/// `betas.safetensors`: per `{model}_{target}` the betas and nominators (f64), plus `norm_f`,
/// `norm_d` and `count_active`, as the original's `.pt` files hold them.
fn write_betas(path: &Path, b: &Betas) -> Result<(), StageError> {
    let cpu = Device::Cpu;
    let f = b.norm_f.len();
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for (name, v) in &b.betas {
        map.insert(format!("betas_{name}"), Tensor::from_slice(v, f, &cpu).map_err(candle)?);
    }
    for (name, v) in &b.nominators {
        map.insert(format!("nominator_{name}"), Tensor::from_slice(v, f, &cpu).map_err(candle)?);
    }
    map.insert("norm_f".into(), Tensor::from_slice(&b.norm_f, f, &cpu).map_err(candle)?);
    map.insert("norm_d".into(), Tensor::from_slice(&b.norm_d, f, &cpu).map_err(candle)?);
    let counts: Vec<i64> = b.count_active.iter().map(|c| *c as i64).collect();
    map.insert("count_active".into(), Tensor::from_vec(counts, f, &cpu).map_err(candle)?);
    candle_core::safetensors::save(&map, path).map_err(candle)
}
