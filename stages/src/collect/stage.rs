//! The `collect` stage (DOMAIN.md §6a, §6b): every token of the validation caches streamed
//! through a crosscoder, giving the scaled latent activations a = f·c (ReLU codes for an L1
//! crosscoder, the inference threshold for BatchTopK). Streamed into per-latent statistics (max
//! activation, firing frequency, overall and per cache; the share of a latent's activation that
//! falls on chat-template tokens) and into the sparse activations of every document ([`Csr`]),
//! so "where does latent j fire" is a slice of `by_latent`.
//!
//! Tokens go through the crosscoder in contiguous batches of `batch_size` rows (batches cross
//! document boundaries; the encoder is per token, so the batching changes no value). Memory is
//! one dense batch plus per-latent accumulators, and the CSR, which is the output.
//!
//! Outputs: `activations.safetensors` ([`Csr`]: sequence s = document s − `dataset_seqs[k]` of
//! input cache k, empty documents included as empty sequences), `stats.safetensors` (see
//! [`Collected::write_stats`]), `latents.parquet` (and `latents.csv`) with the decoder columns of
//! [`crate::latents::decoder_columns`] and the statistics, and `examples.db` (quantile activating
//! examples, [`super::examples`]) unless `examples = 0`.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use engine::{Arity, DeviceUse, InputSpec, ParamError, Stage, StageContext, StageError};
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::csr::Csr;
use super::examples::{ExampleParams, PAPER_QUANTILES, check_quantiles, quantile_examples};
use crate::cache::ActivationCache;
use crate::latents::{Class, ClassThresholds, Column, DecoderStats, LatentTable, decoder_columns};
use crate::text::{TextError, TextTokenizer};
use crate::train::crosscoder::{BatchTopK, Crosscoder, Normalizer};
use crate::train::{load_crosscoder, load_normalizer};

pub struct CollectStage;

/// Parameters of the `collect` stage. Inputs: `crosscoder` (a `train` or `crosscoder` stage) and
/// `activations` (validation caches, one per dataset, e.g. web then chat).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CollectParams {
    /// Tokens read from each cache: its first documents, the last one cut (default: all; the
    /// paper: all of the 5M-token validation caches).
    #[serde(default)]
    pub max_tokens_per_cache: Option<u64>,
    /// Tokens per crosscoder forward. Not part of the key: change it to fit memory (one batch is
    /// `batch_size × latents` f32 on the device and on the host).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Class boundaries on Δ_norm for the `class` column (the paper's defaults).
    #[serde(default)]
    pub class: ClassThresholds,
    /// Also write `latents.csv`.
    #[serde(default)]
    pub csv: bool,
    /// Activations above this are stored in `activations.safetensors` (statistics count every
    /// nonzero activation).
    #[serde(default)]
    pub min_activation: f64,
    /// Quantile activating examples kept per (latent, activation bucket) in `examples.db`, by
    /// seeded reservoir sampling (DOMAIN.md §6c; 0: no `examples.db`).
    #[serde(default = "default_examples")]
    pub examples: usize,
    /// Bucket boundaries of the examples, as fractions of each latent's max activation (strictly
    /// increasing; the paper's by default).
    #[serde(default = "default_quantiles")]
    pub quantiles: Vec<f64>,
    /// Seed of the examples' reservoir sampling.
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_examples() -> usize {
    ExampleParams::default().n
}

fn default_quantiles() -> Vec<f64> {
    PAPER_QUANTILES.to_vec()
}

fn default_seed() -> u64 {
    ExampleParams::default().seed
}

fn default_batch_size() -> usize {
    4096
}

impl Stage for CollectStage {
    type Params = CollectParams;
    const KIND: &'static str = "collect";
    // 2: `examples.db`.
    const VERSION: u32 = 2;
    const DOC: &'static str = "Scaled latent activations of every validation token: per-latent statistics, \
        the sparse activations by document and by latent, the latent table and quantile activating examples.";
    const UNKEYED: &'static [&'static str] = &["batch_size"];

    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            crate::train::crosscoder_input(),
            InputSpec::stage_of(
                "activations",
                &["cache"],
                Arity::Many,
                "Validation caches, one per dataset, in this order (the paper: web, then chat).",
            ),
        ]
    }

    fn device(&self) -> DeviceUse {
        DeviceUse::Accelerator
    }

    fn check(&self, p: &CollectParams) -> Result<(), ParamError> {
        if p.batch_size == 0 {
            return Err(ParamError::new(&["batch_size"], "must be at least 1"));
        }
        if p.max_tokens_per_cache == Some(0) {
            return Err(ParamError::new(
                &["max_tokens_per_cache"],
                "must be at least 1 (leave it out for all)",
            ));
        }
        if !(p.min_activation.is_finite() && p.min_activation >= 0.0) {
            return Err(ParamError::new(&["min_activation"], "must be a finite number ≥ 0"));
        }
        check_quantiles(&p.quantiles).map_err(|m| ParamError::new(&["quantiles"], m))?;
        let c = &p.class;
        for (name, v) in [
            ("chat_only", c.chat_only),
            ("base_only", c.base_only),
            ("shared_low", c.shared_low),
            ("shared_high", c.shared_high),
        ] {
            if !v.is_finite() {
                return Err(ParamError::new(&["class", name], "must be a finite number"));
            }
        }
        if c.shared_low > c.shared_high {
            return Err(ParamError::new(&["class", "shared_low"], "must not exceed `shared_high`"));
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

    fn run(&self, p: &CollectParams, ctx: &mut StageContext) -> Result<(), StageError> {
        run(p, ctx)
    }
}

fn candle(e: candle_core::Error) -> StageError {
    StageError::failed(format!("tensor operation failed: {e}"))
}

fn run(p: &CollectParams, ctx: &mut StageContext) -> Result<(), StageError> {
    let t0 = Instant::now();
    let device = crate::device::candle_device(ctx.device())?;
    let cc_dir = ctx.input("crosscoder")?.dir.clone();
    let (cc, threshold) = load_crosscoder(&cc_dir, &device)?;
    let normalizer = load_normalizer(&cc_dir)?;
    let upstreams = ctx.inputs("activations").to_vec();
    let mut caches = Vec::with_capacity(upstreams.len());
    let mut templates = Vec::with_capacity(upstreams.len());
    for u in &upstreams {
        let cache = ActivationCache::open(&u.dir)
            .map_err(|e| StageError::failed(format!("input `{}` (activations): {e}", u.stage)))?;
        if cache.d_model() != cc.d {
            return Err(StageError::failed(format!(
                "input `{}` holds activations of width {}, the crosscoder takes {}: use caches of the \
                 layer the crosscoder was trained on",
                u.stage,
                cache.d_model(),
                cc.d
            )));
        }
        let dir = cache.meta().tokenizer.clone();
        let ids = match template_token_ids(&dir) {
            Ok(Some(ids)) => {
                tracing::info!("`{}`: {} chat-template token ids {ids:?}", u.stage, ids.len());
                Some(ids)
            }
            Ok(None) => {
                tracing::warn!(
                    "`{}`: no tokenizer with a chat template at `{}`; the template share is NaN",
                    u.stage,
                    dir.display()
                );
                None
            }
            Err(e) => {
                tracing::warn!("`{}`: {e}; the template share is NaN", u.stage);
                None
            }
        };
        templates.push(ids);
        caches.push(cache);
    }
    let mode = match threshold {
        Some(t) => format!("BatchTopK, threshold {t}"),
        None => "ReLU (L1)".into(),
    };
    tracing::info!(
        "{} latents ({mode}){}, {} caches",
        cc.f,
        if normalizer.is_some() { ", normalised inputs" } else { "" },
        caches.len()
    );
    let total: u64 = caches.iter().map(|c| used_tokens(c, p.max_tokens_per_cache)).sum();
    let progress = ctx.progress().clone();
    progress.set_total(total, "tokens");
    let cancel = ctx.cancel_flag();
    let mut on_batch = |n: u64| {
        progress.inc(n);
        if cancel.is_cancelled() { Err(StageError::Cancelled) } else { Ok(()) }
    };
    let mut collected =
        collect(&cc, threshold, normalizer.as_ref(), &caches, &templates, p, &device, &mut on_batch)?;
    // Columns are named by position (`ds0`, `ds1`, … in the order of `activations`), never by
    // stage name: names are not in the key, so a reused object must not depend on them.
    let names: Vec<String> = (0..upstreams.len()).map(|k| format!("ds{k}")).collect();
    let mut metrics = collected.write(ctx.out_dir(), &cc, &names, p)?;
    if p.examples > 0 {
        let tokenizer = examples_tokenizer(&caches);
        let rows = collected.write_examples(ctx.out_dir(), tokenizer.as_ref(), p)?;
        metrics.push(("examples".into(), rows.into()));
    }
    for (name, value) in metrics {
        ctx.record_metric(&name, value);
    }
    tracing::info!(
        "{} tokens, {} sequences, {} entries in {:.1}s",
        collected.total_tokens,
        collected.csr.num_sequences(),
        collected.csr.values.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The tokenizer that encoded the caches (the first cache's, from its `cache.json`), to decode
/// the examples' tokens; `None`, with a warning, when it cannot be loaded.
fn examples_tokenizer(caches: &[ActivationCache]) -> Option<TextTokenizer> {
    let dir = caches.first()?.meta().tokenizer.clone();
    if caches.iter().any(|c| c.meta().tokenizer != dir) {
        tracing::warn!(
            "the caches record different tokenizers; examples.db decodes with `{}`",
            dir.display()
        );
    }
    if dir.as_os_str().is_empty() || !dir.join("tokenizer.json").is_file() {
        tracing::warn!(
            "no tokenizer at `{}` (the caches' `tokenizer`): examples.db has no `token_strings`",
            dir.display()
        );
        return None;
    }
    TextTokenizer::from_dir(&dir)
        .inspect_err(|e| tracing::warn!("{e}: examples.db has no `token_strings`"))
        .ok()
}

/// Tokens read from `cache` under `max_tokens_per_cache`.
fn used_tokens(cache: &ActivationCache, limit: Option<u64>) -> u64 {
    limit.map_or(cache.len(), |l| l.min(cache.len()))
}

/// The chat-template tokens of the tokenizer in `dir`: its added special tokens, other than BOS,
/// that the chat template writes out literally (as the tiny models plant their difference on).
/// `None` when `dir` holds no tokenizer or the tokenizer has no chat template.
pub fn template_token_ids(dir: &Path) -> Result<Option<Vec<u32>>, TextError> {
    if dir.as_os_str().is_empty() || !dir.join("tokenizer.json").is_file() {
        return Ok(None);
    }
    let tokenizer = TextTokenizer::from_dir(dir)?;
    let Some(template) = tokenizer.chat_template() else {
        return Ok(None);
    };
    let bos = tokenizer.special_tokens().bos.as_deref();
    let mut ids: Vec<u32> = tokenizer
        .inner()
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(_, t)| {
            t.special && Some(t.content.as_str()) != bos && template.source().contains(&t.content)
        })
        .map(|(id, _)| id)
        .collect();
    ids.sort_unstable();
    Ok(Some(ids))
}

/// Per-latent statistics of one input cache.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetStats {
    pub tokens: u64,
    pub max: Vec<f32>,
    /// Tokens on which the latent's activation is nonzero.
    pub count: Vec<u64>,
}

/// What [`collect`] computes: the sparse activations and the per-latent statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct Collected {
    pub csr: Csr,
    pub total_tokens: u64,
    pub datasets: Vec<DatasetStats>,
    /// Σ of each latent's activations, and Σ on chat-template tokens (f64, in token order).
    pub sum: Vec<f64>,
    pub template_sum: Vec<f64>,
    /// Whether every cache's template tokens were known (else the template share is NaN).
    pub has_template: bool,
}

impl Collected {
    pub fn max_activation(&self) -> Vec<f32> {
        let f = self.sum.len();
        (0..f).map(|j| self.datasets.iter().map(|d| d.max[j]).fold(0f32, f32::max)).collect()
    }

    pub fn count(&self) -> Vec<u64> {
        let f = self.sum.len();
        (0..f).map(|j| self.datasets.iter().map(|d| d.count[j]).sum()).collect()
    }

    /// count / tokens.
    pub fn frequency(&self) -> Vec<f64> {
        let t = self.total_tokens.max(1) as f64;
        self.count().iter().map(|c| *c as f64 / t).collect()
    }

    /// The share of each latent's summed activation on chat-template tokens (NaN if it never
    /// fires or the template tokens are unknown).
    pub fn template_share(&self) -> Vec<f64> {
        self.sum
            .iter()
            .zip(&self.template_sum)
            .map(|(s, t)| if self.has_template && *s > 0.0 { t / s } else { f64::NAN })
            .collect()
    }

    /// `stats.safetensors`: per latent (F,) `max_activation`, `frequency`, `template_share` (F32),
    /// `count` (I64), and per input cache k `max_activation.<k>`, `frequency.<k>`, `count.<k>`;
    /// `total_tokens` (I64, a scalar) and `dataset_tokens` (I64, (D,)).
    pub fn write_stats(&self, path: &Path) -> Result<(), StageError> {
        let cpu = Device::Cpu;
        let f32s = |v: Vec<f32>| {
            let n = v.len();
            Tensor::from_vec(v, n, &cpu)
        };
        let f64s = |v: Vec<f64>| f32s(v.iter().map(|x| *x as f32).collect());
        let i64s =
            |v: &[u64]| Tensor::from_vec(v.iter().map(|x| *x as i64).collect::<Vec<_>>(), v.len(), &cpu);
        let mut t: Vec<(String, candle_core::Result<Tensor>)> = vec![
            ("max_activation".into(), f32s(self.max_activation())),
            ("frequency".into(), f64s(self.frequency())),
            ("count".into(), i64s(&self.count())),
            ("template_share".into(), f64s(self.template_share())),
            ("total_tokens".into(), Tensor::new(self.total_tokens as i64, &cpu)),
            ("dataset_tokens".into(), i64s(&self.datasets.iter().map(|d| d.tokens).collect::<Vec<_>>())),
        ];
        for (k, d) in self.datasets.iter().enumerate() {
            let tokens = d.tokens.max(1) as f64;
            t.push((format!("max_activation.{k}"), f32s(d.max.clone())));
            t.push((format!("frequency.{k}"), f64s(d.count.iter().map(|c| *c as f64 / tokens).collect())));
            t.push((format!("count.{k}"), i64s(&d.count)));
        }
        let tensors: HashMap<String, Tensor> = t
            .into_iter()
            .map(|(k, v)| v.map(|v| (k, v)))
            .collect::<candle_core::Result<_>>()
            .map_err(candle)?;
        candle_core::safetensors::save(&tensors, path)
            .map_err(|e| StageError::failed(format!("{}: {e}", path.display())))
    }

    /// The latent table: `decoder_columns`, then `max_act_val`, `freq_val`, per input cache
    /// `max_act_<name>_val` and `freq_<name>_val` (`names`: `ds0`, `ds1`, … by input position),
    /// `template_share` and `dead` (never fired).
    pub fn table(
        &self,
        cc: &Crosscoder,
        names: &[String],
        class: &ClassThresholds,
    ) -> Result<LatentTable, StageError> {
        let w_dec: Vec<f32> = cc
            .w_dec
            .as_tensor()
            .to_device(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1())
            .map_err(candle)?;
        let mut table = decoder_columns(&DecoderStats::new(&w_dec, cc.f, cc.d), class);
        let f64s = |v: &[f32]| Column::F64(v.iter().map(|x| *x as f64).collect());
        let mut cols = vec![
            ("max_act_val".to_string(), f64s(&self.max_activation())),
            ("freq_val".to_string(), Column::F64(self.frequency())),
        ];
        for (d, name) in self.datasets.iter().zip(names) {
            let tokens = d.tokens.max(1) as f64;
            cols.push((format!("max_act_{name}_val"), f64s(&d.max)));
            cols.push((
                format!("freq_{name}_val"),
                Column::F64(d.count.iter().map(|c| *c as f64 / tokens).collect()),
            ));
        }
        cols.push(("template_share".into(), Column::F64(self.template_share())));
        cols.push(("dead".into(), Column::Bool(self.count().iter().map(|c| *c == 0).collect())));
        for (name, col) in cols {
            table.push(&name, col).map_err(StageError::other)?;
        }
        Ok(table)
    }

    /// `examples.db`: the quantile activating examples of the CSR (indexed by latent, as
    /// [`Collected::write`] leaves it), decoded with `tokenizer` if given; returns its number of
    /// examples.
    pub fn write_examples(
        &self,
        out: &Path,
        tokenizer: Option<&TextTokenizer>,
        p: &CollectParams,
    ) -> Result<u64, StageError> {
        let params = ExampleParams { n: p.examples, quantiles: p.quantiles.clone(), seed: p.seed };
        let examples = quantile_examples(&self.csr, &self.max_activation(), &params);
        examples.write_sqlite(&out.join("examples.db"), &self.csr, tokenizer).map_err(StageError::other)?;
        Ok(examples.len() as u64)
    }

    /// Writes every output into `out` (indexing the CSR by latent first); returns the manifest
    /// metrics.
    pub fn write(
        &mut self,
        out: &Path,
        cc: &Crosscoder,
        names: &[String],
        p: &CollectParams,
    ) -> Result<Vec<(String, serde_json::Value)>, StageError> {
        self.csr.index_by_latent();
        let path = out.join("activations.safetensors");
        self.csr.write(&path).map_err(|e| StageError::failed(e.to_string()))?;
        self.write_stats(&out.join("stats.safetensors"))?;
        let table = self.table(cc, names, &p.class)?;
        table.write_parquet(&out.join("latents.parquet")).map_err(StageError::other)?;
        if p.csv {
            table.write_csv(&out.join("latents.csv")).map_err(StageError::other)?;
        }
        let count = self.count();
        let dead = count.iter().filter(|c| **c == 0).count();
        let nonzero: u64 = count.iter().sum();
        let mut metrics: Vec<(String, serde_json::Value)> = vec![
            ("tokens".into(), self.total_tokens.into()),
            ("sequences".into(), (self.csr.num_sequences() as u64).into()),
            ("entries".into(), (self.csr.values.len() as u64).into()),
            ("dead_fraction".into(), (dead as f64 / cc.f.max(1) as f64).into()),
            ("mean_l0".into(), (nonzero as f64 / self.total_tokens.max(1) as f64).into()),
        ];
        let mut classes = [0u64; 4];
        if let Some(Column::F64(delta)) = table.get("delta_norm") {
            for d in delta {
                classes[match Class::of(*d, &p.class) {
                    Class::ChatOnly => 0,
                    Class::BaseOnly => 1,
                    Class::Shared => 2,
                    Class::Other => 3,
                }] += 1;
            }
        }
        for (name, n) in ["chat_only", "base_only", "shared", "other"].iter().zip(classes) {
            metrics.push((format!("latents/{name}"), n.into()));
        }
        Ok(metrics)
    }
}

/// Streams every cache (in order, the first `max_tokens_per_cache` tokens of each) through the
/// crosscoder in batches of `p.batch_size` tokens. `templates[k]` are cache k's chat-template
/// token ids (sorted), `None` if unknown. `on_batch(tokens)` is called after every batch (for
/// progress and cancellation).
#[allow(clippy::too_many_arguments)]
pub fn collect(
    cc: &Crosscoder,
    threshold: Option<f32>,
    normalizer: Option<&Normalizer>,
    caches: &[ActivationCache],
    templates: &[Option<Vec<u32>>],
    p: &CollectParams,
    device: &Device,
    on_batch: &mut dyn FnMut(u64) -> Result<(), StageError>,
) -> Result<Collected, StageError> {
    let (f, d) = (cc.f, cc.d);
    let topk = threshold.map(|threshold| BatchTopK {
        k: 0,
        auxk_alpha: 0.0,
        dead_tokens: 0,
        since_fired: Vec::new(),
        threshold,
    });
    let c = cc.code_weights().map_err(candle)?;
    let mut out = Collected {
        csr: Csr::new(f),
        total_tokens: 0,
        datasets: Vec::with_capacity(caches.len()),
        sum: vec![0.0; f],
        template_sum: vec![0.0; f],
        has_template: templates.len() == caches.len() && templates.iter().all(Option::is_some),
    };
    let batch = p.batch_size.max(1) as u64;
    let budget = memory_available().map(|m| m / 10 * 9);
    for (k, cache) in caches.iter().enumerate() {
        let template = templates.get(k).and_then(Option::as_deref).unwrap_or(&[]);
        let used = used_tokens(cache, p.max_tokens_per_cache);
        let offsets = cache.doc_offsets();
        // Documents read: all of them (trailing empty ones too), or those starting before the cut.
        let docs = if used == cache.len() {
            cache.num_docs() as usize
        } else {
            offsets.partition_point(|&o| o < used)
        };
        let doc_end = |j: usize| offsets[j + 1].min(used);
        let mut stats = DatasetStats { tokens: used, max: vec![0.0; f], count: vec![0; f] };
        let (mut doc, mut tokens, mut entries) = (0usize, Vec::new(), Vec::new());
        let mut host = Vec::new();
        let mut start = 0u64;
        while start < used {
            let end = (start + batch).min(used);
            let rows = (end - start) as usize;
            host.resize(rows * 2 * d, 0f32);
            cache.range_into(start..end, &mut host);
            if let Some(n) = normalizer {
                n.apply(&mut host);
            }
            let x = Tensor::from_slice(&host, (rows, 2, d), device).map_err(candle)?;
            let codes = match &topk {
                Some(t) => t.encode_threshold(cc, &x),
                None => cc.pre_relu(&x),
            };
            let a: Vec<f32> =
                codes.and_then(|codes| codes.broadcast_mul(&c)?.flatten_all()?.to_vec1()).map_err(candle)?;
            let nonzero: Vec<Vec<(u32, f32)>> = a
                .par_chunks(f)
                .map(|row| {
                    row.iter().enumerate().filter(|(_, v)| **v > 0.0).map(|(j, v)| (j as u32, *v)).collect()
                })
                .collect();
            drop(a);
            for (i, row) in nonzero.iter().enumerate() {
                let r = start + i as u64;
                while doc_end(doc) <= r {
                    out.csr.push_sequence(&tokens, &entries);
                    tokens.clear();
                    entries.clear();
                    doc += 1;
                }
                let pos = (r - offsets[doc]) as u32;
                let token = cache.token(r);
                tokens.push(token);
                let on_template = template.binary_search(&token).is_ok();
                for &(j, v) in row {
                    let ju = j as usize;
                    stats.max[ju] = stats.max[ju].max(v);
                    stats.count[ju] += 1;
                    out.sum[ju] += v as f64;
                    if on_template {
                        out.template_sum[ju] += v as f64;
                    }
                    if v as f64 > p.min_activation {
                        entries.push((pos, j, v));
                    }
                }
            }
            let stored = out.csr.values.len() + entries.len();
            check_memory(stored as u64, out.total_tokens + end, f, budget, p.min_activation)?;
            on_batch(end - start)?;
            start = end;
        }
        while doc < docs {
            out.csr.push_sequence(&tokens, &entries);
            tokens.clear();
            entries.clear();
            doc += 1;
        }
        out.csr.end_dataset();
        out.total_tokens += used;
        out.datasets.push(stats);
    }
    Ok(out)
}

/// Peak bytes per stored activation: the CSR's (sequence, position, latent) u32s and f32 value
/// (16 B, up to twice that while its vectors grow), the u64 by-latent index (8 B), and the
/// tensor copies `activations.safetensors` is written from (24 B). A run whose CSR held dense
/// codes was killed at 24 GiB with an estimate of 24 B per entry still under budget.
const BYTES_PER_ENTRY: u64 = 16 * 2 + 8 + 24;

/// `MemAvailable` of /proc/meminfo, in bytes (None where it cannot be read).
fn memory_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Fails, before the kernel kills the process, once the activations stored so far (`entries`
/// over `tokens` tokens) need more than `budget` bytes: codes that dense mean an untrained
/// threshold or a too-low `min_activation`, and the error says so.
fn check_memory(
    entries: u64,
    tokens: u64,
    latents: usize,
    budget: Option<u64>,
    min_activation: f64,
) -> Result<(), StageError> {
    let Some(budget) = budget else { return Ok(()) };
    let need = entries * BYTES_PER_ENTRY;
    if need <= budget {
        return Ok(());
    }
    let per_token = entries as f64 / tokens.max(1) as f64;
    Err(StageError::failed(format!(
        "the stored activations outgrow memory: after {tokens} tokens, {entries} activations above \
         min_activation = {min_activation} ({per_token:.0} of {latents} latents per token) need \
         {:.1} GB, more than the {:.1} GB available. Codes this dense mean the crosscoder has no \
         trained threshold or fires on most tokens; raise `min_activation`, lower \
         `max_tokens_per_cache`, or check the crosscoder (its training metrics' L0)",
        need as f64 / 1e9,
        budget as f64 / 1e9
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::format::{CacheBuilder, StoreDtype};
    use crate::rng::SplitMix64;
    use crate::train::crosscoder::CodeNormalization;

    const D: usize = 4;
    const F: usize = 12;

    fn params() -> CollectParams {
        serde_json::from_str("{}").unwrap()
    }

    /// Two caches of documents with random activations and tokens 0..8 (lengths include 0).
    fn caches(dir: &Path) -> Vec<ActivationCache> {
        let mut rng = SplitMix64::stream(7, &[1]);
        let lengths = [[5usize, 0, 9, 1, 13, 0], [3, 8, 0, 2, 11, 4]];
        lengths
            .iter()
            .enumerate()
            .map(|(k, lens)| {
                let path = dir.join(format!("cache{k}"));
                let mut b = CacheBuilder::new(&path, D, StoreDtype::F32, 10).unwrap();
                for &n in lens {
                    let acts: Vec<f32> =
                        (0..n * 2 * D).map(|_| (rng.next_f64() * 2.0 - 1.0) as f32).collect();
                    let tokens: Vec<u32> = (0..n).map(|_| (rng.next_f64() * 8.0) as u32).collect();
                    b.push_doc(&acts, &tokens).unwrap();
                }
                b.finish("test").unwrap();
                ActivationCache::open(&path).unwrap()
            })
            .collect()
    }

    fn crosscoder() -> Crosscoder {
        let cc = Crosscoder::init(D, F, Some(1.0), CodeNormalization::Crosscoder, 3, &Device::Cpu).unwrap();
        // A nonzero encoder bias, so some latents fire often and some rarely.
        let b: Vec<f32> = (0..F).map(|j| j as f32 * 0.05 - 0.3).collect();
        cc.b_enc.set(&Tensor::from_vec(b, F, &Device::Cpu).unwrap()).unwrap();
        cc
    }

    fn run_collect(
        cc: &Crosscoder,
        threshold: Option<f32>,
        caches: &[ActivationCache],
        templates: &[Option<Vec<u32>>],
        p: &CollectParams,
    ) -> Collected {
        collect(cc, threshold, None, caches, templates, p, &Device::Cpu, &mut |_| Ok(())).unwrap()
    }

    /// a[t][j] for every token of `cache`, computed one token at a time in f64.
    fn brute(cc: &Crosscoder, threshold: Option<f32>, cache: &ActivationCache) -> Vec<Vec<f64>> {
        let w: Vec<f32> = cc.w_enc.as_tensor().flatten_all().unwrap().to_vec1().unwrap(); // (2, d, F)
        let b: Vec<f32> = cc.b_enc.as_tensor().to_vec1().unwrap();
        let dec: Vec<f32> = cc.w_dec.as_tensor().flatten_all().unwrap().to_vec1().unwrap(); // (2, F, d)
        let c: Vec<f64> = (0..F)
            .map(|j| {
                (0..2)
                    .map(|l| (0..D).map(|i| (dec[(l * F + j) * D + i] as f64).powi(2)).sum::<f64>().sqrt())
                    .sum()
            })
            .collect();
        let mut x = vec![0f32; 2 * D];
        (0..cache.len())
            .map(|t| {
                cache.pair_into(t, &mut x);
                (0..F)
                    .map(|j| {
                        let pre: f64 = b[j] as f64
                            + (0..2 * D).map(|li| x[li] as f64 * w[li * F + j] as f64).sum::<f64>();
                        let a = pre.max(0.0) * c[j];
                        match threshold {
                            Some(th) if a <= th as f64 => 0.0,
                            _ => a,
                        }
                    })
                    .collect()
            })
            .collect()
    }

    fn check(threshold: Option<f32>, batch_size: usize) {
        let dir = tempfile::tempdir().unwrap();
        let caches = caches(dir.path());
        let cc = crosscoder();
        let templates = vec![Some(vec![1, 5]), Some(vec![1, 5])];
        let p = CollectParams { batch_size, ..params() };
        let mut got = run_collect(&cc, threshold, &caches, &templates, &p);
        got.csr.index_by_latent();
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * (1.0 + b.abs());

        let mut seq = 0usize;
        let (mut sum, mut tsum) = (vec![0f64; F], vec![0f64; F]);
        for (k, cache) in caches.iter().enumerate() {
            let want = brute(&cc, threshold, cache);
            let stats = &got.datasets[k];
            assert_eq!(stats.tokens, cache.len());
            for j in 0..F {
                let max = want.iter().map(|r| r[j]).fold(0.0, f64::max);
                let count = want.iter().filter(|r| r[j] > 0.0).count() as u64;
                assert!(close(stats.max[j] as f64, max), "dataset {k} latent {j}: {} vs {max}", stats.max[j]);
                assert_eq!(stats.count[j], count, "dataset {k} latent {j}");
            }
            assert_eq!(got.csr.dataset_seqs[k] as usize, seq);
            let offsets = cache.doc_offsets();
            for doc in 0..cache.num_docs() as usize {
                let rows = offsets[doc]..offsets[doc + 1];
                let tokens: Vec<u32> = rows.clone().map(|r| cache.token(r)).collect();
                assert_eq!(got.csr.sequence_tokens(seq), tokens);
                let entries: Vec<(u32, u32, f64)> = got
                    .csr
                    .sequence_entries(seq)
                    .map(|e| (got.csr.ids[e][1], got.csr.ids[e][2], got.csr.values[e] as f64))
                    .collect();
                let mut expect = Vec::new();
                for r in rows {
                    for j in 0..F {
                        let a = want[r as usize][j];
                        if a > 0.0 {
                            expect.push(((r - offsets[doc]) as u32, j as u32, a));
                            sum[j] += a;
                            if [1, 5].contains(&cache.token(r)) {
                                tsum[j] += a;
                            }
                        }
                    }
                }
                assert_eq!(entries.len(), expect.len(), "dataset {k} document {doc}");
                for (g, w) in entries.iter().zip(&expect) {
                    assert!(g.0 == w.0 && g.1 == w.1 && close(g.2, w.2), "{g:?} vs {w:?}");
                }
                assert!(got.csr.sequence_entries(seq).all(|e| got.csr.ids[e][0] == seq as u32));
                seq += 1;
            }
        }
        assert_eq!(got.csr.num_sequences(), seq);
        assert_eq!(got.total_tokens, caches.iter().map(|c| c.len()).sum::<u64>());
        let share = got.template_share();
        let freq = got.frequency();
        let max = got.max_activation();
        for j in 0..F {
            // "Where does latent j fire" agrees with the statistics.
            let values: Vec<f32> =
                got.csr.latent_entries(j).iter().map(|e| got.csr.values[*e as usize]).collect();
            assert_eq!(values.len() as u64, got.count()[j]);
            assert_eq!(values.iter().copied().fold(0f32, f32::max), max[j]);
            assert!(close(freq[j] * got.total_tokens as f64, values.len() as f64));
            if sum[j] > 0.0 {
                assert!(
                    close(share[j], tsum[j] / sum[j]),
                    "latent {j}: {} vs {}",
                    share[j],
                    tsum[j] / sum[j]
                );
            } else {
                assert!(share[j].is_nan());
            }
        }
        assert!(got.count().iter().any(|c| *c > 0) && got.count().iter().any(|c| *c < got.total_tokens));
    }

    #[test]
    fn relu_stats_and_csr_match_brute_force() {
        check(None, 4096);
    }

    #[test]
    fn threshold_stats_and_csr_match_brute_force() {
        check(Some(0.4), 4096);
    }

    #[test]
    fn batches_crossing_documents_change_nothing() {
        check(Some(0.2), 3);
        check(None, 1);
    }

    #[test]
    fn dense_codes_fail_with_a_clear_error_before_memory_runs_out() {
        assert!(check_memory(1_000, 10, 64, None, 0.0).is_ok(), "no budget, no check");
        assert!(check_memory(1_000, 10, 64, Some(1_000 * BYTES_PER_ENTRY), 0.0).is_ok());
        let e = check_memory(1_001, 10, 64, Some(1_000 * BYTES_PER_ENTRY), 0.25).unwrap_err().to_string();
        assert!(
            e.contains("after 10 tokens, 1001 activations above min_activation = 0.25 (100 of 64"),
            "{e}"
        );
        assert!(e.contains("raise `min_activation`"), "{e}");
        assert!(memory_available().is_some_and(|m| m > 0), "Linux has /proc/meminfo");
    }

    #[test]
    fn token_limit_cuts_the_last_document_and_min_activation_filters_entries() {
        let dir = tempfile::tempdir().unwrap();
        let caches = caches(dir.path());
        let cc = crosscoder();
        let p = CollectParams { max_tokens_per_cache: Some(10), min_activation: 0.5, ..params() };
        let got = run_collect(&cc, None, &caches, &[None, None], &p);
        // Cache 0: documents of 5, 0, 9 tokens: 5 + 0 + 5 (cut); cache 1: 3 + 7 (cut).
        assert_eq!(got.csr.dataset_seqs, [0, 3, 5]);
        assert_eq!(got.csr.token_offsets, [0, 5, 5, 10, 13, 20]);
        assert_eq!(got.total_tokens, 20);
        assert!(got.csr.values.iter().all(|v| *v > 0.5));
        let all = run_collect(&cc, None, &caches, &[None, None], &CollectParams { min_activation: 0.0, ..p });
        assert!(all.csr.values.len() > got.csr.values.len());
        assert_eq!(all.datasets, got.datasets, "statistics count every nonzero activation");
        assert!(got.template_share().iter().all(|s| s.is_nan()));
    }

    #[test]
    fn same_inputs_give_byte_identical_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let caches = caches(dir.path());
        let cc = crosscoder();
        let names = vec!["web".to_string(), "chat".to_string()];
        let p = CollectParams { csv: true, ..params() };
        let files = ["activations.safetensors", "stats.safetensors", "latents.parquet", "latents.csv"];
        let mut outputs = Vec::new();
        for (i, batch_size) in [4096, 7].into_iter().enumerate() {
            let out = dir.path().join(format!("out{i}"));
            std::fs::create_dir_all(&out).unwrap();
            let p = CollectParams { batch_size, ..p.clone() };
            let mut got = run_collect(&cc, Some(0.3), &caches, &[Some(vec![2]), Some(vec![2])], &p);
            let metrics = got.write(&out, &cc, &names, &p).unwrap();
            assert!(metrics.iter().any(|(n, _)| n == "latents/shared"));
            outputs.push(files.map(|f| std::fs::read(out.join(f)).unwrap()));
        }
        assert!(outputs[0] == outputs[1], "outputs differ between runs");
        let csv = String::from_utf8(outputs[0][3].clone()).unwrap();
        let header = csv.lines().next().unwrap();
        assert!(
            header.ends_with("max_act_val,freq_val,max_act_web_val,freq_web_val,max_act_chat_val,freq_chat_val,template_share,dead"),
            "{header}"
        );
        let csr = Csr::read(&dir.path().join("out0/activations.safetensors")).unwrap();
        assert_eq!(csr.latent_offsets.len(), F + 1);
        let stats =
            candle_core::safetensors::load(dir.path().join("out0/stats.safetensors"), &Device::Cpu).unwrap();
        for name in
            ["max_activation", "frequency", "count", "template_share", "max_activation.1", "frequency.0"]
        {
            assert_eq!(stats[name].dims(), [F], "{name}");
        }
        assert_eq!(stats["total_tokens"].to_scalar::<i64>().unwrap(), 56);
    }

    #[test]
    fn template_tokens_of_the_tiny_tokenizer() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/tiny/llama/base");
        let ids = template_token_ids(&dir).unwrap().expect("the tiny tokenizer has a chat template");
        let tok = TextTokenizer::from_dir(&dir).unwrap();
        let names: Vec<String> = ids.iter().map(|i| tok.inner().id_to_token(*i).unwrap()).collect();
        assert!(
            names.contains(&"<|eot_id|>".to_string()) && names.contains(&"<|start_header_id|>".to_string())
        );
        assert!(!names.contains(&"<|begin_of_text|>".to_string()), "{names:?}");
        assert_eq!(template_token_ids(Path::new("")).unwrap(), None);
    }

    #[test]
    fn params_are_checked() {
        let s = CollectStage;
        assert!(s.check(&params()).is_ok());
        assert!(s.check(&CollectParams { batch_size: 0, ..params() }).is_err());
        assert!(s.check(&CollectParams { min_activation: -1.0, ..params() }).is_err());
        assert!(s.check(&CollectParams { max_tokens_per_cache: Some(0), ..params() }).is_err());
        assert!(s.check(&CollectParams { quantiles: vec![0.5, 0.25], ..params() }).is_err());
        assert!(serde_json::from_str::<CollectParams>(r#"{"bogus": 1}"#).is_err());
        let p: CollectParams = serde_json::from_str(r#"{"class": {"chat_only": 0.8}}"#).unwrap();
        assert_eq!((p.class.chat_only, p.class.base_only, p.batch_size), (0.8, 0.1, 4096));
    }
}
