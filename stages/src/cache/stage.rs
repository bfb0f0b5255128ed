//! The `cache` stage: runs a base and a chat model over the same tokens and stores the residual
//! stream after decoder block `layer` of both, paired, for every stored token (DOMAIN.md §1).
//!
//! Work goes in windows of `8 × batch_size` documents, in dataset order: tokenize, cut at
//! `max_tokens`, run both models on micro-batches of similar length (right-padded; padding never
//! reaches the store), and hand the window, in dataset order, to a writer thread that appends it
//! to the current shard and folds it into the per-dimension statistics. A shard is finished once
//! it holds `shard_tokens` tokens; then the writer commits the resume state (shards done,
//! documents consumed, statistics) to the work dir. A killed run resumes from the last finished
//! shard and produces the same bytes (for the same `batch_size`).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use engine::{Arity, DeviceUse, InputSpec, ParamError, Stage, StageContext, StageError};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::CacheError;
use super::format::{CacheMeta, DatasetInfo, FORMAT, ModelInfo, ShardInfo, ShardWriter, StoreDtype, Welford};
use crate::models::Model;
use crate::text::{Column, TextTokenizer, TokenMap, kept_range, open_texts};

/// Documents per window = `READ_AHEAD × batch_size`.
const READ_AHEAD: usize = 8;

pub struct CacheStage;

/// The dtype the models run in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    /// f32 on the CPU, bf16 on CUDA (the run records which).
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

impl ComputeDtype {
    /// The candle dtype on `device` (`auto`: f32 on the CPU, bf16 elsewhere).
    pub(crate) fn on(self, device: &Device) -> DType {
        match (self, device.is_cpu()) {
            (ComputeDtype::Auto, true) | (ComputeDtype::F32, _) => DType::F32,
            (ComputeDtype::Auto, false) | (ComputeDtype::Bf16, _) => DType::BF16,
            (ComputeDtype::F16, _) => DType::F16,
        }
    }
}

/// The dtype activations are stored in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StoreDtypeParam {
    /// The compute dtype.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

/// How documents are read from the dataset column.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    /// One string per record (`text`, or a pre-rendered `text_llama3`).
    #[default]
    Text,
    /// A list of `{role, content}` per record, rendered with the tokenizer's chat template.
    Messages,
}

/// Whose tokenizer encodes the documents (the pair must share a vocabulary).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerSource {
    #[default]
    Chat,
    Base,
}

/// Token ids replaced in the base model's input only: `"none"`, `"llama3"` (the paper's map for
/// base Llama 3 models: `<|start_header_id|>`→1432, `<|eot_id|>`/`<|end_header_id|>`→827), or a
/// list of `[from, to]` pairs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum BaseTokenMap {
    Preset(String),
    Pairs(Vec<[u32; 2]>),
}

impl Default for BaseTokenMap {
    fn default() -> Self {
        BaseTokenMap::Preset("none".into())
    }
}

impl BaseTokenMap {
    /// The map this value names; an error message for an unknown preset.
    pub(crate) fn resolve(&self) -> Result<TokenMap, String> {
        match self {
            BaseTokenMap::Preset(name) if name == "none" => Ok(TokenMap::default()),
            BaseTokenMap::Preset(name) if name == "llama3" => Ok(TokenMap::llama3_base()),
            BaseTokenMap::Preset(name) => Err(format!(
                "unknown token map {name:?}: use \"none\", \"llama3\" or a list of [from, to] pairs"
            )),
            BaseTokenMap::Pairs(pairs) => Ok(TokenMap::from_pairs(pairs.iter().map(|[a, b]| (*a, *b)))),
        }
    }
}

/// Parameters of the `cache` stage. Inputs: `base`, `chat` (model folders) and `data` (a dataset
/// file or folder).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheParams {
    /// Decoder block whose output is cached (0-based): transformers' `hidden_states[layer + 1]`.
    pub layer: usize,
    /// The split to read when `data` is a folder (`train`, `validation`); ignored for a file.
    #[serde(default)]
    pub split: Option<String>,
    /// The dataset column holding the documents.
    #[serde(default = "default_column")]
    pub column: String,
    /// `text` (a string per record) or `messages` (a list of {role, content}, chat-templated).
    #[serde(default)]
    pub column_type: ColumnType,
    /// Read at most this many documents (the paper: 1,000,000).
    #[serde(default)]
    pub max_docs: Option<u64>,
    /// Stop after the document that brings the stored tokens to this many.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Documents are truncated to this many tokens (the paper: 1024).
    #[serde(default = "default_context_len")]
    pub context_len: usize,
    /// Positions dropped at the start of every document (the paper: 25 for Llama, 0 for Gemma).
    #[serde(default)]
    pub ignore_first_n: usize,
    /// Token replacement in the base model's input.
    #[serde(default)]
    pub base_token_map: BaseTokenMap,
    /// Which model folder's tokenizer encodes the documents.
    #[serde(default)]
    pub tokenizer: TokenizerSource,
    /// The dtype the models run in.
    #[serde(default)]
    pub dtype: ComputeDtype,
    /// The dtype activations are stored in.
    #[serde(default)]
    pub store_dtype: StoreDtypeParam,
    /// A shard is closed once it holds this many tokens (it ends on a window boundary).
    #[serde(default = "default_shard_tokens")]
    pub shard_tokens: u64,
    /// Documents per forward micro-batch. Not part of the key: change it to fit memory.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

fn default_column() -> String {
    "text".into()
}
fn default_context_len() -> usize {
    crate::text::DEFAULT_CONTEXT_LEN
}
fn default_shard_tokens() -> u64 {
    1_000_000
}
fn default_batch_size() -> usize {
    16
}

impl Stage for CacheStage {
    type Params = CacheParams;
    const KIND: &'static str = "cache";
    const VERSION: u32 = 1;
    const DOC: &'static str =
        "Paired base/chat residual-stream activations at one layer, for every token of a dataset.";
    const UNKEYED: &'static [&'static str] = &["batch_size"];

    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec::path(
                "base",
                Arity::One,
                "The base model: a folder with config.json, *.safetensors and tokenizer.json, or a \
                 Hugging Face cache reference `org/name[@revision]`.",
            )
            .with_resolver(crate::hf::model_ref),
            InputSpec::path("chat", Arity::One, "The chat model, as `base` (same vocabulary and width).")
                .with_resolver(crate::hf::model_ref),
            InputSpec::path(
                "data",
                Arity::One,
                "The dataset: a .jsonl or .parquet file, a folder read by `split`, or a Hugging Face \
                 dataset cache reference `org/name[@revision]`.",
            )
            .with_resolver(crate::hf::dataset_ref),
        ]
    }

    fn device(&self) -> DeviceUse {
        DeviceUse::Accelerator
    }

    fn check(&self, p: &CacheParams) -> Result<(), ParamError> {
        if p.context_len == 0 {
            return Err(ParamError::new(&["context_len"], "must be at least 1"));
        }
        if p.ignore_first_n >= p.context_len {
            return Err(ParamError::new(
                &["ignore_first_n"],
                format!("must be below context_len ({}), or no token is ever stored", p.context_len),
            ));
        }
        if p.shard_tokens == 0 {
            return Err(ParamError::new(&["shard_tokens"], "must be at least 1"));
        }
        if p.batch_size == 0 {
            return Err(ParamError::new(&["batch_size"], "must be at least 1"));
        }
        if p.max_tokens == Some(0) {
            return Err(ParamError::new(&["max_tokens"], "must be at least 1 (leave it out for no limit)"));
        }
        if p.max_docs == Some(0) {
            return Err(ParamError::new(&["max_docs"], "must be at least 1 (leave it out for no limit)"));
        }
        p.base_token_map.resolve().map_err(|m| ParamError::new(&["base_token_map"], m))?;
        Ok(())
    }

    fn run(&self, p: &CacheParams, ctx: &mut StageContext) -> Result<(), StageError> {
        run(p, ctx)
    }
}

/// What survives a kill: written to the work dir after every finished shard.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct ResumeState {
    shards: Vec<ShardInfo>,
    /// Documents consumed from the dataset (stored or not).
    docs: u64,
    tokens: u64,
    /// Statistics over `[base | chat]` rows of width 2·d.
    welford: Option<Welford>,
    /// The dataset is exhausted (or a limit reached): only finishing is left.
    done: bool,
}

impl ResumeState {
    fn path(ctx: &StageContext) -> PathBuf {
        ctx.work_dir().join("cache-state.json")
    }

    fn load(ctx: &StageContext) -> Result<ResumeState, StageError> {
        let path = Self::path(ctx);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| StageError::failed(format!("{}: unreadable resume state: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ResumeState::default()),
            Err(e) => Err(StageError::io(path.display(), e)),
        }
    }

    fn save(&self, path: &Path) -> Result<(), CacheError> {
        let tmp = path.with_extension("tmp");
        let io = |source| CacheError::Io { path: path.to_owned(), source };
        std::fs::write(&tmp, serde_json::to_vec(self).expect("serializable")).map_err(io)?;
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

/// A window of documents, computed, in dataset order.
struct Window {
    /// (n, 2, d) f32.
    acts: Vec<f32>,
    tokens: Vec<u32>,
    /// Stored rows per document.
    lengths: Vec<usize>,
    /// Documents consumed from the dataset up to the end of this window.
    docs_after: u64,
    /// The last window: finish the shard whatever its size.
    last: bool,
}

fn run(p: &CacheParams, ctx: &mut StageContext) -> Result<(), StageError> {
    let t0 = Instant::now();
    let device = crate::device::candle_device(ctx.device())?;
    let dtype = p.dtype.on(&device);
    let store = match p.store_dtype {
        StoreDtypeParam::Auto => StoreDtype::from_candle(dtype).expect("a float dtype"),
        StoreDtypeParam::F32 => StoreDtype::F32,
        StoreDtypeParam::Bf16 => StoreDtype::Bf16,
        StoreDtypeParam::F16 => StoreDtype::F16,
    };
    let base_dir = ctx.external("base")[0].clone();
    let chat_dir = ctx.external("chat")[0].clone();
    let data = ctx.external("data")[0].clone();
    let tok_dir = match p.tokenizer {
        TokenizerSource::Chat => &chat_dir,
        TokenizerSource::Base => &base_dir,
    };
    let tokenizer = TextTokenizer::from_dir(tok_dir)
        .and_then(|t| t.with_context_len(p.context_len))
        .map_err(StageError::other)?;
    let token_map = p.base_token_map.resolve().map_err(StageError::failed)?;
    if let Some(id) = token_map.out_of_vocab(tokenizer.vocab_size()) {
        return Err(StageError::failed(format!(
            "base_token_map uses token id {id}, outside the vocabulary of {} ({} tokens)",
            tok_dir.join("tokenizer.json").display(),
            tokenizer.vocab_size()
        )));
    }

    tracing::info!(
        "loading {} and {} ({dtype:?} on {})",
        base_dir.display(),
        chat_dir.display(),
        ctx.device()
    );
    let load = |dir: &Path| Model::load(dir, dtype, &device).map_err(StageError::other);
    let base = load(&base_dir)?;
    let chat = load(&chat_dir)?;
    let d = base.hidden_size();
    if chat.hidden_size() != d {
        return Err(StageError::failed(format!(
            "the models do not pair: {} has hidden_size {d}, {} has {}",
            base_dir.join("config.json").display(),
            chat_dir.join("config.json").display(),
            chat.hidden_size()
        )));
    }
    for (dir, m) in [(&base_dir, &base), (&chat_dir, &chat)] {
        check_fits(dir, m, p.layer, &tokenizer, tok_dir)?;
    }

    let column = match p.column_type {
        ColumnType::Text => Column::Text(p.column.clone()),
        ColumnType::Messages => Column::Messages(p.column.clone()),
    };
    let max_docs = p.max_docs.map(|n| n as usize);
    let mut texts =
        open_texts(&data, p.split.as_deref(), column, max_docs, &tokenizer).map_err(StageError::other)?;
    let files = texts.files().to_vec();

    let shards_dir = ctx.out_dir().join("shards");
    std::fs::create_dir_all(&shards_dir).map_err(|e| StageError::io(shards_dir.display(), e))?;
    let state = ResumeState::load(ctx)?;
    remove_unfinished_shards(&shards_dir, &state)?;
    if state.docs > 0 {
        tracing::info!(
            "resuming after {} shards: {} documents, {} tokens already cached",
            state.shards.len(),
            state.docs,
            state.tokens
        );
        for _ in 0..state.docs {
            texts.next().transpose().map_err(StageError::other)?;
        }
    }
    let progress = ctx.progress().clone();
    match p.max_tokens {
        Some(n) => progress.set_total(n, "tokens"),
        None => progress.set_total(0, "tokens"),
    }
    progress.set_done(state.tokens);

    let state_path = ResumeState::path(ctx);
    let window_docs = p.batch_size * READ_AHEAD;
    let mut docs = state.docs;
    let mut tokens = state.tokens;
    let started_tokens = state.tokens;
    let (tx, rx) = mpsc::sync_channel::<Window>(1);
    let writer_state = state.clone();
    let shard_tokens = p.shard_tokens;
    let result: Result<ResumeState, StageError> = std::thread::scope(|scope| {
        let writer = scope
            .spawn(move || write_windows(rx, writer_state, &shards_dir, d, store, shard_tokens, &state_path));
        let compute = (|| -> Result<(), StageError> {
            if state.done {
                return Ok(());
            }
            loop {
                ctx.check_cancelled()?;
                let mut batch_texts = Vec::with_capacity(window_docs);
                for text in texts.by_ref().take(window_docs) {
                    batch_texts.push(text.map_err(StageError::other)?);
                }
                let exhausted = batch_texts.len() < window_docs;
                if batch_texts.is_empty() {
                    let window = Window {
                        acts: Vec::new(),
                        tokens: Vec::new(),
                        lengths: Vec::new(),
                        docs_after: docs,
                        last: true,
                    };
                    let _ = tx.send(window);
                    return Ok(());
                }
                let encoded = tokenizer.encode_batch(&batch_texts).map_err(StageError::other)?;
                let mut lengths: Vec<usize> =
                    encoded.lengths.iter().map(|&l| kept_range(l, p.ignore_first_n).len()).collect();
                // Cut after the document that reaches max_tokens.
                let mut limit_hit = false;
                if let Some(max) = p.max_tokens {
                    let mut total = tokens;
                    for (i, len) in lengths.iter().enumerate() {
                        total += *len as u64;
                        if total >= max {
                            lengths.truncate(i + 1);
                            limit_hit = true;
                            break;
                        }
                    }
                }
                let window = forward_window(
                    &encoded.ids,
                    &encoded.lengths[..lengths.len()],
                    p,
                    &token_map,
                    &base,
                    &chat,
                    &device,
                    ctx,
                )?;
                let n: usize = lengths.iter().sum();
                docs += lengths.len() as u64;
                tokens += n as u64;
                let last = exhausted || limit_hit;
                let window = Window { acts: window.0, tokens: window.1, lengths, docs_after: docs, last };
                progress.set_done(tokens);
                if tx.send(window).is_err() {
                    return Ok(()); // the writer failed; its error is reported below
                }
                if last {
                    return Ok(());
                }
            }
        })();
        drop(tx);
        let written = writer.join().map_err(|_| StageError::failed("the shard writer panicked"))?;
        compute?;
        written.map_err(StageError::other)
    });
    let state = result?;
    if state.tokens == 0 {
        return Err(StageError::failed(format!(
            "no token stored from {}: every document is shorter than ignore_first_n + 1 = {} tokens",
            data.display(),
            p.ignore_first_n + 1
        )));
    }
    let welford = state.welford.as_ref().expect("tokens were stored");
    write_stats(&ctx.out_dir().join("stats.safetensors"), welford, d)?;
    let model_info = |dir: &Path, m: &Model| ModelInfo {
        path: dir.to_owned(),
        model_type: m.model_type().into(),
        num_layers: m.num_layers(),
        hidden_size: m.hidden_size(),
    };
    let meta = CacheMeta {
        format: FORMAT.into(),
        d_model: d,
        layer: p.layer,
        dtype: store,
        compute_dtype: format!("{dtype:?}").to_lowercase(),
        tokens: state.tokens,
        docs: state.docs,
        shards: state.shards.clone(),
        models: vec![model_info(&base_dir, &base), model_info(&chat_dir, &chat)],
        tokenizer: tok_dir.clone(),
        context_len: p.context_len,
        ignore_first_n: p.ignore_first_n,
        base_token_map: token_map.pairs().collect(),
        bos_id: tokenizer.bos_id(),
        dataset: DatasetInfo {
            files,
            split: p.split.clone(),
            column: p.column.clone(),
            column_type: match p.column_type {
                ColumnType::Text => "text".into(),
                ColumnType::Messages => "messages".into(),
            },
        },
        stats: "stats.safetensors".into(),
    };
    let meta_path = ctx.out_dir().join("cache.json");
    std::fs::write(&meta_path, serde_json::to_vec_pretty(&meta).expect("serializable"))
        .map_err(|e| StageError::io(meta_path.display(), e))?;
    let secs = t0.elapsed().as_secs_f64();
    let computed = state.tokens - started_tokens;
    tracing::info!(
        "cached {} tokens of {} documents in {} shards ({:.0} tokens/s this attempt)",
        state.tokens,
        state.docs,
        state.shards.len(),
        computed as f64 / secs
    );
    ctx.record_metric("tokens", state.tokens);
    ctx.record_metric("docs", state.docs);
    ctx.record_metric("shards", state.shards.len() as u64);
    ctx.record_metric("d_model", d as u64);
    ctx.record_metric("dtype", store.to_string());
    ctx.record_metric("tokens_per_s", (computed as f64 / secs).round());
    Ok(())
}

/// Deletes shard files the resume state does not list (a shard being written when the run died).
fn remove_unfinished_shards(dir: &Path, state: &ResumeState) -> Result<(), StageError> {
    let listed: std::collections::BTreeSet<String> =
        state.shards.iter().map(|s| s.file.trim_start_matches("shards/").to_string()).collect();
    for entry in std::fs::read_dir(dir).map_err(|e| StageError::io(dir.display(), e))? {
        let entry = entry.map_err(|e| StageError::io(dir.display(), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !listed.contains(&name) {
            tracing::info!("discarding unfinished shard {name}");
            std::fs::remove_file(entry.path()).map_err(|e| StageError::io(entry.path().display(), e))?;
        }
    }
    Ok(())
}

/// Runs both models over one window's documents and returns (acts (n, 2, d), tokens), in
/// dataset order. `lengths` are the documents' full token counts.
#[allow(clippy::too_many_arguments)]
fn forward_window(
    ids: &[u32],
    lengths: &[usize],
    p: &CacheParams,
    token_map: &TokenMap,
    base: &Model,
    chat: &Model,
    device: &Device,
    ctx: &StageContext,
) -> Result<(Vec<f32>, Vec<u32>), StageError> {
    let d = base.hidden_size();
    let mut starts = Vec::with_capacity(lengths.len());
    let mut at = 0;
    for len in lengths {
        starts.push(at);
        at += len;
    }
    // Stored rows of each document, and where they go in the window.
    let kept: Vec<std::ops::Range<usize>> =
        lengths.iter().map(|&l| kept_range(l, p.ignore_first_n)).collect();
    let mut out_at = Vec::with_capacity(lengths.len());
    let mut n = 0;
    for k in &kept {
        out_at.push(n);
        n += k.len();
    }
    let mut acts = vec![0f32; n * 2 * d];
    let mut tokens = vec![0u32; n];
    for (j, k) in kept.iter().enumerate() {
        tokens[out_at[j]..out_at[j] + k.len()].copy_from_slice(&ids[starts[j] + k.start..starts[j] + k.end]);
    }
    // Longest first, so each micro-batch pads little.
    let mut order: Vec<usize> = (0..lengths.len()).filter(|&j| !kept[j].is_empty()).collect();
    order.sort_by_key(|&j| std::cmp::Reverse(lengths[j]));
    let candle = |e: candle_core::Error| StageError::failed(format!("forward pass failed: {e}"));
    for group in order.chunks(p.batch_size) {
        ctx.check_cancelled()?;
        let t = lengths[group[0]];
        let b = group.len();
        let mut padded = vec![0u32; b * t];
        let mut mask = vec![0u8; b * t];
        let mut gather = Vec::new();
        for (r, &j) in group.iter().enumerate() {
            let doc = &ids[starts[j]..starts[j] + lengths[j]];
            padded[r * t..r * t + doc.len()].copy_from_slice(doc);
            mask[r * t..r * t + doc.len()].iter_mut().for_each(|m| *m = 1);
            gather.extend(kept[j].clone().map(|pos| (r * t + pos) as u32));
        }
        let mask = Tensor::from_vec(mask, (b, t), device).map_err(candle)?;
        let gather = Tensor::new(gather.as_slice(), device).map_err(candle)?;
        let mut base_ids = padded.clone();
        token_map.apply(&mut base_ids);
        let run = |model: &Model, ids: Vec<u32>, role: &str| -> Result<Vec<f32>, StageError> {
            let ids = Tensor::from_vec(ids, (b, t), device).map_err(candle)?;
            let h = model.forward_to_layer(&ids, &mask, p.layer).map_err(candle)?;
            let rows = h
                .reshape((b * t, d))
                .and_then(|h| h.index_select(&gather, 0))
                .and_then(|h| h.to_dtype(DType::F32))
                .and_then(|h| h.flatten_all())
                .and_then(|h| h.to_vec1::<f32>())
                .map_err(candle)?;
            if let Some(bad) = rows.iter().position(|x| !x.is_finite()) {
                return Err(StageError::failed(format!(
                    "the {role} model produced a non-finite activation ({}) at layer {}; with f16, try bf16 or f32",
                    rows[bad], p.layer
                )));
            }
            Ok(rows)
        };
        let base_rows = run(base, base_ids, "base")?;
        let chat_rows = run(chat, padded, "chat")?;
        let mut src = 0;
        for &j in group {
            for row in 0..kept[j].len() {
                let dst = (out_at[j] + row) * 2 * d;
                acts[dst..dst + d].copy_from_slice(&base_rows[src * d..(src + 1) * d]);
                acts[dst + d..dst + 2 * d].copy_from_slice(&chat_rows[src * d..(src + 1) * d]);
                src += 1;
            }
        }
    }
    Ok((acts, tokens))
}

/// The writer thread: appends windows to shards, finishes a shard once it is full, and commits
/// the resume state after each finished shard.
fn write_windows(
    rx: mpsc::Receiver<Window>,
    mut state: ResumeState,
    dir: &Path,
    d: usize,
    dtype: StoreDtype,
    shard_tokens: u64,
    state_path: &Path,
) -> Result<ResumeState, CacheError> {
    let mut current: Option<(ShardWriter, String, u64)> = None;
    let mut welford = state.welford.clone().unwrap_or_else(|| Welford::new(2 * d));
    let mut docs_in_flight = state.docs;
    let mut tokens_in_flight = state.tokens;
    let finish = |current: &mut Option<(ShardWriter, String, u64)>,
                  state: &mut ResumeState,
                  welford: &Welford,
                  docs: u64,
                  tokens: u64,
                  done: bool|
     -> Result<(), CacheError> {
        if let Some((w, file, first_doc)) = current.take() {
            let (rows, ndocs) = w.finish()?;
            state.shards.push(ShardInfo { file, tokens: rows, first_doc, docs: ndocs });
        }
        state.docs = docs;
        state.tokens = tokens;
        state.welford = Some(welford.clone());
        state.done = done;
        state.save(state_path)
    };
    for window in rx {
        if !window.tokens.is_empty() || !window.lengths.is_empty() {
            if current.is_none() {
                let file = format!("shards/{:05}.safetensors", state.shards.len());
                let w = ShardWriter::create(&dir.join(file.trim_start_matches("shards/")), d, dtype)?;
                current = Some((w, file, docs_in_flight));
            }
            let (w, _, _) = current.as_mut().expect("just created");
            w.append(&window.acts, &window.tokens, &window.lengths)?;
            welford.update(&window.acts);
            docs_in_flight = window.docs_after;
            tokens_in_flight += window.tokens.len() as u64;
        }
        let full = current.as_ref().is_some_and(|(w, _, _)| w.rows() >= shard_tokens);
        if full || window.last {
            finish(&mut current, &mut state, &welford, docs_in_flight, tokens_in_flight, window.last)?;
        }
        if window.last {
            break;
        }
    }
    if !state.done {
        // The compute side stopped early (error or cancel): keep only finished shards.
        if let Some((w, _, _)) = current.take() {
            drop(w);
        }
    }
    Ok(state)
}

/// `stats.safetensors`: `mean`, `std` (2, d) f32; `count` (1,) f64; `m2` (2, d) f64 (Welford's
/// state, so statistics of several caches can be merged exactly).
fn write_stats(path: &Path, w: &Welford, d: usize) -> Result<(), StageError> {
    let candle = |e: candle_core::Error| StageError::failed(format!("{}: {e}", path.display()));
    let to32 = |v: &[f64]| v.iter().map(|x| *x as f32).collect::<Vec<f32>>();
    let tensors = [
        ("mean", Tensor::from_vec(to32(&w.mean), (2, d), &Device::Cpu).map_err(candle)?),
        ("std", Tensor::from_vec(to32(&w.std()), (2, d), &Device::Cpu).map_err(candle)?),
        ("count", Tensor::from_vec(vec![w.count as f64], 1, &Device::Cpu).map_err(candle)?),
        ("m2", Tensor::from_vec(w.m2.clone(), (2, d), &Device::Cpu).map_err(candle)?),
    ];
    let map: std::collections::HashMap<String, Tensor> =
        tensors.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    candle_core::safetensors::save(&map, path).map_err(candle)
}

/// That block `layer` exists in the model in `dir` and that it embeds every token of the
/// tokenizer loaded from `tok_dir` (the `cache` and `eval` stages' check of each model).
pub(crate) fn check_fits(
    dir: &Path,
    m: &Model,
    layer: usize,
    tokenizer: &TextTokenizer,
    tok_dir: &Path,
) -> Result<(), StageError> {
    if layer >= m.num_layers() {
        return Err(StageError::failed(format!(
            "layer {layer} is out of range: {} has {} decoder blocks (layers 0..={})",
            dir.join("config.json").display(),
            m.num_layers(),
            m.num_layers() - 1
        )));
    }
    if tokenizer.vocab_size() > m.vocab_size() {
        return Err(StageError::failed(format!(
            "the tokenizer in {} has {} tokens but the model in {} embeds only {}",
            tok_dir.display(),
            tokenizer.vocab_size(),
            dir.display(),
            m.vocab_size()
        )));
    }
    Ok(())
}
