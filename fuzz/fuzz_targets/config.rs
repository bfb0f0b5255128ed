//! Fuzzes the pipeline-file loader: `engine::config::load_str` on arbitrary TOML text plus a few
//! `--set` overrides, then the error renderer (on `Err`) or the DAG renderers and the effective
//! document (on `Ok`). Any panic is a bug in the engine.
//!
//! Input layout: the bytes are split on `0xFF` (a byte that never occurs in UTF-8). The first
//! part is the pipeline text, each later part (at most `MAX_OVERRIDES`) is one `--set` string.
//! Invalid UTF-8 is replaced (`from_utf8_lossy`), as the loader only takes `&str`.
//!
//! The pipeline is "read" from `<tmp>/pipe-fuzz-config/pipeline.toml`, which does not exist; the
//! folder holds two small files so that `extends = "base.toml"` (valid) and
//! `extends = "self.toml"` (extends itself) reach the chain code past the first read.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use engine::config::load_str;
use engine::graph::{self, GraphFormat};
use engine::{Arity, InputSpec, ParamError, Registry, Stage, StageContext, StageError};
use libfuzzer_sys::fuzz_target;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

const MAX_OVERRIDES: usize = 4;

/// A source: one path input, parameters with defaults and one required.
struct Source;

#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct SourceParams {
    #[serde(default = "ten")]
    n: u32,
    seed: u64,
    #[serde(default)]
    tags: Vec<String>,
}

fn ten() -> u32 {
    10
}

impl Stage for Source {
    type Params = SourceParams;
    const KIND: &'static str = "source";
    const VERSION: u32 = 1;
    const DOC: &'static str = "Reads rows from a dataset file.";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec::path("data", Arity::One, "The dataset file."),
            InputSpec::path("extra", Arity::Optional, "More files."),
        ]
    }
    fn run(&self, _: &SourceParams, _: &mut StageContext) -> Result<(), StageError> {
        Ok(())
    }
}

/// A trainer: many stage inputs of kind `source`, a nested table, and a `check` that fails.
struct Train;

#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct TrainParams {
    k: u32,
    #[serde(default = "lr")]
    lr: f64,
    #[serde(default)]
    opt: Opt,
}

#[derive(Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields, default)]
struct Opt {
    beta: f64,
    layers: Vec<i64>,
    name: Option<String>,
}

fn lr() -> f64 {
    1e-3
}

impl Stage for Train {
    type Params = TrainParams;
    const KIND: &'static str = "train";
    const VERSION: u32 = 2;
    const DOC: &'static str = "Trains on the rows of sources.";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec::stage_of("activations", &["source"], Arity::Many, "The sources to train on.")]
    }
    fn check(&self, p: &TrainParams) -> Result<(), ParamError> {
        if p.k == 0 {
            return Err(ParamError::new(&["k"], "must be greater than 0"));
        }
        if !(p.lr > 0.0 && p.lr < 1.0) {
            return Err(ParamError::new(&["lr"], "must be in (0, 1)"));
        }
        if let Some(i) = p.opt.layers.iter().position(|&l| l < 0) {
            let index = i.to_string();
            return Err(ParamError::new(&["opt", "layers", &index], "must not be negative"));
        }
        Ok(())
    }
    fn run(&self, _: &TrainParams, _: &mut StageContext) -> Result<(), StageError> {
        Ok(())
    }
}

/// A sink: an optional stage input of any kind, all parameters defaulted.
struct Sink;

#[derive(Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields, default)]
struct SinkParams {
    label: String,
    every: Option<u16>,
}

impl Stage for Sink {
    type Params = SinkParams;
    const KIND: &'static str = "sink";
    const VERSION: u32 = 1;
    const DOC: &'static str = "Collects anything.";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec::stage("from", Arity::Optional, "What to collect.")]
    }
    fn run(&self, _: &SinkParams, _: &mut StageContext) -> Result<(), StageError> {
        Ok(())
    }
}

struct Fixture {
    registry: Registry,
    display: PathBuf,
    /// `PIPE_FUZZ_DEBUG` set: print each outcome (to check what a seed reaches).
    debug: bool,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = std::env::temp_dir().join("pipe-fuzz-config");
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(
            dir.join("base.toml"),
            "[pipeline]\nname = \"base\"\n[stages.web]\nkind = \"source\"\ndata = \"${DATA}/web.jsonl\"\nseed = 1\n",
        );
        let _ = std::fs::write(dir.join("self.toml"), "[pipeline]\nname = \"self\"\nextends = \"self.toml\"\n");
        let mut registry = Registry::new();
        registry.register(Source).register(Train).register(Sink);
        let debug = std::env::var_os("PIPE_FUZZ_DEBUG").is_some();
        Fixture { registry, display: dir.join("pipeline.toml"), debug }
    })
}

fn env(name: &str) -> Option<String> {
    match name {
        "HOME" => Some("/home/fuzz".into()),
        "DATA" => Some("/data".into()),
        "EMPTY" => Some(String::new()),
        "DOLLAR" => Some("${HOME}".into()),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let fx = fixture();
    let mut parts = data.split(|&b| b == 0xFF);
    let text = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let overrides: Vec<String> =
        parts.take(MAX_OVERRIDES).map(|p| String::from_utf8_lossy(p).into_owned()).collect();

    match load_str(&fx.display, &text, &overrides, &fx.registry, &env) {
        Err(e) => {
            let rendered = format!("{e}");
            if fx.debug {
                eprintln!("--- Err\n{rendered}");
            }
            std::hint::black_box(rendered);
        }
        Ok(p) => {
            for format in [GraphFormat::Text, GraphFormat::Dot, GraphFormat::Mermaid] {
                let g = graph::render(&p, format);
                if fx.debug && format == GraphFormat::Text {
                    eprintln!("--- Ok\n{g}");
                }
                std::hint::black_box(g);
            }
            let dag = graph::Dag::new(&p);
            if let Some(first) = p.stages.first() {
                std::hint::black_box(dag.descendants(&first.name));
            }
            if let Some(last) = p.stages.last() {
                std::hint::black_box(dag.ancestors(&last.name));
            }
            std::hint::black_box(p.effective.to_string());
        }
    }
});
