//! The `train` stage: a crosscoder (L1 or BatchTopK) on one or more activation caches, with the
//! paper's data order (local shuffling, interleaved caches, epochs), Adam with a linear warmup,
//! periodic validation, `metrics.jsonl`, and checkpoints in the work dir that a killed run resumes
//! from exactly.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use engine::{Arity, DeviceUse, InputSpec, ParamError, Stage, StageContext, StageError};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::adam::{Adam, clip_grad_norm};
use super::crosscoder::{
    BatchStats, BatchTopK, CodeNormalization, Crosscoder, Normalizer, batch_stats, geometric_median, l1_loss,
    min_positive_scaled, recon_l2, specific_latents,
};
use super::{cpu, sparse};
use crate::cache::{ActivationCache, LocalShuffle, PairedDataset};

pub struct TrainStage;

/// Which crosscoder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// BatchTopK: k·B largest scaled codes per batch, auxiliary loss, inference threshold.
    #[default]
    Batchtopk,
    /// ReLU codes with a decoder-norm-weighted L1 penalty (the paper's "L1 crosscoder").
    L1,
}

/// Parameters of the `train` stage. Inputs: `activations` (cache stages, interleaved in the given
/// order) and optionally `validation` (cache stages).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    /// `batchtopk` or `l1`.
    #[serde(default)]
    pub loss: LossKind,
    /// BatchTopK: active latents per token on average (the paper: 100).
    #[serde(default = "default_k")]
    pub k: u64,
    /// L1: the sparsity penalty (the paper: Gemma 0.041, Llama-3.2-1B 0.036, Llama-3.1-8B 0.021).
    #[serde(default = "default_mu")]
    pub mu: f64,
    /// Latents = expansion_factor × d, unless `dict_size` is given.
    #[serde(default = "default_expansion")]
    pub expansion_factor: usize,
    #[serde(default)]
    pub dict_size: Option<usize>,
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Linear warmup of the learning rate from 0, then constant.
    #[serde(default = "default_warmup")]
    pub warmup_steps: u64,
    /// Token pairs per step.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default = "default_epochs")]
    pub epochs: u64,
    /// Tokens used from each cache (the paper: the same N from each). Default: the smallest cache.
    #[serde(default)]
    pub tokens_per_cache: Option<u64>,
    /// Stop after this many steps (default: epochs × tokens / batch_size).
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Local shuffling window, in tokens per cache (the paper: 1,000,000, the shard size).
    #[serde(default = "default_window")]
    pub shuffle_window: u64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Column norm of the initial encoder (default: 1.0 for BatchTopK, 0.005 for L1).
    #[serde(default)]
    pub norm_init_scale: Option<f64>,
    /// Global gradient-norm clipping (default: 1.0 for BatchTopK, none for L1; 0 disables).
    #[serde(default)]
    pub grad_clip: Option<f64>,
    /// BatchTopK: weight of the auxiliary loss.
    #[serde(default = "default_auxk_alpha")]
    pub auxk_alpha: f64,
    /// BatchTopK: a latent is dead after this many tokens without firing.
    #[serde(default = "default_dead_tokens")]
    pub dead_tokens: u64,
    /// BatchTopK: the inference threshold is tracked after this step.
    #[serde(default = "default_threshold_start")]
    pub threshold_start_step: u64,
    #[serde(default)]
    pub code_normalization: CodeNormalization,
    /// Training metrics every N steps.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Validation every N steps (and at the end).
    #[serde(default = "default_validate_every")]
    pub validate_every: u64,
    /// Tokens used from each validation cache (the paper: 1,000,000).
    #[serde(default = "default_validation_tokens")]
    pub validation_tokens_per_cache: u64,
    #[serde(default = "default_validation_batch")]
    pub validation_batch_size: usize,
    /// Matmul precision: `f32` (exact f32, the default), `tf32` (CUDA: f32 matmuls on tensor
    /// cores, as PyTorch's `set_float32_matmul_precision('high')`; the CPU has no TF32 and runs
    /// f32), `bf16` (CUDA: encode and decode matmuls in bf16 with f32 weights and accumulation,
    /// like autocast).
    #[serde(default)]
    pub precision: Precision,
    /// Which calls age the dead-latent counters: `training` (training steps only, the default)
    /// or `reference` (as dictionary_learning does: also its two logging forwards at every
    /// `log_every` step, top-k then threshold codes, and every validation batch).
    #[serde(default)]
    pub dead_counting: DeadCounting,
    /// Normalise activations with the training caches' statistics (off in the paper).
    #[serde(default)]
    pub normalize_activations: bool,
    /// With `normalize_activations`: one global scale to RMS 1 (true) or per-dimension z-scores.
    #[serde(default = "default_true")]
    pub keep_relative_variance: bool,
    /// Checkpoint every N steps. Not in the key.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
}

/// Sets candle's TF32 flag for cuBLAS f32 matmuls, and restores the previous value on drop.
struct Tf32(bool);

impl Tf32 {
    fn set(on: bool) -> Tf32 {
        let before = candle_core::cuda::gemm_reduced_precision_f32();
        candle_core::cuda::set_gemm_reduced_precision_f32(on);
        Tf32(before)
    }
}

impl Drop for Tf32 {
    fn drop(&mut self) {
        candle_core::cuda::set_gemm_reduced_precision_f32(self.0);
    }
}

/// See [`TrainParams::precision`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Tf32,
    Bf16,
}

/// See [`TrainParams::dead_counting`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeadCounting {
    #[default]
    Training,
    Reference,
}

fn default_true() -> bool {
    true
}
fn default_k() -> u64 {
    100
}
fn default_mu() -> f64 {
    0.041
}
fn default_expansion() -> usize {
    32
}
fn default_lr() -> f64 {
    1e-4
}
fn default_warmup() -> u64 {
    1000
}
fn default_batch() -> usize {
    2048
}
fn default_epochs() -> u64 {
    2
}
fn default_window() -> u64 {
    1_000_000
}
fn default_seed() -> u64 {
    42
}
fn default_auxk_alpha() -> f64 {
    1.0 / 32.0
}
fn default_dead_tokens() -> u64 {
    10_000_000
}
fn default_threshold_start() -> u64 {
    1000
}
fn default_log_every() -> u64 {
    50
}
fn default_validate_every() -> u64 {
    20_000
}
fn default_validation_tokens() -> u64 {
    1_000_000
}
fn default_validation_batch() -> usize {
    4096
}
fn default_checkpoint_every() -> u64 {
    1000
}

impl Stage for TrainStage {
    type Params = TrainParams;
    const KIND: &'static str = "train";
    /// 2: CPU steps compute their gradients by hand ([`cpu`]), so CPU-trained weights differ
    /// from version 1's in rounding.
    const VERSION: u32 = 2;
    const DOC: &'static str = "A crosscoder (BatchTopK or L1) trained on paired activation caches.";
    const UNKEYED: &'static [&'static str] = &["checkpoint_every"];

    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec::stage_of(
                "activations",
                &["cache"],
                Arity::Many,
                "Training caches, interleaved in this order (the paper: web, then chat).",
            ),
            InputSpec::stage_of("validation", &["cache"], Arity::OptionalMany, "Validation caches."),
        ]
    }

    fn device(&self) -> DeviceUse {
        DeviceUse::Accelerator
    }

    fn check(&self, p: &TrainParams) -> Result<(), ParamError> {
        let positive: [(&str, u64); 7] = [
            ("k", p.k),
            ("expansion_factor", p.expansion_factor as u64),
            ("batch_size", p.batch_size as u64),
            ("epochs", p.epochs),
            ("shuffle_window", p.shuffle_window),
            ("log_every", p.log_every),
            ("checkpoint_every", p.checkpoint_every),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(ParamError::new(&[name], "must be at least 1"));
            }
        }
        for (name, v) in
            [("validate_every", p.validate_every), ("validation_batch_size", p.validation_batch_size as u64)]
        {
            if v == 0 {
                return Err(ParamError::new(&[name], "must be at least 1"));
            }
        }
        if p.lr <= 0.0 {
            return Err(ParamError::new(&["lr"], "must be positive"));
        }
        if p.mu < 0.0 {
            return Err(ParamError::new(&["mu"], "must not be negative"));
        }
        if p.dict_size == Some(0) {
            return Err(ParamError::new(&["dict_size"], "must be at least 1"));
        }
        if p.grad_clip.is_some_and(|g| g < 0.0) {
            return Err(ParamError::new(&["grad_clip"], "must not be negative (0 disables clipping)"));
        }
        Ok(())
    }

    /// `pipe diff`: see [`crate::plot::compare_training`].
    fn compare(
        &self,
        outputs: &[engine::Compared],
        dest: &std::path::Path,
    ) -> Result<Vec<std::path::PathBuf>, StageError> {
        crate::plot::compare_training(outputs, dest)
    }

    fn run(&self, p: &TrainParams, ctx: &mut StageContext) -> Result<(), StageError> {
        run(p, ctx)
    }
}

fn candle(e: candle_core::Error) -> StageError {
    StageError::failed(format!("tensor operation failed: {e}"))
}

/// The checkpoint's small part; the tensors are in `file`.
#[derive(Serialize, Deserialize)]
struct CheckpointMeta {
    file: String,
    step: u64,
    adam_t: u64,
    threshold_bits: u32,
    /// Bytes of `metrics.jsonl` written up to this step.
    metrics_len: u64,
}

const CHECKPOINT: &str = "checkpoint.json";

fn save_checkpoint(
    dir: &Path,
    step: u64,
    cc: &Crosscoder,
    adam: &Adam,
    topk: Option<&BatchTopK>,
    metrics_len: u64,
) -> Result<(), StageError> {
    let file = format!("checkpoint-{step}.safetensors");
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (i, (name, var)) in Crosscoder::NAMES.iter().zip(cc.vars()).enumerate() {
        tensors.insert(name.to_string(), var.as_tensor().clone());
        tensors.insert(format!("adam.m.{i}"), adam.m[i].clone());
        tensors.insert(format!("adam.v.{i}"), adam.v[i].clone());
    }
    if let Some(t) = topk {
        let since: Vec<i64> = t.since_fired.iter().map(|s| *s as i64).collect();
        tensors.insert("since_fired".into(), Tensor::from_vec(since, cc.f, &Device::Cpu).map_err(candle)?);
    }
    let tmp = dir.join(format!("{file}.tmp"));
    candle_core::safetensors::save(&tensors, &tmp).map_err(candle)?;
    std::fs::rename(&tmp, dir.join(&file)).map_err(|e| StageError::io(dir.join(&file).display(), e))?;
    let meta = CheckpointMeta {
        file: file.clone(),
        step,
        adam_t: adam.t,
        threshold_bits: topk.map_or(0, |t| t.threshold.to_bits()),
        metrics_len,
    };
    let tmp = dir.join(format!("{CHECKPOINT}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(&meta).expect("serializable"))
        .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|_| std::fs::rename(&tmp, dir.join(CHECKPOINT)))
        .map_err(|e| StageError::io(dir.join(CHECKPOINT).display(), e))?;
    // Older checkpoints are no longer referenced.
    for entry in std::fs::read_dir(dir).map_err(|e| StageError::io(dir.display(), e))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("checkpoint-") && name != file {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    tracing::debug!("checkpoint at step {step}");
    Ok(())
}

/// Loads the work dir's checkpoint into `cc`, `adam`, `topk`; returns (next step, metrics length).
fn load_checkpoint(
    dir: &Path,
    cc: &Crosscoder,
    adam: &mut Adam,
    topk: Option<&mut BatchTopK>,
    device: &Device,
) -> Result<Option<(u64, u64)>, StageError> {
    let path = dir.join(CHECKPOINT);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StageError::io(path.display(), e)),
    };
    let meta: CheckpointMeta = serde_json::from_str(&text)
        .map_err(|e| StageError::failed(format!("{}: unreadable checkpoint: {e}", path.display())))?;
    let file = dir.join(&meta.file);
    let tensors = candle_core::safetensors::load(&file, device).map_err(|e| {
        StageError::failed(format!(
            "{}: unreadable checkpoint: {e}; delete the work dir to restart",
            file.display()
        ))
    })?;
    let get = |name: &str| {
        tensors
            .get(name)
            .cloned()
            .ok_or_else(|| StageError::failed(format!("{}: no tensor {name}", file.display())))
    };
    for (i, (name, var)) in Crosscoder::NAMES.iter().zip(cc.vars()).enumerate() {
        var.set(&get(name)?).map_err(candle)?;
        adam.m[i] = get(&format!("adam.m.{i}"))?;
        adam.v[i] = get(&format!("adam.v.{i}"))?;
    }
    adam.t = meta.adam_t;
    if let Some(t) = topk {
        let since: Vec<i64> =
            get("since_fired")?.to_device(&Device::Cpu).and_then(|t| t.to_vec1()).map_err(candle)?;
        t.since_fired = since.iter().map(|s| *s as u64).collect();
        t.threshold = f32::from_bits(meta.threshold_bits);
    }
    Ok(Some((meta.step + 1, meta.metrics_len)))
}

fn open_caches(ctx: &StageContext, role: &str) -> Result<Vec<ActivationCache>, StageError> {
    ctx.inputs(role)
        .iter()
        .map(|u| {
            ActivationCache::open(&u.dir)
                .map_err(|e| StageError::failed(format!("input `{}` ({}): {e}", u.stage, role)))
        })
        .collect()
}

/// Training and validation summaries, for `metrics.jsonl` and the manifest.
#[derive(Serialize)]
struct Record<'a> {
    step: u64,
    split: &'a str,
    loss: f64,
    l2: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    sparsity: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auxk: Option<f64>,
    #[serde(flatten)]
    stats: BatchStats,
    #[serde(skip_serializing_if = "Option::is_none")]
    threshold: Option<f32>,
    specific_base: u64,
    specific_chat: u64,
    lr: f64,
}

fn run(p: &TrainParams, ctx: &mut StageContext) -> Result<(), StageError> {
    let device = crate::device::candle_device(ctx.device())?;
    let train_caches = open_caches(ctx, "activations")?;
    let valid_caches = open_caches(ctx, "validation")?;
    let cancel_flag = ctx.cancel_flag();
    let cancelled = move || cancel_flag.is_cancelled();
    let env = TrainEnv {
        device,
        work_dir: ctx.work_dir().to_owned(),
        out_dir: ctx.out_dir().to_owned(),
        progress: ctx.progress().clone(),
        cancelled: &cancelled,
        step: StepPath::Auto,
    };
    for (name, value) in train(p, train_caches, valid_caches, &env)? {
        ctx.record_metric(&name, value);
    }
    Ok(())
}

/// Where [`train`] runs: the device, its resumable work dir and output dir, a progress bar and a
/// cancellation check (the `train` stage passes its context's).
pub struct TrainEnv<'a> {
    pub device: Device,
    pub work_dir: PathBuf,
    pub out_dir: PathBuf,
    pub progress: engine::progress::Progress,
    pub cancelled: &'a dyn Fn() -> bool,
    /// Which step computes the gradients (the stage: [`StepPath::Auto`]).
    pub step: StepPath,
}

/// Which implementation of the training step a run uses. They compute the same losses and
/// gradients, up to the order of float sums.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StepPath {
    /// The CPU step ([`cpu`]) on the CPU, the sparse step ([`sparse`]) for BatchTopK on CUDA,
    /// candle's autograd elsewhere.
    #[default]
    Auto,
    /// candle's autograd everywhere (for comparisons).
    Autograd,
    /// The sparse step for BatchTopK on any device, checked against autograd on the first batch
    /// (on the CPU with the CPU step's loops as its kernels: the GPU's path, testable without a
    /// GPU); autograd for L1.
    Sparse,
}

/// One step's loss, its parts, the gradients (in [`Crosscoder::vars`] order) and what the
/// metrics need, from either path.
struct StepOut {
    loss: f32,
    l2: f32,
    sparsity: Option<f32>,
    auxk: Option<f32>,
    grads: Vec<Tensor>,
    x_hat: Tensor,
    codes: StepCodes,
}

/// The training codes f (B, F) of a step.
enum StepCodes {
    Tensor(Tensor),
    /// On the host (the CPU and sparse steps), with, for BatchTopK, the smallest positive f·c.
    Host(cpu::Codes, Option<f32>),
}

/// The step through candle's autograd (any device, any matmul dtype).
fn step_autograd(
    cc: &Crosscoder,
    topk: Option<&mut BatchTopK>,
    x: &Tensor,
    mu: f64,
) -> candle_core::Result<StepOut> {
    let out = match topk {
        Some(t) => t.loss(cc, x),
        None => l1_loss(cc, x, mu),
    }?;
    let grads = out.loss.backward()?;
    let grads = cc
        .vars()
        .iter()
        .map(|v| grads.get(v.as_tensor()).cloned().map_or_else(|| v.as_tensor().zeros_like(), Ok))
        .collect::<candle_core::Result<_>>()?;
    let scalar = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_scalar::<f32>()).transpose();
    Ok(StepOut {
        loss: out.loss.to_scalar()?,
        l2: out.l2.to_scalar()?,
        sparsity: scalar(&out.sparsity)?,
        auxk: scalar(&out.auxk)?,
        grads,
        x_hat: out.x_hat,
        codes: StepCodes::Tensor(out.f),
    })
}

/// The step with hand-written gradients on the CPU ([`cpu`]), the gradients clipped to a global
/// norm of `clip` (when positive).
fn step_cpu(
    cc: &Crosscoder,
    topk: Option<&mut BatchTopK>,
    x: &[f32],
    b: usize,
    mu: f64,
    clip: f64,
) -> candle_core::Result<StepOut> {
    let mut out = match topk {
        Some(t) => cpu::batchtopk(t, cc, x, b),
        None => cpu::l1(cc, x, b, mu),
    }?;
    if clip > 0.0 {
        cpu::clip_grad_norm(&mut out.grads, clip);
    }
    Ok(StepOut {
        loss: out.loss,
        l2: out.l2,
        sparsity: out.sparsity,
        auxk: out.auxk,
        grads: cpu::grad_tensors(cc, out.grads)?,
        x_hat: Tensor::from_vec(out.x_hat, (b, 2, cc.d), &Device::Cpu)?,
        codes: StepCodes::Host(out.codes, out.min_scaled),
    })
}

/// Whether the sparse BatchTopK step ([`sparse`]) runs: on CUDA (a `cuda` build, with pipe's
/// kernels on) over f32 weights.
fn sparse_applies(cc: &Crosscoder) -> bool {
    #[cfg(feature = "cuda")]
    let on = super::cuda::enabled();
    #[cfg(not(feature = "cuda"))]
    let on = false;
    on && cc.vars().iter().all(|v| v.device().is_cuda() && v.dtype() == DType::F32)
}

/// Turns pipe's CUDA kernels off for the rest of the run, saying `why`.
fn kernels_off(why: &str) {
    #[cfg(feature = "cuda")]
    super::cuda::disable(why);
    #[cfg(not(feature = "cuda"))]
    tracing::warn!("{why}");
}

/// The sparse BatchTopK step ([`sparse`]). Its first call in a run (`checked` false) compares
/// it with autograd on that batch ([`sparse::check`]); if they disagree, or a kernel fails,
/// pipe's CUDA kernels are turned off with a warning and autograd takes this step and the rest
/// (`strict`, for [`StepPath::Sparse`]: an error instead). Gradients unclipped, as autograd's.
fn step_sparse(
    cc: &Crosscoder,
    t: &mut BatchTopK,
    x: &Tensor,
    mu: f64,
    checked: &mut bool,
    strict: bool,
) -> candle_core::Result<StepOut> {
    let fall_back = |why: String, t: &mut BatchTopK| {
        if strict {
            return Err(candle_core::Error::Msg(why));
        }
        kernels_off(&why);
        step_autograd(cc, Some(t), x, mu)
    };
    if !*checked {
        *checked = true;
        match sparse::check(t, cc, x) {
            Ok(worst) => tracing::info!(
                "the sparse BatchTopK step agrees with autograd on the first batch \
                 (largest gradient error {worst:.2e}, relative L2)"
            ),
            Err(why) => {
                return fall_back(format!("the sparse BatchTopK step disagreed with autograd: {why}"), t);
            }
        }
    }
    match sparse::batchtopk(t, cc, x) {
        Ok(s) => Ok(StepOut {
            loss: s.loss,
            l2: s.l2,
            sparsity: None,
            auxk: Some(s.auxk),
            grads: s.grads,
            x_hat: s.x_hat,
            codes: StepCodes::Host(cpu::Codes::Sparse(s.codes), Some(s.min_scaled)),
        }),
        Err(e) => fall_back(format!("the sparse BatchTopK step failed: {e}"), t),
    }
}

/// Trains a crosscoder on `train_caches` (interleaved in order), validating on `valid_caches`;
/// writes `crosscoder.safetensors`, `config.json` and `metrics.jsonl` to `env.out_dir`, resuming
/// from the checkpoint in `env.work_dir` if there is one. Returns the summary metrics.
pub fn train(
    p: &TrainParams,
    train_caches: Vec<ActivationCache>,
    valid_caches: Vec<ActivationCache>,
    env: &TrainEnv<'_>,
) -> Result<Vec<(String, serde_json::Value)>, StageError> {
    let t0 = Instant::now();
    let device = env.device.clone();
    let Some(first) = train_caches.first() else {
        return Err(StageError::failed("no training cache"));
    };
    let d = first.d_model();
    let n = p.tokens_per_cache.unwrap_or_else(|| train_caches.iter().map(|c| c.len()).min().unwrap_or(0));
    let parts = train_caches.len();
    let data = PairedDataset::new(train_caches, &vec![Some(n); parts])
        .map_err(|e| StageError::failed(format!("input `activations`: {e}")))?;
    let valid = if valid_caches.is_empty() {
        None
    } else {
        let limits: Vec<Option<u64>> =
            valid_caches.iter().map(|c| Some(c.len().min(p.validation_tokens_per_cache))).collect();
        Some(
            PairedDataset::new(valid_caches, &limits)
                .map_err(|e| StageError::failed(format!("input `validation`: {e}")))?,
        )
    };
    if let Some(v) = &valid
        && v.d_model() != d
    {
        return Err(StageError::failed(format!(
            "validation caches have d = {}, training caches d = {d}",
            v.d_model()
        )));
    }
    let f = p.dict_size.unwrap_or(p.expansion_factor * d);
    let shuffle = LocalShuffle::new(data.part_ranges(), p.shuffle_window, p.seed);
    let epoch_len = shuffle.epoch_len();
    let mut steps = p.epochs * epoch_len / p.batch_size as u64;
    if let Some(max) = p.max_steps {
        steps = steps.min(max);
    }
    if steps == 0 {
        return Err(StageError::failed(format!(
            "no training step: {} tokens × {} epochs is less than one batch of {}",
            epoch_len, p.epochs, p.batch_size
        )));
    }
    let (norm_init, clip) = match p.loss {
        LossKind::Batchtopk => (p.norm_init_scale.unwrap_or(1.0), p.grad_clip.unwrap_or(1.0)),
        LossKind::L1 => (p.norm_init_scale.unwrap_or(0.005), p.grad_clip.unwrap_or(0.0)),
    };
    tracing::info!(
        "{:?} crosscoder d = {d}, F = {f}, {steps} steps of {} pairs over {} caches × {n} tokens, on {}",
        p.loss,
        p.batch_size,
        data.caches().len(),
        device_name(&device)
    );

    let mut cc =
        Crosscoder::init(d, f, Some(norm_init), p.code_normalization, p.seed, &device).map_err(candle)?;
    // `precision` acts on CUDA only: the CPU has no TF32, its bf16 matmul only widens to f32,
    // and the CPU step (`train::cpu`) runs f32.
    let cuda = device.is_cuda();
    if cuda && p.precision == Precision::Bf16 {
        cc.matmul_dtype = DType::BF16;
    }
    // A process-wide cuBLAS setting (no-op without the `cuda` feature): on for this run, and back
    // as it was when `train` returns.
    let _tf32 = cuda.then(|| Tf32::set(p.precision == Precision::Tf32));
    let mut adam = Adam::new(&cc.vars()).map_err(candle)?;
    let mut topk = (p.loss == LossKind::Batchtopk).then(|| BatchTopK {
        k: p.k,
        auxk_alpha: p.auxk_alpha,
        dead_tokens: p.dead_tokens,
        since_fired: vec![0; f],
        threshold: -1.0,
    });
    let work = env.work_dir.clone();
    let metrics_path = work.join("metrics.jsonl");
    let (mut step, metrics_len) =
        load_checkpoint(&work, &cc, &mut adam, topk.as_mut(), &device)?.unwrap_or((0, 0));
    if step > 0 {
        tracing::info!("resuming at step {step} of {steps}");
    }
    // Metrics written after the checkpoint are rewritten by the resumed run.
    let metrics = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&metrics_path)
        .map_err(|e| StageError::io(metrics_path.display(), e))?;
    metrics.set_len(metrics_len).map_err(|e| StageError::io(metrics_path.display(), e))?;
    let mut metrics = std::io::BufWriter::new(metrics);
    use std::io::Seek;
    metrics.seek(std::io::SeekFrom::End(0)).map_err(|e| StageError::io(metrics_path.display(), e))?;
    let mut metrics_written = metrics_len;

    let normalizer = if p.normalize_activations {
        Some(merged_normalizer(data.caches(), p.keep_relative_variance)?)
    } else {
        None
    };
    let progress = env.progress.clone();
    progress.set_total(steps, "steps");
    progress.set_done(step);
    let mut order = shuffle.iter_from(step * p.batch_size as u64);
    let width = 2 * d;
    let mut host = vec![0f32; p.batch_size * width];
    let params = cc.vars();
    let on_cpu = env.step == StepPath::Auto && cpu::applies(&cc);
    let sparse = match env.step {
        StepPath::Auto => sparse_applies(&cc),
        StepPath::Autograd => false,
        StepPath::Sparse => true,
    };
    let mut sparse_checked = false;
    let mut last_train: Option<serde_json::Value> = None;
    while step < steps {
        if (env.cancelled)() {
            return Err(StageError::Cancelled);
        }
        let idx: Vec<u64> = order.by_ref().take(p.batch_size).collect();
        data.batch_into(&idx, &mut host);
        if let Some(n) = &normalizer {
            n.apply(&mut host);
        }
        let x = Tensor::from_slice(&host, (p.batch_size, 2, d), &device).map_err(candle)?;
        if let Some(t) = topk.as_mut()
            && p.dead_counting == DeadCounting::Reference
            && step % p.log_every == 0
        {
            // dictionary_learning's two logging forwards (top-k, then threshold codes) run
            // before the update and age the counters too.
            let f = t.encode_topk(&cc, &x).map_err(candle)?;
            t.count_firing(&f).map_err(candle)?;
            let f = t.encode_threshold(&cc, &x).map_err(candle)?;
            t.count_firing(&f).map_err(candle)?;
        }
        if step == 0 && topk.is_some() {
            let median = geometric_median(&host, p.batch_size, d);
            cc.b_dec.set(&Tensor::from_vec(median, (2, d), &device).map_err(candle)?).map_err(candle)?;
        }
        let out = match topk.as_mut() {
            _ if on_cpu => step_cpu(&cc, topk.as_mut(), &host, p.batch_size, p.mu, clip),
            // Auto asks again each step: a failed check or kernel turns the kernels off.
            Some(t) if sparse && (env.step == StepPath::Sparse || sparse_applies(&cc)) => {
                step_sparse(&cc, t, &x, p.mu, &mut sparse_checked, env.step == StepPath::Sparse)
            }
            t => step_autograd(&cc, t, &x, p.mu),
        }
        .map_err(candle)?;
        let loss_value = out.loss;
        if !loss_value.is_finite() {
            return Err(StageError::failed(format!(
                "the loss became {loss_value} at step {step}; lower lr (now {}) or check the caches",
                p.lr
            )));
        }
        let mut g = out.grads;
        if clip > 0.0 && !on_cpu {
            clip_grad_norm(&mut g, clip).map_err(candle)?;
        }
        if let Some(t) = topk.as_mut()
            && step > p.threshold_start_step
        {
            let m = match &out.codes {
                StepCodes::Tensor(f) => min_positive_scaled(&cc, f).map_err(candle)?,
                StepCodes::Host(_, m) => m.unwrap_or(0.0),
            };
            t.fold_threshold(m);
        }
        let lr =
            p.lr * if p.warmup_steps == 0 { 1.0 } else { (step as f64 / p.warmup_steps as f64).min(1.0) };
        if step % p.log_every == 0 || step + 1 == steps {
            let codes = match &out.codes {
                StepCodes::Tensor(f) => f.clone(),
                StepCodes::Host(c, _) => {
                    Tensor::from_vec(c.to_dense(p.batch_size, f), (p.batch_size, f), &device)
                        .map_err(candle)?
                }
            };
            let (stats, _) = batch_stats(&cc, &x, &out.x_hat, &codes).map_err(candle)?;
            let [specific_base, specific_chat] = specific_latents(&cc).map_err(candle)?;
            let record = Record {
                step,
                split: "train",
                loss: loss_value as f64,
                l2: out.l2 as f64,
                sparsity: out.sparsity.map(f64::from),
                auxk: out.auxk.map(f64::from),
                stats,
                threshold: topk.as_ref().map(|t| t.threshold),
                specific_base,
                specific_chat,
                lr,
            };
            progress.set_message(format!(
                "loss {:.4} l0 {:.1} fve {:.3}",
                record.loss, record.stats.l0, record.stats.frac_variance_explained
            ));
            let json = serde_json::to_value(&record).expect("serializable");
            metrics_written += write_line(&mut metrics, &json, &metrics_path)?;
            last_train = Some(json);
        }
        adam.step(&params, &g, lr).map_err(candle)?;
        if let Some(v) = &valid
            && step > 0
            && step % p.validate_every == 0
        {
            let json = validate(&cc, topk.as_mut(), v, normalizer.as_ref(), p, step, &device)?;
            metrics_written += write_line(&mut metrics, &json, &metrics_path)?;
        }
        if (step + 1) % p.checkpoint_every == 0 && step + 1 < steps {
            metrics.flush().map_err(|e| StageError::io(metrics_path.display(), e))?;
            save_checkpoint(&work, step, &cc, &adam, topk.as_ref(), metrics_written)?;
        }
        step += 1;
        progress.set_done(step);
    }
    let final_valid = match &valid {
        Some(v) => {
            let json = validate(&cc, topk.as_mut(), v, normalizer.as_ref(), p, step, &device)?;
            metrics_written += write_line(&mut metrics, &json, &metrics_path)?;
            Some(json)
        }
        None => None,
    };
    metrics.flush().map_err(|e| StageError::io(metrics_path.display(), e))?;
    let _ = metrics_written;
    let out_dir = env.out_dir.clone();
    std::fs::copy(&metrics_path, out_dir.join("metrics.jsonl"))
        .map_err(|e| StageError::io(out_dir.join("metrics.jsonl").display(), e))?;
    write_crosscoder(&out_dir, &cc, topk.as_ref(), normalizer.as_ref(), p, d, f, steps)?;

    let mut summary = Vec::new();
    for (prefix, json) in [("train", &last_train), ("val", &final_valid)] {
        if let Some(serde_json::Value::Object(m)) = json {
            for (k, v) in m {
                if !matches!(k.as_str(), "split" | "lr") {
                    summary.push((format!("{prefix}/{k}"), v.clone()));
                }
            }
        }
    }
    summary.push(("steps".into(), steps.into()));
    summary.push(("dict_size".into(), (f as u64).into()));
    // Init, the steps and the final write, to 10 ms (bench/gpu/run.sh derives steps/s from it).
    summary.push(("seconds".into(), ((t0.elapsed().as_secs_f64() * 100.0).round() / 100.0).into()));
    Ok(summary)
}

fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        other => format!("{:?}", other.location()),
    }
}

fn write_line(w: &mut impl Write, json: &serde_json::Value, path: &Path) -> Result<u64, StageError> {
    let mut line = serde_json::to_vec(json).expect("serializable");
    line.push(b'\n');
    w.write_all(&line).map_err(|e| StageError::io(path.display(), e))?;
    Ok(line.len() as u64)
}

/// Metrics over the validation set, in order, in batches (BatchTopK with the inference
/// threshold, as the reference validates); a latent is dead if it fires in no batch.
fn validate(
    cc: &Crosscoder,
    mut topk: Option<&mut BatchTopK>,
    data: &PairedDataset,
    normalizer: Option<&Normalizer>,
    p: &TrainParams,
    step: u64,
    device: &Device,
) -> Result<serde_json::Value, StageError> {
    let d = cc.d;
    let mut sums = BatchStats::default();
    let (mut l2, mut sparsity, mut batches) = (0f64, 0f64, 0u64);
    let mut dead_everywhere = vec![true; cc.f];
    let mut start = 0u64;
    while start < data.len() {
        let end = (start + p.validation_batch_size as u64).min(data.len());
        if end - start < 2 {
            break;
        }
        let idx: Vec<u64> = (start..end).collect();
        let mut host = vec![0f32; idx.len() * 2 * d];
        data.batch_into(&idx, &mut host);
        if let Some(n) = normalizer {
            n.apply(&mut host);
        }
        let x = Tensor::from_vec(host, (idx.len(), 2, d), device).map_err(candle)?;
        let f = match topk.as_deref() {
            Some(t) if t.threshold >= 0.0 => t.encode_threshold(cc, &x),
            _ => cc.pre_relu(&x),
        }
        .map_err(candle)?;
        if let Some(t) = topk.as_deref_mut()
            && p.dead_counting == DeadCounting::Reference
        {
            t.count_firing(&f).map_err(candle)?;
        }
        let x_hat = cc.decode(&f).map_err(candle)?;
        let (stats, dead) = batch_stats(cc, &x, &x_hat, &f).map_err(candle)?;
        l2 += recon_l2(&x, &x_hat).and_then(|t| t.to_scalar::<f32>()).map_err(candle)? as f64;
        if topk.is_none() {
            let c = cc.code_weights().map_err(candle)?;
            sparsity += f
                .broadcast_mul(&c)
                .and_then(|t| t.sum(1))
                .and_then(|t| t.mean_all())
                .and_then(|t| t.to_scalar::<f32>())
                .map_err(candle)? as f64;
        }
        sums.l0 += stats.l0;
        sums.frac_variance_explained += stats.frac_variance_explained;
        sums.frac_variance_explained_base += stats.frac_variance_explained_base;
        sums.frac_variance_explained_chat += stats.frac_variance_explained_chat;
        dead_everywhere.iter_mut().zip(&dead).for_each(|(a, b)| *a &= *b);
        batches += 1;
        start = end;
    }
    let nb = batches.max(1) as f64;
    let [specific_base, specific_chat] = specific_latents(cc).map_err(candle)?;
    let mut json = serde_json::json!({
        "step": step,
        "split": "val",
        "l2": l2 / nb,
        "l0": sums.l0 / nb,
        "frac_variance_explained": sums.frac_variance_explained / nb,
        "frac_variance_explained_base": sums.frac_variance_explained_base / nb,
        "frac_variance_explained_chat": sums.frac_variance_explained_chat / nb,
        "frac_dead": dead_everywhere.iter().filter(|d| **d).count() as f64 / cc.f as f64,
        "specific_base": specific_base,
        "specific_chat": specific_chat,
    });
    if topk.is_none() {
        json["sparsity"] = (sparsity / nb).into();
        json["loss"] = (l2 / nb + p.mu * sparsity / nb).into();
    } else {
        json["loss"] = (l2 / nb).into();
    }
    Ok(json)
}

/// `crosscoder.safetensors` with dictionary_learning's state-dict names and `config.json` with
/// its `trainer` block, so its tools can load our crosscoders.
#[allow(clippy::too_many_arguments)]
fn write_crosscoder(
    dir: &Path,
    cc: &Crosscoder,
    topk: Option<&BatchTopK>,
    normalizer: Option<&Normalizer>,
    p: &TrainParams,
    d: usize,
    f: usize,
    steps: u64,
) -> Result<(), StageError> {
    let cpu = Device::Cpu;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, var) in Crosscoder::NAMES.iter().zip(cc.vars()) {
        tensors.insert(name.to_string(), var.as_tensor().to_device(&cpu).map_err(candle)?);
    }
    tensors.insert("code_normalization_id".into(), Tensor::new(cc.norm.id(), &cpu).map_err(candle)?);
    // NormalizableMixin's buffers: NaN statistics and scale 1 when normalisation is off.
    let (mean, std, scale) = match normalizer {
        Some(n) => (n.mean.clone(), n.std.clone(), n.global_scale),
        None => (vec![f32::NAN; 2 * cc.d], vec![f32::NAN; 2 * cc.d], 1.0),
    };
    tensors.insert("activation_mean".into(), Tensor::from_vec(mean, (2, cc.d), &cpu).map_err(candle)?);
    tensors.insert("activation_std".into(), Tensor::from_vec(std, (2, cc.d), &cpu).map_err(candle)?);
    tensors.insert("activation_global_scale".into(), Tensor::new(scale, &cpu).map_err(candle)?);
    tensors.insert("target_rms".into(), Tensor::new(Normalizer::TARGET_RMS, &cpu).map_err(candle)?);
    if let Some(t) = topk {
        tensors.insert("k".into(), Tensor::new(t.k as i64, &cpu).map_err(candle)?);
        tensors.insert("threshold".into(), Tensor::new(t.threshold, &cpu).map_err(candle)?);
    }
    let path = dir.join("crosscoder.safetensors");
    candle_core::safetensors::save(&tensors, &path).map_err(candle)?;
    let (dict_class, trainer_class) = match p.loss {
        LossKind::Batchtopk => ("BatchTopKCrossCoder", "BatchTopKCrossCoderTrainer"),
        LossKind::L1 => ("CrossCoder", "CrossCoderTrainer"),
    };
    let mut trainer = serde_json::json!({
        "dict_class": dict_class,
        "trainer_class": trainer_class,
        "activation_dim": d,
        "dict_size": f,
        "num_layers": 2,
        "lr": p.lr,
        "warmup_steps": p.warmup_steps,
        "steps": steps,
        "seed": p.seed,
        "code_normalization": format!("{:?}", cc.norm).to_uppercase(),
    });
    match topk {
        Some(t) => {
            trainer["k"] = t.k.into();
            trainer["auxk_alpha"] = t.auxk_alpha.into();
            trainer["dead_feature_threshold"] = t.dead_tokens.into();
            trainer["threshold_start_step"] = p.threshold_start_step.into();
        }
        None => trainer["l1_penalty"] = p.mu.into(),
    }
    let config = serde_json::json!({ "trainer": trainer, "pipe": { "params": p } });
    let path: PathBuf = dir.join("config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("serializable"))
        .map_err(|e| StageError::io(path.display(), e))
}

/// A trained crosscoder, loaded from a `train` stage's output (or any dictionary_learning state
/// dict in safetensors).
pub fn load_crosscoder(dir: &Path, device: &Device) -> Result<(Crosscoder, Option<f32>), StageError> {
    let path = dir.join("crosscoder.safetensors");
    let tensors = candle_core::safetensors::load(&path, device)
        .map_err(|e| StageError::failed(format!("{}: {e}", path.display())))?;
    let get = |name: &str| {
        tensors
            .get(name)
            .or_else(|| tensors.get(&format!("_orig_mod.{name}")))
            .cloned()
            .ok_or_else(|| StageError::failed(format!("{}: no tensor `{name}`", path.display())))
    };
    let w_enc = get("encoder.weight")?;
    let (l, d, f) = w_enc.dims3().map_err(candle)?;
    if l != 2 {
        return Err(StageError::failed(format!(
            "{}: encoder.weight has {l} models, expected 2",
            path.display()
        )));
    }
    let norm = match get("code_normalization_id") {
        Ok(t) => {
            let id: i64 = t.to_dtype(DType::I64).and_then(|t| t.to_scalar()).map_err(candle)?;
            CodeNormalization::from_id(id).ok_or_else(|| {
                StageError::failed(format!("{}: code_normalization_id {id} is not supported", path.display()))
            })?
        }
        Err(_) => CodeNormalization::Crosscoder,
    };
    let var = |t: Tensor| candle_core::Var::from_tensor(&t.to_dtype(DType::F32)?);
    let cc = Crosscoder {
        w_enc: var(w_enc).map_err(candle)?,
        b_enc: var(get("encoder.bias")?).map_err(candle)?,
        w_dec: var(get("decoder.weight")?).map_err(candle)?,
        b_dec: var(get("decoder.bias")?).map_err(candle)?,
        norm,
        d,
        f,
        matmul_dtype: DType::F32,
    };
    let threshold = match get("threshold") {
        Ok(t) => {
            Some(t.to_dtype(DType::F32).and_then(|t| t.flatten_all()?.get(0)?.to_scalar()).map_err(candle)?)
        }
        Err(_) => None,
    };
    Ok((cc, threshold))
}

/// The normaliser of `caches`' pooled statistics (each cache's Welford state merged exactly).
fn merged_normalizer(
    caches: &[ActivationCache],
    keep_relative_variance: bool,
) -> Result<Normalizer, StageError> {
    let mut total = 0f64;
    let mut parts = Vec::new();
    for c in caches {
        let (count, mean, m2) =
            c.stats_raw().map_err(|e| StageError::failed(format!("normalize_activations: {e}")))?;
        total += count;
        parts.push((count, mean, m2));
    }
    let width = parts[0].1.len();
    let mean: Vec<f64> =
        (0..width).map(|i| parts.iter().map(|(n, m, _)| n * m[i]).sum::<f64>() / total).collect();
    let m2: Vec<f64> = (0..width)
        .map(|i| parts.iter().map(|(n, m, s)| s[i] + n * (m[i] - mean[i]).powi(2)).sum::<f64>())
        .collect();
    let std: Vec<f32> = m2.iter().map(|s| (s / (total - 1.0)).sqrt() as f32).collect();
    Ok(Normalizer::new(mean.iter().map(|m| *m as f32).collect(), std, keep_relative_variance))
}

/// The activation normaliser a crosscoder was trained with (`activation_mean` etc. in its state
/// dict), or `None` when it was trained on raw activations (NaN buffers, or none at all).
pub fn load_normalizer(dir: &Path) -> Result<Option<Normalizer>, StageError> {
    let path = dir.join("crosscoder.safetensors");
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| StageError::failed(format!("{}: {e}", path.display())))?;
    let vec = |name: &str| -> Option<Vec<f32>> {
        tensors.get(name).and_then(|t| t.to_dtype(DType::F32).ok()?.flatten_all().ok()?.to_vec1().ok())
    };
    let (Some(mean), Some(std)) = (vec("activation_mean"), vec("activation_std")) else {
        return Ok(None);
    };
    if mean.iter().any(|m| m.is_nan()) {
        return Ok(None);
    }
    let scale = vec("activation_global_scale").and_then(|v| v.first().copied()).unwrap_or(1.0);
    let mut n = Normalizer::new(mean, std, scale != 1.0);
    n.global_scale = scale;
    Ok(Some(n))
}
