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
//!
//! For a cluster job array the stage splits into parts of whole shards ([`super::parts`]), which
//! compute the very same windows and are assembled into the bytes of a whole run.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use engine::{Arity, DeviceUse, InputSpec, ParamError, Portion, Stage, StageContext, StageError};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::CacheError;
use super::format::{
    Batch, CacheMeta, DatasetInfo, FORMAT, ModelInfo, ShardInfo, ShardWriter, StoreDtype, Welford,
};
use crate::models::Model;
use crate::text::{Column, TextTokenizer, Texts, TokenMap, kept_range, open_texts};

/// Documents per window = `READ_AHEAD × batch_size`.
const READ_AHEAD: usize = 8;

pub struct CacheStage;

/// The dtype the models run in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    /// The checkpoints' own dtype (`torch_dtype` in their config.json, as transformers'
    /// `torch_dtype="auto"`; f32 if a config names none or the two differ). The same on every
    /// device, so one key means one computation on a laptop and on a GPU.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

impl ComputeDtype {
    /// The candle dtype for the model pair in `base` and `chat` (`auto` reads their configs).
    pub(crate) fn resolve(self, base: &Path, chat: &Path) -> Result<DType, crate::models::ModelError> {
        Ok(match self {
            ComputeDtype::F32 => DType::F32,
            ComputeDtype::Bf16 => DType::BF16,
            ComputeDtype::F16 => DType::F16,
            ComputeDtype::Auto => {
                let (b, c) = (crate::models::checkpoint_dtype(base)?, crate::models::checkpoint_dtype(chat)?);
                if b == c { b } else { DType::F32 }
            }
        })
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
    // 2: dtype "auto" is the checkpoints' dtype on every device (it was f32 on the CPU).
    const VERSION: u32 = 2;
    const DOC: &'static str =
        "Paired base/chat residual-stream activations at one layer, for every token of a dataset.";
    const UNKEYED: &'static [&'static str] = &["batch_size"];
    const SPLITS: bool = true;

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

    fn split(&self, p: &CacheParams, ctx: &mut StageContext, max_parts: usize) -> Result<usize, StageError> {
        super::parts::split(p, ctx, max_parts)
    }
}

/// What survives a kill: written after every finished shard, to `cache-state.json` in the work
/// dir for a whole run, to the part's folder for a part (see [`super::parts`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct ResumeState {
    /// With their global file names (`shards/00012.safetensors`), in a part too.
    pub shards: Vec<ShardInfo>,
    /// Documents consumed from the dataset (stored or not), from its start.
    pub docs: u64,
    /// Tokens stored, from the dataset's start.
    pub tokens: u64,
    /// Statistics over `[base | chat]` rows of width 2·d (a whole run; a part keeps its windows'
    /// batches in files instead).
    pub welford: Option<Welford>,
    /// The dataset is exhausted, a limit reached or the part's end reached: only finishing is left.
    pub done: bool,
    /// Seconds from the start of each attempt to its last commit, summed over attempts.
    #[serde(default)]
    pub seconds: f64,
    /// A part's plan and what its models contribute to `cache.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<super::parts::PartRecord>,
}

impl ResumeState {
    /// The state at `path`; the empty state when there is none.
    pub(super) fn load(path: &Path) -> Result<ResumeState, StageError> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| StageError::failed(format!("{}: unreadable resume state: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ResumeState::default()),
            Err(e) => Err(StageError::io(path.display(), e)),
        }
    }

    pub(super) fn save(&self, path: &Path) -> Result<(), CacheError> {
        write_durably(path, &serde_json::to_vec(self).expect("serializable"))
    }
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it into place.
pub(super) fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let tmp = path.with_extension("tmp");
    let io = |source| CacheError::Io { path: path.to_owned(), source };
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The name of shard `index` in the cache folder (and in a part's folder).
pub(super) fn shard_file(index: usize) -> String {
    format!("shards/{index:05}.safetensors")
}

/// The one rule for where a shard ends, followed by the writer and by the split plan: at the
/// first window boundary where it holds `shard_tokens` rows, or at the last window.
pub(super) fn shard_ends(rows: u64, shard_tokens: u64, last_window: bool) -> bool {
    rows >= shard_tokens || last_window
}

/// What every portion of the stage opens first, on the CPU: the input paths, the tokenizer and
/// the base token map.
pub(super) struct Inputs {
    pub base_dir: PathBuf,
    pub chat_dir: PathBuf,
    pub data: PathBuf,
    /// The folder whose tokenizer encodes the documents.
    pub tok_dir: PathBuf,
    pub tokenizer: TextTokenizer,
    pub token_map: TokenMap,
}

impl Inputs {
    pub(super) fn open(p: &CacheParams, ctx: &StageContext) -> Result<Inputs, StageError> {
        let base_dir = ctx.external("base")[0].clone();
        let chat_dir = ctx.external("chat")[0].clone();
        let data = ctx.external("data")[0].clone();
        let tok_dir = match p.tokenizer {
            TokenizerSource::Chat => chat_dir.clone(),
            TokenizerSource::Base => base_dir.clone(),
        };
        let tokenizer = TextTokenizer::from_dir(&tok_dir)
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
        Ok(Inputs { base_dir, chat_dir, data, tok_dir, tokenizer, token_map })
    }

    /// The dataset's texts in order, from document `from` on (the ones before are read and
    /// dropped).
    pub(super) fn texts_from(&self, p: &CacheParams, from: u64) -> Result<Texts<'_>, StageError> {
        let column = match p.column_type {
            ColumnType::Text => Column::Text(p.column.clone()),
            ColumnType::Messages => Column::Messages(p.column.clone()),
        };
        let max_docs = p.max_docs.map(|n| n as usize);
        let mut texts = open_texts(&self.data, p.split.as_deref(), column, max_docs, &self.tokenizer)
            .map_err(StageError::other)?;
        for _ in 0..from {
            texts.next().transpose().map_err(StageError::other)?;
        }
        Ok(texts)
    }
}

/// The model pair, loaded on the run's device.
pub(super) struct Models {
    device: Device,
    dtype: DType,
    store: StoreDtype,
    base: Model,
    chat: Model,
}

impl Models {
    pub(super) fn load(p: &CacheParams, ctx: &StageContext, inputs: &Inputs) -> Result<Models, StageError> {
        let device = crate::device::candle_device(ctx.device())?;
        let dtype = p.dtype.resolve(&inputs.base_dir, &inputs.chat_dir).map_err(StageError::other)?;
        let store = match p.store_dtype {
            StoreDtypeParam::Auto => StoreDtype::from_candle(dtype).expect("a float dtype"),
            StoreDtypeParam::F32 => StoreDtype::F32,
            StoreDtypeParam::Bf16 => StoreDtype::Bf16,
            StoreDtypeParam::F16 => StoreDtype::F16,
        };
        let (base_dir, chat_dir) = (&inputs.base_dir, &inputs.chat_dir);
        let (base, chat) =
            Model::load_pair(base_dir, chat_dir, dtype, &device, ctx.device()).map_err(StageError::other)?;
        let d = base.hidden_size();
        if chat.hidden_size() != d {
            return Err(StageError::failed(format!(
                "the models do not pair: {} has hidden_size {d}, {} has {}",
                base_dir.join("config.json").display(),
                chat_dir.join("config.json").display(),
                chat.hidden_size()
            )));
        }
        for (dir, m) in [(base_dir, &base), (chat_dir, &chat)] {
            check_fits(dir, m, p.layer, &inputs.tokenizer, &inputs.tok_dir)?;
        }
        Ok(Models { device, dtype, store, base, chat })
    }

    /// What the models contribute to `cache.json`.
    pub(super) fn produced(&self, inputs: &Inputs) -> Produced {
        let info = |dir: &Path, m: &Model| ModelInfo {
            path: dir.to_owned(),
            model_type: m.model_type().into(),
            num_layers: m.num_layers(),
            hidden_size: m.hidden_size(),
        };
        Produced {
            d_model: self.base.hidden_size(),
            dtype: self.store,
            compute_dtype: format!("{:?}", self.dtype).to_lowercase(),
            models: vec![info(&inputs.base_dir, &self.base), info(&inputs.chat_dir, &self.chat)],
        }
    }
}

/// What the models contribute to `cache.json`. Each part records it, so that assembling the
/// parts needs no model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct Produced {
    pub d_model: usize,
    /// The stored dtype.
    pub dtype: StoreDtype,
    /// The dtype the models ran in.
    pub compute_dtype: String,
    /// `base` then `chat`.
    pub models: Vec<ModelInfo>,
}

/// The dataset read window by window, exactly as every portion reads it: `READ_AHEAD ×
/// batch_size` documents at a time, tokenized, cut after the document that brings the stored
/// tokens (counted from the dataset's start) to `max_tokens`. The split plan reads it for the
/// lengths only; whole runs and parts compute what it yields, so their windows, and with them
/// the micro-batches and the activations, are the same.
pub(super) struct Windows<'a> {
    texts: Texts<'a>,
    tokenizer: &'a TextTokenizer,
    window_docs: usize,
    ignore_first_n: usize,
    max_tokens: Option<u64>,
    /// The window that reaches this document is the last (a part's end).
    end_doc: Option<u64>,
    docs: u64,
    tokens: u64,
    finished: bool,
}

/// One window of [`Windows`].
pub(super) struct Tokenized {
    /// Every document read (the `max_tokens` cut may keep fewer): ids and full lengths.
    pub encoded: crate::text::Batch,
    /// Stored rows of each kept document.
    pub kept: Vec<usize>,
    /// Documents consumed and tokens stored from the dataset's start to the end of this window.
    pub docs_after: u64,
    pub tokens_after: u64,
    /// The dataset ends, `max_tokens` is reached or the part ends with this window (which may
    /// hold no document at all).
    pub last: bool,
}

impl<'a> Windows<'a> {
    /// `texts` must stand at document `docs`, after which `tokens` tokens are stored.
    pub(super) fn new(
        texts: Texts<'a>,
        inputs: &'a Inputs,
        p: &CacheParams,
        docs: u64,
        tokens: u64,
        end_doc: Option<u64>,
    ) -> Windows<'a> {
        Windows {
            texts,
            tokenizer: &inputs.tokenizer,
            window_docs: p.batch_size * READ_AHEAD,
            ignore_first_n: p.ignore_first_n,
            max_tokens: p.max_tokens,
            end_doc,
            docs,
            tokens,
            finished: false,
        }
    }

    /// The next window; `None` after the last.
    pub(super) fn next_window(&mut self) -> Result<Option<Tokenized>, StageError> {
        if self.finished {
            return Ok(None);
        }
        let mut batch_texts = Vec::with_capacity(self.window_docs);
        for text in self.texts.by_ref().take(self.window_docs) {
            batch_texts.push(text.map_err(StageError::other)?);
        }
        let exhausted = batch_texts.len() < self.window_docs;
        let encoded = if batch_texts.is_empty() {
            crate::text::Batch::default()
        } else {
            self.tokenizer.encode_batch(&batch_texts).map_err(StageError::other)?
        };
        let mut kept: Vec<usize> =
            encoded.lengths.iter().map(|&l| kept_range(l, self.ignore_first_n).len()).collect();
        // Cut after the document that reaches max_tokens.
        let mut limit_hit = false;
        if let Some(max) = self.max_tokens {
            let mut total = self.tokens;
            for (i, len) in kept.iter().enumerate() {
                total += *len as u64;
                if total >= max {
                    kept.truncate(i + 1);
                    limit_hit = true;
                    break;
                }
            }
        }
        self.docs += kept.len() as u64;
        self.tokens += kept.iter().sum::<usize>() as u64;
        let part_end = self.end_doc.is_some_and(|end| self.docs >= end);
        self.finished = exhausted || limit_hit || part_end;
        Ok(Some(Tokenized {
            encoded,
            kept,
            docs_after: self.docs,
            tokens_after: self.tokens,
            last: self.finished,
        }))
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

/// Where [`compute`] writes.
pub(super) struct Target {
    /// Finished shards go here, under their global names.
    pub shards_dir: PathBuf,
    pub state_path: PathBuf,
    pub stats: KeptStats,
    /// Global index of the first shard written (a part's first shard).
    pub first_shard: usize,
    /// The window that reaches this document is the last (a part's end).
    pub end_doc: Option<u64>,
    /// The stored token the progress bar counts from (a part's first).
    pub progress_from: u64,
}

/// How [`compute`] keeps the statistics of its windows.
pub(super) enum KeptStats {
    /// Merged into the resume state's running [`Welford`] (a whole run).
    Merged,
    /// Each window's [`Batch`], in order, in `<folder>/<shard>.bin` per finished shard (a part:
    /// the merges are replayed in dataset order when the parts are assembled).
    PerShard(PathBuf),
}

impl KeptStats {
    /// The statistics file of the shard named `file` (`shards/00012.safetensors`).
    pub(super) fn file_of(dir: &Path, file: &str) -> PathBuf {
        let name = file.trim_start_matches("shards/").trim_end_matches(".safetensors");
        dir.join(format!("{name}.bin"))
    }
}

/// Computes and writes the windows after `state` until the last: the window loop of a whole run
/// and of a part. A writer thread appends each window to the current shard and commits the
/// resume state after every finished shard; files the state does not list (a shard being
/// written when an earlier attempt died) are deleted first. `started` is when this attempt
/// began, for the state's seconds.
pub(super) fn compute(
    p: &CacheParams,
    ctx: &StageContext,
    inputs: &Inputs,
    models: &Models,
    state: ResumeState,
    target: &Target,
    started: Instant,
) -> Result<ResumeState, StageError> {
    std::fs::create_dir_all(&target.shards_dir)
        .map_err(|e| StageError::io(target.shards_dir.display(), e))?;
    let listed = |ext: &str| -> std::collections::BTreeSet<String> {
        state
            .shards
            .iter()
            .map(|s| s.file.trim_start_matches("shards/").replace(".safetensors", ext))
            .collect()
    };
    remove_unlisted(&target.shards_dir, &listed(".safetensors"))?;
    if let KeptStats::PerShard(dir) = &target.stats {
        std::fs::create_dir_all(dir).map_err(|e| StageError::io(dir.display(), e))?;
        remove_unlisted(dir, &listed(".bin"))?;
    }
    if state.done {
        return Ok(state);
    }
    if !state.shards.is_empty() {
        tracing::info!(
            "resuming after {} shards: {} documents, {} tokens already cached",
            state.shards.len(),
            state.docs,
            state.tokens
        );
    }
    let texts = inputs.texts_from(p, state.docs)?;
    let mut windows = Windows::new(texts, inputs, p, state.docs, state.tokens, target.end_doc);
    let progress = ctx.progress().clone();
    progress.set_done(state.tokens - target.progress_from);
    let (tx, rx) = mpsc::sync_channel::<Window>(1);
    let (d, store, shard_tokens) = (models.base.hidden_size(), models.store, p.shard_tokens);
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || write_windows(rx, state, target, d, store, shard_tokens, started));
        let compute = (|| -> Result<(), StageError> {
            loop {
                ctx.check_cancelled()?;
                let Some(w) = windows.next_window()? else { return Ok(()) };
                let (acts, tokens) = forward_window(
                    &w.encoded.ids,
                    &w.encoded.lengths[..w.kept.len()],
                    p,
                    &inputs.token_map,
                    &models.base,
                    &models.chat,
                    &models.device,
                    ctx,
                )?;
                progress.set_done(w.tokens_after - target.progress_from);
                let last = w.last;
                let window = Window { acts, tokens, lengths: w.kept, docs_after: w.docs_after, last };
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
    })
}

fn run(p: &CacheParams, ctx: &mut StageContext) -> Result<(), StageError> {
    match ctx.portion() {
        Portion::Whole => run_whole(p, ctx),
        Portion::Part { index, count } => super::parts::run_part(p, ctx, index, count),
        Portion::Assemble { count } => super::parts::assemble(p, ctx, count),
    }
}

fn run_whole(p: &CacheParams, ctx: &mut StageContext) -> Result<(), StageError> {
    let t0 = Instant::now();
    let inputs = Inputs::open(p, ctx)?;
    let models = Models::load(p, ctx, &inputs)?;
    let state_path = ctx.work_dir().join("cache-state.json");
    let state = ResumeState::load(&state_path)?;
    let progress = ctx.progress().clone();
    match p.max_tokens {
        Some(n) => progress.set_total(n, "tokens"),
        None => progress.set_total(0, "tokens"),
    }
    let started_tokens = state.tokens;
    let target = Target {
        shards_dir: ctx.out_dir().join("shards"),
        state_path,
        stats: KeptStats::Merged,
        first_shard: 0,
        end_doc: None,
        progress_from: 0,
    };
    let state = compute(p, ctx, &inputs, &models, state, &target, t0)?;
    if state.tokens == 0 {
        return Err(StageError::failed(format!(
            "no token stored from {}: every document is shorter than ignore_first_n + 1 = {} tokens",
            inputs.data.display(),
            p.ignore_first_n + 1
        )));
    }
    let secs = t0.elapsed().as_secs_f64();
    let computed = state.tokens - started_tokens;
    tracing::info!(
        "cached {} tokens of {} documents in {} shards ({:.0} tokens/s this attempt)",
        state.tokens,
        state.docs,
        state.shards.len(),
        computed as f64 / secs
    );
    let welford = state.welford.as_ref().expect("tokens were stored");
    let produced = models.produced(&inputs);
    write_outputs(p, ctx, &inputs, &produced, &state, welford, computed as f64 / secs)
}

/// Writes `stats.safetensors` and `cache.json` beside the shards of `state` and records the
/// metrics (a whole run and the assembly of parts). `tokens_per_s` is what the caller measured.
pub(super) fn write_outputs(
    p: &CacheParams,
    ctx: &mut StageContext,
    inputs: &Inputs,
    produced: &Produced,
    state: &ResumeState,
    welford: &Welford,
    tokens_per_s: f64,
) -> Result<(), StageError> {
    let d = produced.d_model;
    write_stats(&ctx.out_dir().join("stats.safetensors"), welford, d)?;
    let files = inputs.texts_from(p, 0)?.files().to_vec();
    let meta = CacheMeta {
        format: FORMAT.into(),
        d_model: d,
        layer: p.layer,
        dtype: produced.dtype,
        compute_dtype: produced.compute_dtype.clone(),
        tokens: state.tokens,
        docs: state.docs,
        shards: state.shards.clone(),
        models: produced.models.clone(),
        tokenizer: inputs.tok_dir.clone(),
        context_len: p.context_len,
        ignore_first_n: p.ignore_first_n,
        base_token_map: inputs.token_map.pairs().collect(),
        bos_id: inputs.tokenizer.bos_id(),
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
    ctx.record_metric("tokens", state.tokens);
    ctx.record_metric("docs", state.docs);
    ctx.record_metric("shards", state.shards.len() as u64);
    ctx.record_metric("d_model", d as u64);
    ctx.record_metric("dtype", produced.dtype.to_string());
    ctx.record_metric("tokens_per_s", tokens_per_s.round());
    Ok(())
}

/// Deletes the files in `dir` not named in `listed` (a shard being written when a run died).
pub(super) fn remove_unlisted(
    dir: &Path,
    listed: &std::collections::BTreeSet<String>,
) -> Result<(), StageError> {
    for entry in std::fs::read_dir(dir).map_err(|e| StageError::io(dir.display(), e))? {
        let entry = entry.map_err(|e| StageError::io(dir.display(), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !listed.contains(&name) {
            tracing::info!("discarding unfinished {}", entry.path().display());
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
    target: &Target,
    d: usize,
    dtype: StoreDtype,
    shard_tokens: u64,
    started: Instant,
) -> Result<ResumeState, CacheError> {
    let mut current: Option<(ShardWriter, String, u64)> = None;
    let mut welford = state.welford.clone().unwrap_or_else(|| Welford::new(2 * d));
    // A part's batch statistics of the current shard's windows.
    let mut batches: Vec<u8> = Vec::new();
    let mut docs_in_flight = state.docs;
    let mut tokens_in_flight = state.tokens;
    let seconds_before = state.seconds;
    let finish = |current: &mut Option<(ShardWriter, String, u64)>,
                  state: &mut ResumeState,
                  welford: &Welford,
                  batches: &mut Vec<u8>,
                  docs: u64,
                  tokens: u64,
                  done: bool|
     -> Result<(), CacheError> {
        if let Some((w, file, first_doc)) = current.take() {
            let (rows, ndocs) = w.finish()?;
            if let KeptStats::PerShard(dir) = &target.stats {
                let path = KeptStats::file_of(dir, &file);
                std::fs::write(&path, &*batches)
                    .and_then(|()| std::fs::File::open(&path)?.sync_all())
                    .map_err(|source| CacheError::Io { path, source })?;
                batches.clear();
            }
            state.shards.push(ShardInfo { file, tokens: rows, first_doc, docs: ndocs });
        }
        state.docs = docs;
        state.tokens = tokens;
        if matches!(target.stats, KeptStats::Merged) {
            state.welford = Some(welford.clone());
        }
        state.done = done;
        state.seconds = seconds_before + started.elapsed().as_secs_f64();
        state.save(&target.state_path)
    };
    for window in rx {
        if !window.tokens.is_empty() || !window.lengths.is_empty() {
            if current.is_none() {
                let file = shard_file(target.first_shard + state.shards.len());
                let path = target.shards_dir.join(file.trim_start_matches("shards/"));
                current = Some((ShardWriter::create(&path, d, dtype)?, file, docs_in_flight));
            }
            let (w, _, _) = current.as_mut().expect("just created");
            w.append(&window.acts, &window.tokens, &window.lengths)?;
            let batch = Batch::of(&window.acts, 2 * d);
            match &target.stats {
                KeptStats::Merged => welford.merge(&batch),
                KeptStats::PerShard(_) if batch.count > 0 => batch.encode(&mut batches),
                KeptStats::PerShard(_) => {}
            }
            docs_in_flight = window.docs_after;
            tokens_in_flight += window.tokens.len() as u64;
        }
        // No shard open: 0 rows, below any shard_tokens.
        let rows = current.as_ref().map_or(0, |(w, _, _)| w.rows());
        if shard_ends(rows, shard_tokens, window.last) {
            let (docs, tokens) = (docs_in_flight, tokens_in_flight);
            finish(&mut current, &mut state, &welford, &mut batches, docs, tokens, window.last)?;
        }
        if window.last {
            break;
        }
    }
    // If the compute side stopped early (error or cancel), the unfinished shard is dropped here;
    // the next attempt deletes it.
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
