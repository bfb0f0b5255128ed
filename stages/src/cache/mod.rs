//! Activation caches: the `cache` stage, which runs a (base, chat) model pair over a dataset and
//! stores the residual stream after one decoder block for every token, and the reader that later
//! stages use to stream (2, d) pairs out of one or more caches.
//!
//! - [`format`]: the on-disk layout (`cache.json`, safetensors shards of whole documents,
//!   `stats.safetensors`).
//! - [`reader`]: [`ActivationCache`] (one cache, memory-mapped), [`PairedDataset`] (several
//!   caches as one index space) and [`LocalShuffle`] (the paper's locally shuffled order).
//! - [`stage`]: the `cache` stage kind.
//! - `parts`: the same stage split into parts for a cluster job array, assembled into the bytes
//!   of a whole run.

pub mod format;
mod parts;
pub mod reader;
pub mod stage;

use std::path::{Path, PathBuf};

pub use format::{CacheMeta, StoreDtype};
pub use reader::{ActivationCache, LocalShuffle, PairedDataset};
pub use stage::{CacheParams, CacheStage};

/// Why a cache could not be written or read. Each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a valid activation cache file: {message}", path.display())]
    Corrupt { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl CacheError {
    pub(crate) fn corrupt(path: &Path, message: impl Into<String>) -> CacheError {
        CacheError::Corrupt { path: path.to_owned(), message: message.into() }
    }
}
