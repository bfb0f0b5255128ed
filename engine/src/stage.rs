//! The stage API: what a stage kind declares (name, version, parameters, inputs, device) and the
//! context the executor hands to `run`. The engine knows stage kinds only through this module.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::key::{Canon, Key};
use crate::progress::Progress;

/// How many values an input field takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arity {
    /// Exactly one value: `field = "x"`.
    One,
    /// Zero or one value.
    Optional,
    /// One or more values: `field = ["x", "y"]` (a single string is accepted too).
    Many,
    /// Zero or more values: like `Many`, but the field may be left out.
    OptionalMany,
}

impl Arity {
    /// Takes an array of values.
    pub fn is_many(self) -> bool {
        matches!(self, Arity::Many | Arity::OptionalMany)
    }
}

/// Where an input comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InputSource {
    /// The output of other stages, named by stage name. `kinds` lists the accepted upstream
    /// stage kinds; empty accepts any kind.
    Stage { kinds: &'static [&'static str] },
    /// A file or folder outside the datastore (model folder, dataset file). Its content enters the
    /// key; `${VAR}` is expanded in it and a relative path is resolved against the pipeline file.
    /// A value that names no local path may be a reference for the input's [`Resolver`].
    Path,
}

/// Turns a path input's value that is not a local path into one, e.g. `org/name@rev` into a folder
/// of a local cache. `raw` is the value after `${VAR}` and `~` expansion. Returns `Ok(None)` when
/// `raw` is not a reference (it is then taken as a path), `Err` when it is one that cannot be
/// resolved. A resolver may read the disk but must not reach the network.
pub type Resolver = fn(raw: &str, cx: &ResolveCx<'_>) -> Result<Option<PathBuf>, ResolveError>;

/// What a [`Resolver`] may consult: the folder of the file that wrote the value and the
/// environment lookup of the loader (injectable, so tests need not touch the process environment).
#[derive(Clone, Copy)]
pub struct ResolveCx<'a> {
    dir: &'a Path,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> ResolveCx<'a> {
    pub fn new(dir: &'a Path, env: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Self { dir, env }
    }
    /// The absolute folder relative paths of this value resolve against (the pipeline file's
    /// folder; the current directory for `--set`).
    pub fn dir(&self) -> &'a Path {
        self.dir
    }
    pub fn env(&self, name: &str) -> Option<String> {
        (self.env)(name)
    }
}

impl fmt::Debug for ResolveCx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolveCx").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// Why a reference could not be resolved; reported as a config error at the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolveError {
    /// What is missing and where it was looked for; lowercase, one line.
    pub message: String,
    /// What to do about it.
    pub help: Option<String>,
}

impl ResolveError {
    pub fn new(message: impl Into<String>) -> Self {
        Self { message: message.into(), help: None }
    }
    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// One declared input of a stage kind: a field of the stage table that names other stages or
/// external paths, as opposed to a parameter.
#[derive(Clone, Debug)]
pub struct InputSpec {
    pub name: &'static str,
    pub source: InputSource,
    pub arity: Arity,
    pub doc: &'static str,
    /// For a path input: how a value that names no local path becomes one (see [`Resolver`]).
    pub resolver: Option<Resolver>,
}

impl InputSpec {
    pub const fn stage(name: &'static str, arity: Arity, doc: &'static str) -> Self {
        Self { name, source: InputSource::Stage { kinds: &[] }, arity, doc, resolver: None }
    }
    pub const fn stage_of(
        name: &'static str,
        kinds: &'static [&'static str],
        arity: Arity,
        doc: &'static str,
    ) -> Self {
        Self { name, source: InputSource::Stage { kinds }, arity, doc, resolver: None }
    }
    pub const fn path(name: &'static str, arity: Arity, doc: &'static str) -> Self {
        Self { name, source: InputSource::Path, arity, doc, resolver: None }
    }
    /// Lets a path input's values be references: a value that names no existing local path, or
    /// one with an explicit scheme (`hf:org/name`), is handed to `resolver`. Panics on a stage
    /// input (a programming error, caught when the stage kind's inputs are first built).
    pub const fn with_resolver(mut self, resolver: Resolver) -> Self {
        assert!(matches!(self.source, InputSource::Path), "only path inputs take a resolver");
        self.resolver = Some(resolver);
        self
    }
}

/// Whether a stage wants an accelerator from `--devices`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceUse {
    /// Runs on the CPU; never holds a device.
    Cpu,
    /// Takes one device of `--devices` for its whole run (`cpu` when none is listed).
    Accelerator,
}

/// A stage kind. Implement this; register it with [`Registry::register`].
pub trait Stage: Send + Sync + 'static {
    /// Typed parameters: every field of the stage table that is not `kind` or an input.
    /// Use `#[serde(deny_unknown_fields)]` and `#[serde(default)]` so defaults fill in.
    type Params: Serialize + DeserializeOwned + JsonSchema;
    /// The `kind = "..."` name.
    const KIND: &'static str;
    /// Bump when the stage's outputs change for the same parameters: every key of this kind changes.
    const VERSION: u32;
    /// One line for `--help`, the schema and docs.
    const DOC: &'static str;
    /// Top-level parameters that change how a stage runs but never what it produces (micro-batch
    /// sizes, thread counts). They are passed to `run` but do not enter the key, so changing one
    /// reruns nothing. Only list a parameter here when outputs are equal whatever its value.
    const UNKEYED: &'static [&'static str] = &[];
    /// True when [`Stage::split`] can cut the work into parts that run as separate jobs.
    const SPLITS: bool = false;

    fn inputs(&self) -> Vec<InputSpec> {
        Vec::new()
    }
    fn device(&self) -> DeviceUse {
        DeviceUse::Cpu
    }
    /// Validation beyond types (ranges, combinations). Errors name the parameter path.
    fn check(&self, _params: &Self::Params) -> Result<(), ParamError> {
        Ok(())
    }
    /// Produce the outputs in `ctx.out_dir()`. May keep checkpoints in `ctx.work_dir()`, which
    /// survives a failed or killed attempt and is handed back to the next attempt of the same key.
    fn run(&self, params: &Self::Params, ctx: &mut StageContext) -> Result<(), StageError>;
    /// For executors that run one stage as several jobs (a Slurm job array; only called when
    /// [`Stage::SPLITS`] is true): plan at most `max_parts` independent parts of the work,
    /// write what the parts need into `ctx.work_dir()`, and return how many there are (1: no
    /// split). Then `run` is called once per part with `ctx.portion()` =
    /// [`Portion::Part`] (in any order, concurrently, each maybe on another machine, each
    /// resumable and each with its own lock), and once with [`Portion::Assemble`] after every part
    /// returned `Ok`, to write the outputs, which must equal those of a [`Portion::Whole`] run.
    fn split(
        &self,
        _params: &Self::Params,
        _ctx: &mut StageContext,
        _max_parts: usize,
    ) -> Result<usize, StageError> {
        Ok(1)
    }
    /// For `pipe diff`: write figures or tables that compare published outputs of this kind
    /// across pipelines into `dest` (an existing, empty folder), and return the files written
    /// (paths inside `dest`). `outputs` holds at least two (label, out folder) pairs, in the
    /// order the pipelines were given. The default compares nothing.
    fn compare(&self, _outputs: &[Compared], _dest: &Path) -> Result<Vec<PathBuf>, StageError> {
        Ok(Vec::new())
    }
}

/// One side of a [`Stage::compare`]: a published output folder and the label to show for it.
#[derive(Clone, Debug)]
pub struct Compared {
    /// Which pipeline it comes from, as shown in legends (the pipeline's name, or its file's stem
    /// when two names are equal).
    pub label: String,
    /// The stage's name in that pipeline.
    pub stage: String,
    /// The published `out/` folder; read-only.
    pub dir: PathBuf,
}

/// A parameter that failed to deserialize or check, with the path inside the stage table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamError {
    /// Keys (and array indices, as decimal strings) from the stage table down to the value.
    pub path: Vec<String>,
    pub message: String,
}

impl ParamError {
    pub fn new(path: &[&str], message: impl Into<String>) -> Self {
        Self { path: path.iter().map(|s| s.to_string()).collect(), message: message.into() }
    }
}

/// Why a stage run did not produce its outputs.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The run was asked to stop (Ctrl-C); partial work stays resumable.
    #[error("cancelled")]
    Cancelled,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

impl StageError {
    pub fn failed(msg: impl fmt::Display) -> Self {
        Self::Failed(msg.to_string())
    }
    pub fn other(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Other(Box::new(e))
    }
    pub fn io(context: impl fmt::Display, source: std::io::Error) -> Self {
        Self::Io { context: context.to_string(), source }
    }
}

impl From<std::io::Error> for StageError {
    fn from(source: std::io::Error) -> Self {
        Self::Io { context: "i/o error".into(), source }
    }
}

/// The published output of an upstream stage, as seen by a downstream stage.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// The upstream's name in this pipeline (for messages only: names are not part of keys).
    pub stage: String,
    pub kind: String,
    pub key: Key,
    /// The published object folder; read-only.
    pub dir: PathBuf,
}

/// A cooperative cancellation flag, set on Ctrl-C.
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What one call of [`Stage::run`] computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Portion {
    /// Everything: the outputs.
    #[default]
    Whole,
    /// Part `index` of a split into `count` parts (see [`Stage::split`]): work kept in the work
    /// dir; the out dir is not published.
    Part { index: usize, count: usize },
    /// Every part of a split into `count` is done: write the outputs from them.
    Assemble { count: usize },
}

/// Everything a running stage may touch.
pub struct StageContext {
    pub(crate) name: String,
    pub(crate) key: Key,
    pub(crate) work_dir: PathBuf,
    pub(crate) out_dir: PathBuf,
    pub(crate) resumed: bool,
    pub(crate) inputs: BTreeMap<String, Vec<Upstream>>,
    pub(crate) external: BTreeMap<String, Vec<PathBuf>>,
    pub(crate) device: String,
    pub(crate) progress: Progress,
    pub(crate) cancel: Cancel,
    pub(crate) metrics: BTreeMap<String, serde_json::Value>,
    pub(crate) portion: Portion,
}

impl StageContext {
    /// The stage's name in the pipeline being run (for messages).
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn key(&self) -> &Key {
        &self.key
    }
    /// Scratch space kept across attempts of the same key (checkpoints, shards in progress).
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }
    /// Where the outputs go; published atomically when `run` returns `Ok`.
    pub fn out_dir(&self) -> &Path {
        &self.out_dir
    }
    /// True when an earlier attempt of this key left a work dir behind.
    pub fn resumed(&self) -> bool {
        self.resumed
    }
    /// The upstream outputs of an input role, in the order written in the pipeline file.
    pub fn inputs(&self, role: &str) -> &[Upstream] {
        self.inputs.get(role).map(Vec::as_slice).unwrap_or(&[])
    }
    /// The single upstream of an input role declared with `Arity::One`.
    pub fn input(&self, role: &str) -> Result<&Upstream, StageError> {
        self.inputs(role)
            .first()
            .ok_or_else(|| StageError::failed(format!("input `{role}` is not connected")))
    }
    /// The external paths of a path input, absolute, `${VAR}` expanded.
    pub fn external(&self, role: &str) -> &[PathBuf] {
        self.external.get(role).map(Vec::as_slice).unwrap_or(&[])
    }
    /// What this call computes: the whole stage, one part of a split, or the outputs from the
    /// parts (only stages with [`Stage::SPLITS`] see anything but `Whole`).
    pub fn portion(&self) -> Portion {
        self.portion
    }
    /// The device assigned to this run: `cpu`, `cuda:0`, ...
    pub fn device(&self) -> &str {
        &self.device
    }
    pub fn progress(&self) -> &Progress {
        &self.progress
    }
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
    /// Returns `Err(StageError::Cancelled)` once Ctrl-C was pressed; call it between units of work.
    /// The cancellation flag itself, for work that runs outside the context (threads, library
    /// functions that take a `Fn() -> bool`).
    pub fn cancel_flag(&self) -> Cancel {
        self.cancel.clone()
    }

    pub fn check_cancelled(&self) -> Result<(), StageError> {
        if self.is_cancelled() { Err(StageError::Cancelled) } else { Ok(()) }
    }
    /// A summary metric, stored in the manifest and compared by `pipe diff`.
    pub fn record_metric(&mut self, name: &str, value: impl Into<serde_json::Value>) {
        self.metrics.insert(name.to_string(), value.into());
    }
}

/// Object-safe view of a [`Stage`], as stored in the [`Registry`].
pub trait DynStage: Send + Sync {
    fn kind(&self) -> &'static str;
    fn version(&self) -> u32;
    fn doc(&self) -> &'static str;
    /// See [`Stage::UNKEYED`].
    fn unkeyed(&self) -> &'static [&'static str];
    /// See [`Stage::SPLITS`].
    fn splits(&self) -> bool;
    fn inputs(&self) -> &[InputSpec];
    fn device(&self) -> DeviceUse;
    /// JSON Schema of the parameters (inputs and `kind` are added by the engine).
    fn params_schema(&self, generator: &mut SchemaGenerator) -> Schema;
    /// Deserialize the parameter table, fill defaults, check, and canonicalise.
    fn canonical_params(&self, table: toml::Table) -> Result<Canon, ParamError>;
    fn run(&self, params: &Canon, ctx: &mut StageContext) -> Result<(), StageError>;
    fn split(&self, params: &Canon, ctx: &mut StageContext, max_parts: usize) -> Result<usize, StageError>;
    fn compare(&self, outputs: &[Compared], dest: &Path) -> Result<Vec<PathBuf>, StageError>;
}

struct Erased<S: Stage> {
    stage: S,
    inputs: Vec<InputSpec>,
}

fn path_of(path: &serde_path_to_error::Path) -> Vec<String> {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|seg| match seg {
            Segment::Seq { index } => Some(index.to_string()),
            Segment::Map { key } => Some(key.clone()),
            Segment::Enum { variant } => Some(variant.clone()),
            Segment::Unknown => None,
        })
        .collect()
}

impl<S: Stage> DynStage for Erased<S> {
    fn kind(&self) -> &'static str {
        S::KIND
    }
    fn version(&self) -> u32 {
        S::VERSION
    }
    fn doc(&self) -> &'static str {
        S::DOC
    }
    fn unkeyed(&self) -> &'static [&'static str] {
        S::UNKEYED
    }
    fn splits(&self) -> bool {
        S::SPLITS
    }
    fn inputs(&self) -> &[InputSpec] {
        &self.inputs
    }
    fn device(&self) -> DeviceUse {
        self.stage.device()
    }
    fn params_schema(&self, generator: &mut SchemaGenerator) -> Schema {
        generator.root_schema_for::<S::Params>()
    }
    fn canonical_params(&self, table: toml::Table) -> Result<Canon, ParamError> {
        // serde_json turns NaN into null, so non-finite floats are refused before they get there.
        if let Some(path) = non_finite(&toml::Value::Table(table.clone()), &mut Vec::new()) {
            return Err(ParamError {
                path,
                message: "nan and inf are not allowed: parameters must be finite numbers".into(),
            });
        }
        let params: S::Params = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let mut path = path_of(e.path());
            let message = e.inner().message().to_string();
            // Some deserializers report an unknown field at its parent; name the field itself.
            if let Some(field) = unknown_field(&message)
                && path.last() != Some(&field)
            {
                path.push(field);
            }
            ParamError { path, message }
        })?;
        self.stage.check(&params)?;
        let json = serde_json::to_value(&params).map_err(|e| ParamError {
            path: Vec::new(),
            message: format!("parameters cannot be canonicalised: {e}"),
        })?;
        Canon::from_json(&json).map_err(|message| ParamError { path: Vec::new(), message })
    }
    fn run(&self, params: &Canon, ctx: &mut StageContext) -> Result<(), StageError> {
        self.stage.run(&typed::<S>(params)?, ctx)
    }
    fn split(&self, params: &Canon, ctx: &mut StageContext, max_parts: usize) -> Result<usize, StageError> {
        if !S::SPLITS {
            return Ok(1);
        }
        self.stage.split(&typed::<S>(params)?, ctx, max_parts)
    }
    fn compare(&self, outputs: &[Compared], dest: &Path) -> Result<Vec<PathBuf>, StageError> {
        self.stage.compare(outputs, dest)
    }
}

fn typed<S: Stage>(params: &Canon) -> Result<S::Params, StageError> {
    serde_json::from_value(params.to_json())
        .map_err(|e| StageError::failed(format!("stored parameters do not deserialize: {e}")))
}

/// The path of the first NaN or infinite float in a TOML value.
fn non_finite(v: &toml::Value, path: &mut Vec<String>) -> Option<Vec<String>> {
    match v {
        toml::Value::Float(x) if !x.is_finite() => Some(path.clone()),
        toml::Value::Array(a) => a.iter().enumerate().find_map(|(i, x)| {
            path.push(i.to_string());
            let r = non_finite(x, path);
            path.pop();
            r
        }),
        toml::Value::Table(t) => t.iter().find_map(|(k, x)| {
            path.push(k.clone());
            let r = non_finite(x, path);
            path.pop();
            r
        }),
        _ => None,
    }
}

fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

/// The stage kinds a binary knows, by kind name.
#[derive(Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Box<dyn DynStage>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds a stage kind. Panics when the kind name is taken or an input collides: both are
    /// programming errors caught by the first test that builds the registry.
    pub fn register<S: Stage>(&mut self, stage: S) -> &mut Self {
        let inputs = stage.inputs();
        for (i, spec) in inputs.iter().enumerate() {
            assert!(spec.name != "kind", "stage kind {}: an input cannot be called `kind`", S::KIND);
            assert!(
                !inputs[..i].iter().any(|o| o.name == spec.name),
                "stage kind {}: input `{}` declared twice",
                S::KIND,
                spec.name
            );
        }
        let prev = self.kinds.insert(S::KIND, Box::new(Erased { stage, inputs }));
        assert!(prev.is_none(), "stage kind `{}` registered twice", S::KIND);
        self
    }
    pub fn get(&self, kind: &str) -> Option<&dyn DynStage> {
        self.kinds.get(kind).map(|b| b.as_ref())
    }
    /// Kinds in name order.
    pub fn kinds(&self) -> impl Iterator<Item = &dyn DynStage> {
        self.kinds.values().map(|b| b.as_ref())
    }
    pub fn kind_names(&self) -> Vec<&'static str> {
        self.kinds.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields, default)]
    struct P {
        lr: f64,
        k: u32,
        opt: Opt,
    }
    #[derive(Serialize, serde::Deserialize, JsonSchema, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Opt {
        betas: Vec<f64>,
    }
    impl Default for P {
        fn default() -> Self {
            Self { lr: 1e-3, k: 100, opt: Opt::default() }
        }
    }
    struct K;
    impl Stage for K {
        type Params = P;
        const KIND: &'static str = "k";
        const VERSION: u32 = 1;
        const DOC: &'static str = "test";
        fn check(&self, p: &P) -> Result<(), ParamError> {
            if p.k == 0 { Err(ParamError::new(&["k"], "must be positive")) } else { Ok(()) }
        }
        fn run(&self, _: &P, _: &mut StageContext) -> Result<(), StageError> {
            Ok(())
        }
    }

    fn check(toml_text: &str) -> Result<String, (Vec<String>, String)> {
        let mut r = Registry::new();
        r.register(K);
        let table: toml::Table = toml_text.parse().unwrap();
        r.get("k").unwrap().canonical_params(table).map(|c| c.to_string()).map_err(|e| (e.path, e.message))
    }

    #[test]
    fn defaults_fill_in_and_explicit_defaults_change_nothing() {
        let want = "{k = 100, lr = 0.001, opt = {betas = []}}";
        assert_eq!(check("").unwrap(), want);
        assert_eq!(check("k = 100\nlr = 0.001").unwrap(), want);
    }

    #[test]
    fn errors_name_the_parameter_path() {
        assert_eq!(check("k = 0").unwrap_err().0, ["k"]);
        assert_eq!(check("kk = 1").unwrap_err().0, ["kk"]);
        assert_eq!(check("k = \"x\"").unwrap_err().0, ["k"]);
        assert_eq!(check("opt = {betas = [0.9, \"x\"]}").unwrap_err().0, ["opt", "betas", "1"]);
    }

    #[test]
    fn nan_and_inf_are_refused_with_their_path() {
        let (path, msg) = check("opt = {betas = [0.9, nan]}").unwrap_err();
        assert_eq!(path, ["opt", "betas", "1"]);
        assert!(msg.contains("finite"), "{msg}");
        assert_eq!(check("lr = inf").unwrap_err().0, ["lr"]);
    }
}
