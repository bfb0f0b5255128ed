//! The raw serde layer of a pipeline file's `[pipeline]` table: it mirrors the TOML exactly
//! (`deny_unknown_fields`), feeds the JSON Schema, and is turned into [`super::Pipeline`] fields
//! by validation.

use schemars::JsonSchema;
use serde::Deserialize;

/// `[pipeline]`: what the pipeline is called and where its outputs go.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PipelineHeader {
    /// The pipeline's name; it becomes a folder name in the datastore. Letters, digits, `_`, `.`
    /// and `-`, starting with a letter or digit, at most 100 characters.
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"), length(min = 1, max = 100))]
    pub name: String,
    /// What the pipeline is for.
    #[serde(default)]
    pub description: Option<String>,
    /// Another pipeline file this one builds on, relative to this file (`${VAR}` and `~/` are
    /// expanded). Its tables are merged under this file's: keys here win, tables merge
    /// recursively, arrays and other values replace.
    #[serde(default)]
    pub extends: Option<String>,
    /// The datastore folder, relative to this file (`${VAR}` and `~/` are expanded).
    #[serde(default)]
    pub datastore: Option<String>,
}

/// The keys `[pipeline]` accepts, for "did you mean" help.
pub(crate) const HEADER_KEYS: &[&str] = &["name", "description", "extends", "datastore"];
