//! Text in, token ids out: the tokenizer of a model folder, its Jinja chat template, and the
//! readers of local datasets (JSON lines and parquet files, Hugging Face dataset folders), as the
//! `cache` stage needs them (DOMAIN.md §1).
//!
//! The paper's formatting is kept exact: chat conversations are rendered with the model's own
//! template, the leading BOS text is stripped and the tokenizer's post-processor adds BOS back;
//! documents are truncated to the context length (1024 by default) and never padded here.

pub mod dataset;
pub mod template;
pub mod tiny;
pub mod tokenizer;

use std::path::PathBuf;

pub use dataset::{Column, Doc, Docs, Texts, dataset_files, open_texts};
pub use template::{ChatTemplate, GenerationPrompt, Message, SpecialTokens};
pub use tokenizer::{Batch, DEFAULT_CONTEXT_LEN, TextTokenizer, TokenMap, kept_range};

/// What can go wrong reading a tokenizer, a chat template or a dataset. Every variant names the
/// file it is about, and the line where there is one.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a tokenizer the `tokenizers` crate can load: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    TokenizerConfig { path: PathBuf, message: String },
    #[error("tokenizing with {path} failed: {message}")]
    Encode { path: PathBuf, message: String },
    #[error("context length must be at least 1 token, got {0}")]
    ContextLen(usize),
    #[error("chat template from {origin} does not compile: {message}")]
    TemplateSyntax { origin: String, message: String },
    #[error("chat template from {origin} failed to render: {message}")]
    TemplateRender { origin: String, message: String },
    #[error(
        "{wanted_by} needs a chat template but the tokenizer in {tokenizer} has none; add \
         `chat_template` to its tokenizer_config.json (or a chat_template.jinja beside it), or \
         read a text column instead"
    )]
    NoChatTemplate { wanted_by: String, tokenizer: PathBuf },
    #[error("{path}:{line}: {message}")]
    Record { path: PathBuf, line: usize, message: String },
    #[error("{path} holds no documents; check the file and the split")]
    EmptyDataset { path: PathBuf },
    /// A parquet row, counted from 0 as `dataset[i]` counts.
    #[error("{path}: row {row}: {message}")]
    Row { path: PathBuf, row: usize, message: String },
    /// A parquet file's schema does not fit the column asked for.
    #[error("{path}: {message}")]
    Schema { path: PathBuf, message: String },
    #[error("cannot read {path} as parquet: {message}")]
    Parquet { path: PathBuf, message: String },
    #[error("{path}: unsupported dataset format; use .jsonl or .json (JSON lines) or .parquet")]
    Format { path: PathBuf },
    /// A dataset folder has no files for the split asked for.
    #[error("{path}: {message}")]
    Split { path: PathBuf, message: String },
}
