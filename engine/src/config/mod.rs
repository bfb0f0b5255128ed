//! Pipeline files: TOML → validated [`Pipeline`]. Owns parsing (every syntax error, with spans),
//! `extends` chains, `--set` overrides, `${VAR}` expansion in path fields, validation of every
//! stage against the [`Registry`], and rustc-like error messages ([`ConfigErrors`]).
//!
//! Two layers: a spanned value tree that mirrors the files (values remember which file and byte
//! range they came from, through merging and overrides) and the validated [`Pipeline`] the rest
//! of the engine uses. Only reading the pipeline file and the files it extends touches the disk,
//! with one exception: a path input whose kind declares a resolver (a Hugging Face cache
//! reference, say) is looked up locally and, when absent, handed to the resolver. Other path
//! inputs are not checked for existence here (that happens when they are hashed).
//!
//! ```toml
//! [pipeline]
//! name = "tiny"
//! extends = "base.toml"          # optional
//! datastore = "${SCRATCH}/ds"    # optional
//!
//! [stages.cache_web]
//! kind = "cache"
//! model = "${MODELS}/llama"      # a path input of kind `cache`
//! batch = 8                      # a parameter
//!
//! [stages.train]
//! kind = "train"
//! activations = ["cache_web"]    # a stage input: names of other stages
//! ```

mod error;
mod overrides;
mod paths;
mod raw;
mod tree;
mod validate;

#[cfg(test)]
pub(crate) mod tests;

use std::fmt;
use std::path::{Path, PathBuf};

use crate::key::Canon;
use crate::stage::Registry;

pub use error::{ConfigError, ConfigErrors};
pub use raw::{ExecutorTable, PipelineHeader, SlurmOptions, SlurmStageOptions};

use error::{FileId, Sources, Span};
use tree::Table;

/// A place in a pipeline file (or `--set`, for override values). 1-based; the column counts
/// characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Location {
    /// The file as the user named it (not canonicalised), or `--set`.
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.col)
    }
}

/// A path input of a stage: files or folders outside the datastore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalInput {
    pub role: String,
    /// Absolute, `${VAR}` and `~` expanded, references resolved, in the written order. Not
    /// checked for existence.
    pub paths: Vec<PathBuf>,
    /// Where the value is written.
    pub at: Location,
}

/// One validated stage.
#[derive(Clone, Debug, PartialEq)]
pub struct StageDecl {
    pub name: String,
    pub kind: String,
    /// Canonical parameters, defaults filled in (from `DynStage::canonical_params`).
    pub params: Canon,
    /// Stage inputs that are present: (role, upstream stage names in the written order), roles in
    /// the kind's declared order.
    pub inputs: Vec<(String, Vec<String>)>,
    /// Path inputs that are present, in the kind's declared order.
    pub external: Vec<ExternalInput>,
    /// Where the stage's name is written (its table header or key).
    pub at: Location,
}

/// A validated pipeline.
#[derive(Clone, Debug, PartialEq)]
pub struct Pipeline {
    pub name: String,
    /// Empty when absent.
    pub description: String,
    /// The top file, absolute.
    pub file: PathBuf,
    /// The top file, then every file it extends, in chain order; absolute.
    pub files: Vec<PathBuf>,
    /// `[pipeline] datastore`, expanded and absolute.
    pub datastore: Option<PathBuf>,
    /// Upstreams before downstreams; ties broken by name.
    pub stages: Vec<StageDecl>,
    /// `[executor]`: how cluster executors run the stages (not part of any key).
    pub executor: ExecutorTable,
    /// The merged document after `extends` and `--set`, as `pipe show` prints it: `extends` is
    /// dropped (it has been applied) and path values are replaced by their resolved absolute
    /// paths, so the document stands on its own.
    pub effective: toml::Table,
}

impl Pipeline {
    pub fn stage(&self, name: &str) -> Option<&StageDecl> {
        self.stages.iter().find(|s| s.name == name)
    }
}

/// How environment variables are looked up for `${VAR}` and `~` in path fields; injectable so
/// tests need not touch the process environment.
#[derive(Clone, Copy)]
pub struct Env<'a>(pub &'a dyn Fn(&str) -> Option<String>);

impl Env<'static> {
    /// The process environment.
    pub fn real() -> Self {
        Env(&real_env)
    }
}

impl Default for Env<'static> {
    fn default() -> Self {
        Self::real()
    }
}

impl Env<'_> {
    pub fn get(&self, name: &str) -> Option<String> {
        (self.0)(name)
    }
}

fn real_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Reads and validates the pipeline file at `path` with the process environment.
pub fn load(path: &Path, overrides: &[String], registry: &Registry) -> Result<Pipeline, ConfigErrors> {
    load_with_env(path, overrides, registry, &real_env)
}

/// [`load`] with an injected environment lookup.
pub fn load_with_env(
    path: &Path,
    overrides: &[String],
    registry: &Registry,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Pipeline, ConfigErrors> {
    match std::fs::read_to_string(path) {
        Ok(text) => load_str(path, &text, overrides, registry, env),
        Err(e) => Err(ConfigErrors::new(
            path.to_path_buf(),
            vec![ConfigError::without_source(
                path.to_path_buf(),
                format!("cannot read pipeline file `{}`: {e}", path.display()),
            )],
        )),
    }
}

/// Validates pipeline text as if read from `display_path` (`extends` resolves against its
/// directory; only the extended files are read from disk).
pub fn load_str(
    display_path: &Path,
    text: &str,
    overrides: &[String],
    registry: &Registry,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Pipeline, ConfigErrors> {
    let mut cx = Cx { registry, env, sources: Sources::default(), errors: Vec::new() };
    let result = cx.load(display_path, text, overrides);
    match result {
        Some(p) if cx.errors.is_empty() => Ok(p),
        _ => Err(ConfigErrors::new(display_path.to_path_buf(), cx.errors)),
    }
}

/// State of one load: the sources read so far and the errors found so far.
pub(crate) struct Cx<'a> {
    pub registry: &'a Registry,
    pub env: &'a dyn Fn(&str) -> Option<String>,
    pub sources: Sources,
    pub errors: Vec<error::ConfigError>,
}

impl Cx<'_> {
    pub fn error(&mut self, span: &Span, key_path: impl Into<String>, message: impl Into<String>) {
        let e = self.sources.error(span, key_path, message);
        self.errors.push(e);
    }

    pub fn error_help(
        &mut self,
        span: &Span,
        key_path: impl Into<String>,
        message: impl Into<String>,
        help: Option<String>,
    ) {
        let e = self.sources.error(span, key_path, message).with_help_opt(help);
        self.errors.push(e);
    }

    pub fn location(&self, span: &Span) -> Location {
        let e = self.sources.error(span, "", "");
        Location { file: e.file, line: e.line, col: e.col }
    }

    fn load(&mut self, display: &Path, text: &str, overrides: &[String]) -> Option<Pipeline> {
        let top = paths::absolute(display);
        let (docs, files) = self.read_chain(display, &top, text);
        if !self.errors.is_empty() {
            return None;
        }
        let mut docs = docs.into_iter().rev();
        let mut merged = docs.next().unwrap_or_default();
        for doc in docs {
            merged.merge(doc);
        }
        if let Some(tree::Val::Table(p)) = merged.0.get_mut("pipeline").map(|e| &mut e.node.value) {
            p.0.remove("extends");
        }
        self.apply_overrides(&mut merged, overrides);
        if !self.errors.is_empty() {
            return None;
        }
        let v = validate::validate(self, &merged)?;
        if !self.errors.is_empty() {
            return None;
        }
        let mut effective = merged.to_toml();
        validate::patch_effective(&mut effective, &v);
        Some(Pipeline {
            name: v.name,
            description: v.description,
            file: top,
            files,
            datastore: v.datastore,
            stages: v.stages,
            executor: v.executor,
            effective,
        })
    }

    /// Parses one source into a tree, recording syntax errors.
    fn parse(&mut self, file: FileId) -> Table {
        let Some(text) = self.sources.get(file).map(|s| s.text.clone()) else {
            return Table::default();
        };
        let (doc, errors) = toml::de::DeTable::parse_recoverable(&text);
        let headers = if errors.is_empty() { Vec::new() } else { syntax::headers(&text) };
        let mut described: Vec<_> = errors
            .iter()
            .map(|e| {
                let range = e.span().unwrap_or(0..0);
                let d = syntax::describe(&text, &headers, e.message(), &range);
                (range, d)
            })
            .collect();
        described.sort_by_key(|(range, _)| range.start);
        // The keys of a table declared twice are merged into the first declaration and reported
        // as duplicates too; the duplicate table says it all.
        let mut quiet_until = 0;
        for (range, d) in described {
            if d.kind == syntax::Kind::Key && range.start < quiet_until {
                continue;
            }
            if d.kind == syntax::Kind::Table {
                quiet_until = syntax::next_header(&text, &headers, range.end);
            }
            self.error_help(&Span::new(file, range), d.key_path, d.message, d.help);
        }
        let mut value_errors = Vec::new();
        let table = tree::from_de_table(doc.get_ref(), file, 0, &mut value_errors);
        for e in value_errors {
            self.error(&e.span, "", e.message);
        }
        table
    }

    /// The top file and the files it `extends`, parsed, in chain order, with their absolute paths.
    fn read_chain(&mut self, display: &Path, abs: &Path, text: &str) -> (Vec<Table>, Vec<PathBuf>) {
        let mut docs = Vec::new();
        let mut files = Vec::new();
        let mut displays: Vec<PathBuf> = Vec::new();
        let mut identities = Vec::new();
        let (mut display, mut abs, mut text) = (display.to_path_buf(), abs.to_path_buf(), text.to_string());
        loop {
            let dir = abs.parent().map(Path::to_path_buf).unwrap_or_default();
            let id = self.sources.add(display.clone(), dir.clone(), &text);
            let doc = self.parse(id);
            identities.push(std::fs::canonicalize(&abs).unwrap_or_else(|_| abs.clone()));
            files.push(abs.clone());
            displays.push(display.clone());
            let extends = doc
                .get("pipeline")
                .and_then(|e| e.node.as_table())
                .and_then(|t| t.get("extends"))
                .map(|e| e.node.clone());
            docs.push(doc);
            let Some(node) = extends else { break };
            let key = "pipeline.extends";
            let Some(raw) = node.as_str() else {
                let found = node.value.type_name();
                self.error(&node.span, key, format!("`extends` must be a path (a string), found {found}"));
                break;
            };
            let expanded = match paths::expand(raw, self.env) {
                Ok(p) => p,
                Err(e) => {
                    self.error(&node.span, key, e.message());
                    break;
                }
            };
            let next_abs = paths::resolve(&dir, &expanded);
            let next_display = match display.parent() {
                Some(parent) if Path::new(&expanded).is_relative() => paths::clean(&parent.join(&expanded)),
                _ => PathBuf::from(&expanded),
            };
            let identity = std::fs::canonicalize(&next_abs).unwrap_or_else(|_| next_abs.clone());
            if let Some(i) = identities.iter().position(|p| *p == identity) {
                let mut chain: Vec<String> = displays.iter().map(|d| d.display().to_string()).collect();
                chain.push(displays[i].display().to_string());
                let e = self
                    .sources
                    .error(&node.span, key, format!("`extends` cycle: {}", chain.join(" -> ")))
                    .with_help("a pipeline file cannot extend itself, directly or through other files");
                self.errors.push(e);
                break;
            }
            match std::fs::read_to_string(&next_abs) {
                Ok(t) => text = t,
                Err(e) => {
                    let e = self
                        .sources
                        .error(
                            &node.span,
                            key,
                            format!("cannot read extended file `{}`: {e}", next_display.display()),
                        )
                        .with_help("`extends` is a path relative to the file that contains it");
                    self.errors.push(e);
                    break;
                }
            }
            display = next_display;
            abs = next_abs;
        }
        (docs, files)
    }

    fn apply_overrides(&mut self, merged: &mut Table, overrides: &[String]) {
        let cwd = paths::absolute(Path::new("."));
        for text in overrides {
            let id = self.sources.add(PathBuf::from("--set"), cwd.clone(), text);
            let o = match overrides::parse(text, id) {
                Ok(o) => o,
                Err(e) => {
                    let span = Span::new(id, e.range);
                    self.error_help(&span, "", e.message, Some(e.help.to_string()));
                    continue;
                }
            };
            let keys: Vec<String> = o.path.iter().map(|(k, _)| k.clone()).collect();
            let key = error::key_path(&keys);
            if keys.len() >= 2 && keys[0] == "pipeline" && keys[1] == "extends" {
                let span = Span::new(id, 0..text.len());
                self.error_help(
                    &span,
                    key,
                    "`pipeline.extends` cannot be overridden",
                    Some("`extends` is applied before overrides; edit the file instead".to_string()),
                );
                continue;
            }
            let ranges: Vec<_> = o.path.iter().map(|(_, r)| r.clone()).collect();
            if let Err(e) = overrides::apply(merged, o, id) {
                let prefix = error::key_path(&keys[..e.depth]);
                let span = Span::new(id, ranges[0].start..ranges[e.depth - 1].end);
                self.error_help(
                    &span,
                    key.clone(),
                    format!("cannot set `{key}`: `{prefix}` is {}, not a table", e.found),
                    Some(format!("set `{prefix}` itself, e.g. `--set {prefix}=...`")),
                );
            }
        }
    }
}

/// Clearer wording for the parser's messages.
mod syntax {
    use std::ops::Range;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Kind {
        /// A `[table]` (or stage) declared twice.
        Table,
        /// A key written twice in one table.
        Key,
        Other,
    }

    pub struct Described {
        pub kind: Kind,
        pub message: String,
        pub key_path: String,
        pub help: Option<String>,
    }

    /// A TOML parse error at `range`, worded for pipeline files. `headers` is [`headers`].
    pub fn describe(text: &str, headers: &[usize], message: &str, range: &Range<usize>) -> Described {
        if message.starts_with("duplicate key") {
            return duplicate(text, headers, range);
        }
        Described {
            kind: Kind::Other,
            message: format!("invalid TOML: {message}"),
            key_path: String::new(),
            help: None,
        }
    }

    /// Offsets of the lines that start a table (`[...]`), ascending.
    pub fn headers(text: &str) -> Vec<usize> {
        let mut out = Vec::new();
        let mut pos = 0;
        for line in text.split_inclusive('\n') {
            if line.trim_start().starts_with('[') {
                out.push(pos);
            }
            pos += line.len();
        }
        out
    }

    /// The offset of the first table header line after `offset`, or the end.
    pub fn next_header(text: &str, headers: &[usize], offset: usize) -> usize {
        let i = headers.partition_point(|&h| h <= offset);
        headers.get(i).copied().unwrap_or(text.len())
    }

    fn line_at(text: &str, start: usize) -> &str {
        text.get(start..).and_then(|s| s.lines().next()).unwrap_or("")
    }

    fn duplicate(text: &str, headers: &[usize], range: &Range<usize>) -> Described {
        let key = text.get(range.clone()).unwrap_or("").trim_matches(|c| c == '"' || c == '\'');
        let start = range.start.min(text.len());
        let line_start = text.get(..start).and_then(|s| s.rfind('\n')).map_or(0, |i| i + 1);
        let line = line_at(text, line_start);
        let at_line_start = text.get(line_start..start).is_some_and(|s| s.trim().is_empty());
        let is_header = line.trim_start().starts_with('[');
        let path = if is_header {
            header_path(line)
        } else if at_line_start {
            // `name = {...}` directly under `[stages]`.
            let i = headers.partition_point(|&h| h < line_start);
            i.checked_sub(1).and_then(|i| headers.get(i)).and_then(|&h| header_path(line_at(text, h))).map(
                |mut p| {
                    p.push(key.to_string());
                    p
                },
            )
        } else {
            None
        };
        match path.as_deref() {
            Some([stages, name]) if stages == "stages" => Described {
                kind: Kind::Table,
                message: format!("duplicate stage `{name}`"),
                key_path: super::error::key_path(&["stages", name.as_str()]),
                help: Some("stage names are unique within a pipeline: rename one of the stages".to_string()),
            },
            Some(path) if is_header => Described {
                kind: Kind::Table,
                message: format!("duplicate table `[{}]`", super::error::key_path(path)),
                key_path: super::error::key_path(path),
                help: Some("a table can be declared only once: merge the two".to_string()),
            },
            _ => Described {
                kind: Kind::Key,
                message: format!("duplicate key `{key}`"),
                key_path: String::new(),
                help: Some("a key can appear only once in a table".to_string()),
            },
        }
    }

    /// The key path of a `[a.b]` / `[[a.b]]` header line.
    fn header_path(line: &str) -> Option<Vec<String>> {
        let (doc, errors) = toml::de::DeTable::parse_recoverable(line);
        if !errors.is_empty() {
            return None;
        }
        let mut path = Vec::new();
        let mut table = doc.into_inner();
        loop {
            let mut iter = table.into_iter();
            let (k, v) = iter.next()?;
            if iter.next().is_some() {
                return None;
            }
            path.push(k.into_inner().into_owned());
            match v.into_inner() {
                toml::de::DeValue::Table(t) if !t.is_empty() => table = t,
                toml::de::DeValue::Array(a) => match a.into_iter().last().map(|v| v.into_inner()) {
                    Some(toml::de::DeValue::Table(t)) if !t.is_empty() => table = t,
                    _ => return Some(path),
                },
                _ => return Some(path),
            }
        }
    }
}
