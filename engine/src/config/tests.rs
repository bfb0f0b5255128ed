//! Tests of pipeline loading: one snapshot per error kind, positive cases by `check`.

use std::path::{Path, PathBuf};

use crate::key::Canon;

use super::{ConfigErrors, Pipeline, load_str, load_with_env};

/// Small stage kinds for the config and schema tests.
pub(crate) mod kinds {
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};

    use std::path::{Path, PathBuf};

    use crate::stage::{
        Arity, InputSpec, ParamError, Registry, ResolveCx, ResolveError, Stage, StageContext, StageError,
    };

    pub struct Source;

    #[derive(Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct SourceParams {
        /// Number of rows.
        #[serde(default = "ten")]
        pub n: u32,
        pub seed: u64,
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
            vec![InputSpec::path("data", Arity::One, "The dataset file.")]
        }
        fn run(&self, _: &SourceParams, _: &mut StageContext) -> Result<(), StageError> {
            Ok(())
        }
    }

    pub struct Train;

    #[derive(Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct TrainParams {
        pub k: u32,
        #[serde(default = "lr")]
        pub lr: f64,
    }

    fn lr() -> f64 {
        1e-3
    }

    impl Stage for Train {
        type Params = TrainParams;
        const KIND: &'static str = "train";
        const VERSION: u32 = 1;
        const DOC: &'static str = "Trains on the rows of sources.";
        fn inputs(&self) -> Vec<InputSpec> {
            vec![InputSpec::stage_of("activations", &["source"], Arity::Many, "The sources to train on.")]
        }
        fn check(&self, p: &TrainParams) -> Result<(), ParamError> {
            if p.k == 0 {
                return Err(ParamError::new(&["k"], "must be greater than 0"));
            }
            Ok(())
        }
        fn run(&self, _: &TrainParams, _: &mut StageContext) -> Result<(), StageError> {
            Ok(())
        }
    }

    pub struct Sink;

    #[derive(Serialize, Deserialize, JsonSchema, Default)]
    #[serde(deny_unknown_fields, default)]
    pub struct SinkParams {
        pub layers: Vec<u32>,
        pub label: String,
        pub opt: Opt,
    }

    #[derive(Serialize, Deserialize, JsonSchema, Default)]
    #[serde(deny_unknown_fields, default)]
    pub struct Opt {
        pub beta: f64,
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

    pub struct Bundle;

    #[derive(Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct BundleParams {}

    impl Stage for Bundle {
        type Params = BundleParams;
        const KIND: &'static str = "bundle";
        const VERSION: u32 = 1;
        const DOC: &'static str = "Bundles files.";
        fn inputs(&self) -> Vec<InputSpec> {
            vec![
                InputSpec::path("files", Arity::Many, "Files to bundle."),
                InputSpec::path("readme", Arity::Optional, ""),
            ]
        }
        fn run(&self, _: &BundleParams, _: &mut StageContext) -> Result<(), StageError> {
            Ok(())
        }
    }

    pub fn registry() -> Registry {
        let mut r = Registry::new();
        r.register(Source).register(Train).register(Sink).register(Bundle);
        r
    }

    /// Path inputs whose values may be references, resolved by [`test_ref`].
    pub struct Model;

    #[derive(Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct ModelParams {}

    impl Stage for Model {
        type Params = ModelParams;
        const KIND: &'static str = "model";
        const VERSION: u32 = 1;
        const DOC: &'static str = "Reads a model folder.";
        fn inputs(&self) -> Vec<InputSpec> {
            const BASE: InputSpec =
                InputSpec::path("base", Arity::One, "A model folder or reference.").with_resolver(test_ref);
            vec![BASE, InputSpec::path("extra", Arity::Many, "").with_resolver(test_ref)]
        }
        fn run(&self, _: &ModelParams, _: &mut StageContext) -> Result<(), StageError> {
            Ok(())
        }
    }

    /// A resolver for the tests: `org/name`, or `ref:org/name` whatever is on disk, is the folder
    /// `${REFS}/org--name`, which must exist.
    pub fn test_ref(raw: &str, cx: &ResolveCx<'_>) -> Result<Option<PathBuf>, ResolveError> {
        let (value, explicit) = match raw.strip_prefix("ref:") {
            Some(rest) => (rest, true),
            None => (raw, false),
        };
        let reference = match value.split_once('/') {
            Some((org, name)) if !org.is_empty() && !name.contains('/') && !org.starts_with('.') => {
                Some((org, name))
            }
            _ => None,
        };
        let Some((org, name)) = reference else {
            return if explicit {
                Err(ResolveError::new(format!("`{raw}` is no reference")))
            } else {
                Ok(None)
            };
        };
        let refs = cx.env("REFS").ok_or_else(|| ResolveError::new("`REFS` is not set"))?;
        let dir = Path::new(&refs).join(format!("{org}--{name}"));
        if !dir.is_dir() {
            let local = cx.dir().join(value);
            return Err(ResolveError::new(format!(
                "`{value}` is neither a local path (`{}`) nor in the test cache (`{}`)",
                local.display(),
                dir.display()
            ))
            .with_help(format!("put it into `{refs}`")));
        }
        Ok(Some(dir))
    }

    /// [`registry`] and [`Model`].
    pub fn with_refs() -> Registry {
        let mut r = registry();
        r.register(Model);
        r
    }
}

fn env(k: &str) -> Option<String> {
    match k {
        "MODELS" => Some("/models".into()),
        "DATA" => Some("/data".into()),
        "HOME" => Some("/home/u".into()),
        _ => None,
    }
}

const FILE: &str = "pipelines/x.toml";

fn load(text: &str, overrides: &[&str]) -> Result<Pipeline, ConfigErrors> {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    load_str(Path::new(FILE), text, &overrides, &kinds::registry(), &env)
}

/// The rendered errors, or a summary of the pipeline: one line per stage in run order.
fn check(text: &str, overrides: &[&str]) -> String {
    match load(text, overrides) {
        Err(e) => e.to_string(),
        Ok(p) => summary(&p),
    }
}

fn summary(p: &Pipeline) -> String {
    let mut out = format!("pipeline {}", p.name);
    if let Some(ds) = &p.datastore {
        out.push_str(&format!(" datastore={}", ds.display()));
    }
    for s in &p.stages {
        out.push_str(&format!("\n{} ({}) {}", s.name, s.kind, s.params));
        for (role, names) in &s.inputs {
            out.push_str(&format!(" {role}<-{}", names.join(",")));
        }
        for e in &s.external {
            let paths: Vec<String> = e.paths.iter().map(|p| p.display().to_string()).collect();
            out.push_str(&format!(" {}={}", e.role, paths.join(",")));
        }
    }
    out
}

fn ok(text: &str, overrides: &[&str]) -> Pipeline {
    match load(text, overrides) {
        Ok(p) => p,
        Err(e) => panic!("expected a valid pipeline:\n{e}"),
    }
}

const GOOD: &str = r#"
[pipeline]
name = "tiny"

[stages.web]
kind = "source"
data = "/data/web.jsonl"
seed = 1

[stages.chat]
kind = "source"
data = "/data/chat.jsonl"
seed = 2
n = 5

[stages.train]
kind = "train"
activations = ["web", "chat"]
k = 100
"#;

fn cwd() -> PathBuf {
    super::paths::absolute(Path::new("."))
}

// ---- errors: one snapshot per kind ----

#[test]
fn toml_syntax_errors() {
    insta::assert_snapshot!(check(
        "[pipeline]\nname = \"x\nk = = 1\n[stages.a]\nkind = source\nv = [1, 2\n",
        &[]
    ));
}

#[test]
fn duplicate_stage() {
    insta::assert_snapshot!(check(
        "[pipeline]\nname = \"x\"\n[stages.a]\nkind = \"sink\"\n[stages.a]\nkind = \"sink\"\n",
        &[]
    ));
}

#[test]
fn duplicate_stage_inline() {
    insta::assert_snapshot!(check(
        "[pipeline]\nname = \"x\"\n[stages]\na = { kind = \"sink\" }\na = { kind = \"sink\" }\n",
        &[]
    ));
}

#[test]
fn duplicate_key() {
    insta::assert_snapshot!(check("[pipeline]\nname = \"x\"\nname = \"y\"\n", &[]));
}

#[test]
fn unknown_top_level_key() {
    insta::assert_snapshot!(check(
        "[pipeline]\nname = \"x\"\n[stage.a]\nkind = \"sink\"\n[train]\nkind = \"train\"\n[other]\n",
        &[]
    ));
}

#[test]
fn unknown_pipeline_key() {
    insta::assert_snapshot!(check("[pipeline]\nname = \"x\"\ndatastor = \"/ds\"\n", &[]));
}

#[test]
fn missing_pipeline_name() {
    insta::assert_snapshot!(check("[pipeline]\ndescription = \"x\"\n", &[]));
}

#[test]
fn missing_pipeline_table() {
    insta::assert_snapshot!(check("[stages.a]\nkind = \"sink\"\n", &[]));
}

#[test]
fn wrong_pipeline_name_type() {
    insta::assert_snapshot!(check("[pipeline]\nname = 3\n", &[]));
}

#[test]
fn bad_pipeline_name() {
    insta::assert_snapshot!(check("[pipeline]\nname = \"../up\"\n", &[]));
}

#[test]
fn bad_stage_names() {
    insta::assert_snapshot!(check(
        "[pipeline]\nname = \"x\"\n[stages.\"..\"]\nkind = \"sink\"\n[stages.\"a/b\"]\nkind = \"sink\"\n[stages.\"/abs\"]\nkind = \"sink\"\n",
        &[]
    ));
}

#[test]
fn missing_kind() {
    insta::assert_snapshot!(check("[pipeline]\nname = \"x\"\n[stages.a]\nlabel = \"x\"\n", &[]));
}

#[test]
fn unknown_kind() {
    insta::assert_snapshot!(check("[pipeline]\nname = \"x\"\n[stages.t]\nkind = \"trian\"\nk = 1\n", &[]));
}

#[test]
fn unknown_param_key() {
    insta::assert_snapshot!(check(
        "[pipeline]\nname = \"x\"\n[stages.s]\nkind = \"source\"\ndata = \"d\"\nseed = 1\nseeed = 2\n",
        &[]
    ));
}

#[test]
fn misspelled_input_is_unknown_field() {
    insta::assert_snapshot!(check(
        "[pipeline]\nname = \"x\"\n[stages.s]\nkind = \"sink\"\nfrmo = \"s\"\n",
        &[]
    ));
}

#[test]
fn unknown_nested_param_key() {
    insta::assert_snapshot!(check(
        "[pipeline]\nname = \"x\"\n[stages.s]\nkind = \"sink\"\nopt = { betta = 1.0 }\n",
        &[]
    ));
}

#[test]
fn wrong_param_type() {
    insta::assert_snapshot!(check(
        "[pipeline]\nname = \"x\"\n[stages.s]\nkind = \"source\"\ndata = \"d\"\nseed = \"one\"\n",
        &[]
    ));
}

#[test]
fn wrong_param_type_in_array() {
    insta::assert_snapshot!(check(
        "[pipeline]\nname = \"x\"\n[stages.s]\nkind = \"sink\"\nlayers = [1, \"two\", 3]\n",
        &[]
    ));
}

#[test]
fn non_finite_param() {
    insta::assert_snapshot!(check(
        "[pipeline]\nname = \"x\"\n[stages.s]\nkind = \"sink\"\nopt = { beta = nan }\n",
        &[]
    ));
}

#[test]
fn missing_param() {
    insta::assert_snapshot!(check(
        "[pipeline]\nname = \"x\"\n[stages.s]\nkind = \"source\"\ndata = \"d\"\n",
        &[]
    ));
}

#[test]
fn failed_check() {
    insta::assert_snapshot!(check(
        "[pipeline]\nname = \"x\"\n[stages.s]\nkind = \"source\"\ndata = \"d\"\nseed = 1\n[stages.t]\nkind = \"train\"\nactivations = \"s\"\nk = 0\n",
        &[]
    ));
}

#[test]
fn failed_check_on_default() {
    // The check is about a value that was not written (k comes from --set here, so point there).
    insta::assert_snapshot!(check(
        "[pipeline]\nname = \"x\"\n[stages.s]\nkind = \"source\"\ndata = \"d\"\nseed = 1\n[stages.t]\nkind = \"train\"\nactivations = \"s\"\n",
        &["stages.t.k=0"]
    ));
}

#[test]
fn missing_required_input() {
    insta::assert_snapshot!(check(
        "[pipeline]\nname = \"x\"\n[stages.s]\nkind = \"source\"\nseed = 1\n[stages.t]\nkind = \"train\"\nk = 1\n",
        &[]
    ));
}

#[test]
fn input_of_wrong_type() {
    insta::assert_snapshot!(check(
        "[pipeline]\nname = \"x\"\n[stages.s]\nkind = \"source\"\ndata = 3\nseed = 1\n[stages.t]\nkind = \"train\"\nactivations = [\"s\", 4]\nk = 1\n[stages.u]\nkind = \"sink\"\nfrom = [\"s\"]\n[stages.v]\nkind = \"train\"\nactivations = []\nk = 1\n",
        &[]
    ));
}

#[test]
fn unknown_referenced_stage() {
    insta::assert_snapshot!(check(
        "[pipeline]\nname = \"x\"\n[stages.source_a]\nkind = \"source\"\ndata = \"d\"\nseed = 1\n[stages.t]\nkind = \"train\"\nactivations = [\"source_a\", \"sourse_a\", \"zzz\"]\nk = 1\n",
        &[]
    ));
}

#[test]
fn wrong_upstream_kind() {
    insta::assert_snapshot!(check(
        "[pipeline]\nname = \"x\"\n[stages.s]\nkind = \"source\"\ndata = \"d\"\nseed = 1\n[stages.c]\nkind = \"sink\"\n[stages.t]\nkind = \"train\"\nactivations = [\"s\", \"c\"]\nk = 1\n",
        &[]
    ));
}

#[test]
fn cycle() {
    insta::assert_snapshot!(check(
        "[pipeline]\nname = \"x\"\n[stages.a]\nkind = \"sink\"\nfrom = \"c\"\n[stages.b]\nkind = \"sink\"\nfrom = \"a\"\n[stages.c]\nkind = \"sink\"\nfrom = \"b\"\n[stages.d]\nkind = \"sink\"\nfrom = \"a\"\n",
        &[]
    ));
}

#[test]
fn self_reference() {
    insta::assert_snapshot!(check(
        "[pipeline]\nname = \"x\"\n[stages.a]\nkind = \"sink\"\nfrom = \"a\"\n",
        &[]
    ));
}

#[test]
fn unset_env_var() {
    insta::assert_snapshot!(check(
        "[pipeline]\nname = \"x\"\ndatastore = \"${SCRATCH}/ds\"\n[stages.s]\nkind = \"source\"\ndata = \"${NOPE}/d.jsonl\"\nseed = 1\n[stages.b]\nkind = \"bundle\"\nfiles = [\"${DATA}/a\", \"${X\"]\n",
        &[]
    ));
}

#[test]
fn set_without_equals() {
    insta::assert_snapshot!(check(GOOD, &["stages.train.k", "stages..k=1"]));
}

#[test]
fn set_into_non_table() {
    insta::assert_snapshot!(check(GOOD, &["stages.train.k.x=1"]));
}

#[test]
fn set_type_error() {
    insta::assert_snapshot!(check(GOOD, &["stages.train.k=many"]));
}

#[test]
fn set_extends() {
    insta::assert_snapshot!(check(GOOD, &["pipeline.extends=other.toml"]));
}

#[test]
fn errors_sorted_and_all_reported() {
    insta::assert_snapshot!(check(
        "[pipeline]\nname = \"x\"\n[stages.z]\nkind = \"nope\"\n[stages.a]\nkind = \"source\"\nseed = \"s\"\ndata = \"d\"\n[stages.m]\nkind = \"train\"\nactivations = \"q\"\nk = 1\n",
        &[]
    ));
}

#[test]
fn stages_not_tables() {
    insta::assert_snapshot!(check("[pipeline]\nname = \"x\"\n[stages]\na = 1\nb = { kind = 2 }\n", &[]));
}

// ---- extends (real files in a temp dir) ----

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new(files: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, text) in files {
            let p = dir.path().join(name);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, text).expect("write");
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn load(&self, name: &str, overrides: &[&str]) -> Result<Pipeline, ConfigErrors> {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        load_with_env(&self.path(name), &overrides, &kinds::registry(), &env)
    }

    /// Rendered errors with the temp dir replaced by `[TMP]`.
    fn check(&self, name: &str) -> String {
        match self.load(name, &[]) {
            Ok(p) => summary(&p),
            Err(e) => e.to_string(),
        }
    }

    fn snapshot(&self, snapshot: &str, name: &str) {
        let tmp = self.dir.path().display().to_string();
        let escaped: String = tmp
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '/' { c.to_string() } else { format!("\\{c}") })
            .collect();
        insta::with_settings!({ filters => vec![(escaped.as_str(), "[TMP]")] }, {
            insta::assert_snapshot!(snapshot, self.check(name));
        });
    }
}

const BASE: &str = r#"
[pipeline]
name = "base"
description = "shared"
datastore = "ds"

[stages.web]
kind = "source"
data = "data/web.jsonl"
seed = 1
n = 7

[stages.out]
kind = "sink"
layers = [1, 2, 3]
opt = { beta = 0.5 }
"#;

#[test]
fn extends_deep_merge() {
    let f = Files::new(&[
        ("shared/base.toml", BASE),
        (
            "p/x.toml",
            "[pipeline]\nname = \"child\"\nextends = \"../shared/base.toml\"\n[stages.web]\nseed = 2\n[stages.out]\nlayers = [9]\n[stages.train]\nkind = \"train\"\nactivations = \"web\"\nk = 3\n",
        ),
    ]);
    let p = f.load("p/x.toml", &[]).expect("valid");
    assert_eq!(p.name, "child");
    assert_eq!(p.description, "shared");
    assert_eq!(p.files, [f.path("p/x.toml"), f.path("p/../shared/base.toml")]);
    assert_eq!(p.file, f.path("p/x.toml"));
    // The base's relative paths resolve against the base's directory.
    assert_eq!(p.datastore, Some(f.path("p/../shared/ds")));
    let web = p.stage("web").expect("web");
    assert_eq!(web.external[0].paths, [f.path("p/../shared/data/web.jsonl")]);
    assert_eq!(web.params.to_string(), "{n = 7, seed = 2}");
    // Arrays replace, tables merge.
    assert_eq!(
        p.stage("out").expect("out").params.to_string(),
        "{label = \"\", layers = [9], opt = {beta = 0.5}}"
    );
    assert_eq!(p.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["out", "web", "train"]);
    // The effective document is merged, without `extends`, paths resolved.
    let eff = &p.effective;
    assert!(eff["pipeline"].get("extends").is_none());
    assert_eq!(eff["stages"]["out"]["layers"], toml::Value::Array(vec![toml::Value::Integer(9)]));
    assert_eq!(
        eff["stages"]["web"]["data"].as_str(),
        Some(f.path("p/../shared/data/web.jsonl").to_str().expect("utf-8"))
    );
}

#[test]
fn extends_chain_and_absolute() {
    let f = Files::new(&[
        ("a.toml", "[pipeline]\nname = \"a\"\n[stages.s]\nkind = \"sink\"\nlabel = \"a\"\n"),
        ("b.toml", "[pipeline]\nname = \"b\"\nextends = \"a.toml\"\n[stages.s]\nlabel = \"b\"\n"),
    ]);
    let abs_b = f.path("b.toml").display().to_string();
    std::fs::write(f.path("c.toml"), format!("[pipeline]\nextends = \"{abs_b}\"\n")).expect("write");
    let p = f.load("c.toml", &[]).expect("valid");
    assert_eq!(p.name, "b");
    assert_eq!(p.files, [f.path("c.toml"), f.path("b.toml"), f.path("a.toml")]);
    assert_eq!(p.stage("s").expect("s").params.get("label"), Some(&Canon::Str("b".into())));
}

#[test]
fn extends_file_missing() {
    Files::new(&[("x.toml", "[pipeline]\nname = \"x\"\nextends = \"nope.toml\"\n")])
        .snapshot("extends_file_missing", "x.toml");
}

#[test]
fn extends_cycle() {
    Files::new(&[
        ("x.toml", "[pipeline]\nname = \"x\"\nextends = \"b/y.toml\"\n"),
        ("b/y.toml", "[pipeline]\nextends = \"../x.toml\"\n"),
    ])
    .snapshot("extends_cycle", "x.toml");
}

#[test]
fn extends_itself() {
    Files::new(&[("x.toml", "[pipeline]\nname = \"x\"\nextends = \"./x.toml\"\n")])
        .snapshot("extends_itself", "x.toml");
}

#[test]
fn error_in_extended_file() {
    Files::new(&[
        ("base.toml", "[pipeline]\nname = \"base\"\n[stages.s]\nkind = \"source\"\ndata = \"d\"\nseed = -1\n[stages.t]\nkind = \"trian\"\n"),
        ("x.toml", "[pipeline]\nname = \"x\"\nextends = \"base.toml\"\n[stages.u]\nkind = \"sink\"\nfrom = \"s\"\nlabel = 1\n"),
    ])
    .snapshot("error_in_extended_file", "x.toml");
}

#[test]
fn syntax_error_in_extended_file() {
    Files::new(&[
        ("base.toml", "[pipeline\nname = \"base\"\n"),
        ("x.toml", "[pipeline]\nname = \"x\"\nextends = \"base.toml\"\nbad = \n"),
    ])
    .snapshot("syntax_error_in_extended_file", "x.toml");
}

#[test]
fn extends_env_and_type() {
    insta::assert_snapshot!(check("[pipeline]\nname = \"x\"\nextends = \"${NOPE}/b.toml\"\n", &[]));
    insta::assert_snapshot!(check("[pipeline]\nname = \"x\"\nextends = [\"b.toml\"]\n", &[]));
}

#[test]
fn pipeline_file_missing() {
    let f = Files::new(&[]);
    let e = f.load("nope.toml", &[]).expect_err("missing");
    assert_eq!(e.len(), 1);
    let text = e.to_string();
    assert!(text.starts_with("error: cannot read pipeline file `"), "{text}");
    assert!(text.contains("nope.toml:1:1"), "{text}");
}

// ---- overrides ----

#[test]
fn set_parses_toml_values() {
    let p = ok(
        GOOD,
        &[
            "stages.train.k=64",
            "stages.train.lr = 1e-2",
            "stages.out.kind=\"sink\"",
            "stages.out.layers=[4, 5]",
            "stages.out.opt={beta=2.0}",
            "stages.out.label=hello world",
            "stages.'odd.name'.kind=sink",
        ],
    );
    assert_eq!(p.stage("train").expect("train").params.to_string(), "{k = 64, lr = 0.01}");
    assert_eq!(
        p.stage("out").expect("out").params.to_string(),
        "{label = \"hello world\", layers = [4, 5], opt = {beta = 2.0}}"
    );
    assert!(p.stage("odd.name").is_some());
    assert_eq!(p.effective["stages"]["train"]["k"], toml::Value::Integer(64));
}

#[test]
fn set_path_is_plain_string_relative_to_cwd() {
    let p = ok(GOOD, &["stages.web.data=/data/x", "stages.chat.data=rel/c.jsonl"]);
    assert_eq!(p.stage("web").expect("web").external[0].paths, [PathBuf::from("/data/x")]);
    assert_eq!(p.stage("chat").expect("chat").external[0].paths, [cwd().join("rel/c.jsonl")]);
    let at = &p.stage("web").expect("web").external[0].at;
    assert_eq!(at.to_string(), "--set:1:17");
}

#[test]
fn set_later_wins() {
    let p = ok(GOOD, &["stages.train.k=1", "stages.train.k=2"]);
    assert_eq!(p.stage("train").expect("train").params.get("k"), Some(&Canon::Int(2)));
}

// ---- paths and environment ----

#[test]
fn env_expansion_in_path_fields_only() {
    let p = ok(
        "[pipeline]\nname = \"x\"\ndatastore = \"~/ds\"\n[stages.s]\nkind = \"source\"\ndata = \"${DATA}/web-${MODELS}.jsonl\"\nseed = 1\n[stages.o]\nkind = \"sink\"\nlabel = \"${DATA} ~/x\"\n[stages.b]\nkind = \"bundle\"\nfiles = [\"a\", \"${MODELS}/b\"]\nreadme = \"~\"\n",
        &[],
    );
    assert_eq!(p.datastore, Some(PathBuf::from("/home/u/ds")));
    assert_eq!(p.stage("s").expect("s").external[0].paths, [PathBuf::from("/data/web-/models.jsonl")]);
    assert_eq!(p.stage("o").expect("o").params.get("label"), Some(&Canon::Str("${DATA} ~/x".into())));
    let b = p.stage("b").expect("b");
    assert_eq!(b.external.len(), 2);
    assert_eq!(b.external[0].role, "files");
    assert_eq!(b.external[0].paths, [cwd().join("pipelines/a"), PathBuf::from("/models/b")]);
    assert_eq!(b.external[1].role, "readme");
    assert_eq!(b.external[1].paths, [PathBuf::from("/home/u")]);
    assert_eq!(b.external[1].at.to_string(), "pipelines/x.toml:14:10");
    assert_eq!(p.effective["stages"]["o"]["label"].as_str(), Some("${DATA} ~/x"));
    assert_eq!(p.effective["pipeline"]["datastore"].as_str(), Some("/home/u/ds"));
}

#[test]
fn relative_paths_resolve_against_the_file() {
    let p = ok(
        "[pipeline]\nname = \"x\"\ndatastore = \"../ds\"\n[stages.s]\nkind = \"source\"\ndata = \"./d/x.jsonl\"\nseed = 1\n",
        &[],
    );
    assert_eq!(p.datastore, Some(cwd().join("pipelines/../ds")));
    assert_eq!(p.stage("s").expect("s").external[0].paths, [cwd().join("pipelines/d/x.jsonl")]);
    assert_eq!(p.file, cwd().join(FILE));
    assert_eq!(p.files, [cwd().join(FILE)]);
}

// ---- references (path inputs with a resolver) ----

/// A temp dir with a pipeline folder `p/` and a reference cache `refs/` holding `org--model`.
fn refs_files(extra: &[(&str, &str)]) -> Files {
    let mut files = vec![("refs/org--model/config.json", "{}"), ("refs/org--data/a.jsonl", "")];
    files.extend_from_slice(extra);
    Files::new(&files)
}

fn load_refs(f: &Files, text: &str, overrides: &[&str]) -> Result<Pipeline, ConfigErrors> {
    let refs = f.path("refs").display().to_string();
    let env = move |k: &str| if k == "REFS" { Some(refs.clone()) } else { env(k) };
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    std::fs::write(f.path("p/x.toml"), text).expect("write");
    load_with_env(&f.path("p/x.toml"), &overrides, &kinds::with_refs(), &env)
}

const REFS: &str =
    "[pipeline]\nname = \"x\"\n[stages.m]\nkind = \"model\"\nbase = \"org/model\"\nextra = \"org/data\"\n";

#[test]
fn references_resolve_to_the_resolvers_path() {
    let f = refs_files(&[("p/local/m/config.json", "{}")]);
    let text = "[pipeline]\nname = \"x\"\n[stages.m]\nkind = \"model\"\nbase = \"org/model\"\nextra = [\"ref:org/data\", \"local/m\", \"${DATA}/x\", \"a/b/c\"]\n";
    let p = load_refs(&f, text, &[]).unwrap_or_else(|e| panic!("{e}"));
    let m = p.stage("m").expect("m");
    assert_eq!(m.external[0].paths, [f.path("refs/org--model")]);
    assert_eq!(
        m.external[1].paths,
        [
            f.path("refs/org--data"),
            f.path("p/local/m"),
            // Not references: paths, as without a resolver (missing files are the planner's).
            PathBuf::from("/data/x"),
            f.path("p/a/b/c"),
        ]
    );
    // The effective document shows what the references resolved to.
    let eff = &p.effective["stages"]["m"];
    assert_eq!(eff["base"].as_str(), f.path("refs/org--model").to_str());
    assert_eq!(eff["extra"][0].as_str(), f.path("refs/org--data").to_str());
    // `--set` values are references too.
    let p = load_refs(&f, REFS, &["stages.m.base=org/data"]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.stage("m").expect("m").external[0].paths, [f.path("refs/org--data")]);
}

#[test]
fn local_path_named_like_a_reference_wins() {
    let f = refs_files(&[("p/org/model/config.json", "{}"), ("p/ref:org/model/config.json", "{}")]);
    let p = load_refs(&f, REFS, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.stage("m").expect("m").external[0].paths, [f.path("p/org/model")]);
    // An explicit scheme skips the local check.
    let text = REFS.replace("\"org/model\"", "\"ref:org/model\"");
    let p = load_refs(&f, &text, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.stage("m").expect("m").external[0].paths, [f.path("refs/org--model")]);
}

#[test]
fn reference_errors() {
    let refs = |k: &str| if k == "REFS" { Some("/refs".to_string()) } else { env(k) };
    let e = load_str(
        Path::new(FILE),
        "[pipeline]\nname = \"x\"\n[stages.m]\nkind = \"model\"\nbase = \"org/nope\"\nextra = [\"/abs\", \"ref:nope\"]\n",
        &[],
        &kinds::with_refs(),
        &refs,
    )
    .expect_err("unresolvable");
    let cwd = cwd().display().to_string();
    insta::with_settings!({ filters => vec![(cwd.as_str(), "[CWD]")] }, {
        insta::assert_snapshot!(e.to_string());
    });
}

#[test]
fn a_repeated_error_is_shown_once_with_its_other_places() {
    let refs = |k: &str| if k == "REFS" { Some("/refs".to_string()) } else { env(k) };
    let stage = |name: &str, base: &str, extra: &str| {
        format!("[stages.{name}]\nkind = \"model\"\nbase = \"{base}\"\nextra = \"{extra}\"\n")
    };
    let text = format!(
        "[pipeline]\nname = \"x\"\n{}{}{}",
        stage("a", "org/nope", "org/other"),
        stage("b", "org/nope", "org/other"),
        stage("c", "org/other", "org/nope")
    );
    let e = load_str(Path::new(FILE), &text, &[], &kinds::with_refs(), &refs).expect_err("unresolvable");
    let out = e.to_string();
    assert_eq!(e.len(), 6, "every place is still an error of its own: {out}");
    assert_eq!(out.matches("`org/nope` is neither").count(), 1, "{out}");
    assert_eq!(out.matches("`org/other` is neither").count(), 1, "{out}");
    assert!(
        out.contains(
            "note: the same at stages.b.base (pipelines/x.toml:9:8), stages.c.extra (pipelines/x.toml:14:9)"
        ),
        "{out}"
    );
    assert!(
        out.contains(
            "note: the same at stages.b.extra (pipelines/x.toml:10:9), stages.c.base (pipelines/x.toml:13:8)"
        ),
        "{out}"
    );
    assert!(out.ends_with("error: 6 errors in pipelines/x.toml (2 distinct)"), "{out}");
}

// ---- values ----

#[test]
fn defaults_filled() {
    let a = ok(GOOD, &[]);
    let b = ok(&GOOD.replace("seed = 1", "seed = 1\nn = 10").replace("k = 100", "k = 100\nlr = 0.001"), &[]);
    let strip = |p: &Pipeline| -> Vec<_> {
        p.stages.iter().map(|s| (s.name.clone(), s.params.clone(), s.inputs.clone())).collect()
    };
    assert_eq!(strip(&a), strip(&b));
    assert_eq!(a.stage("web").expect("web").params.to_string(), "{n = 10, seed = 1}");
}

#[test]
fn key_order_irrelevant() {
    let a = ok(GOOD, &[]);
    let b = ok(
        r#"
[stages.train]
k = 100
activations = ["web", "chat"]
kind = "train"

[stages.chat]
n = 5
seed = 2
data = "/data/chat.jsonl"
kind = "source"

[pipeline]
name = "tiny"

[stages.web]
seed = 1
kind = "source"
data = "/data/web.jsonl"
"#,
        &[],
    );
    assert_eq!(
        a.stages.iter().map(|s| (&s.name, &s.params, &s.inputs)).collect::<Vec<_>>(),
        b.stages.iter().map(|s| (&s.name, &s.params, &s.inputs)).collect::<Vec<_>>()
    );
    assert_eq!(a.effective, b.effective);
}

#[test]
fn inputs_keep_written_order() {
    let p = ok(&GOOD.replace("[\"web\", \"chat\"]", "[\"web\", \"chat\", \"web\"]"), &[]);
    assert_eq!(
        p.stage("train").expect("train").inputs,
        [("activations".to_string(), vec!["web".to_string(), "chat".into(), "web".into()])]
    );
}

#[test]
fn topological_order_deterministic() {
    insta::assert_snapshot!(check(
        "[pipeline]\nname = \"x\"\n[stages.z]\nkind = \"source\"\ndata = \"/d\"\nseed = 1\n[stages.a]\nkind = \"train\"\nactivations = [\"z\", \"m\"]\nk = 1\n[stages.m]\nkind = \"source\"\ndata = \"/d\"\nseed = 1\n[stages.b]\nkind = \"sink\"\nfrom = \"a\"\n[stages.c]\nkind = \"sink\"\n[stages.inline]\nkind = \"sink\"\nfrom = \"c\"\n",
        &[]
    ), @r#"
    pipeline x
    c (sink) {label = "", layers = [], opt = {beta = 0.0}}
    inline (sink) {label = "", layers = [], opt = {beta = 0.0}} from<-c
    m (source) {n = 10, seed = 1} data=/d
    z (source) {n = 10, seed = 1} data=/d
    a (train) {k = 1, lr = 0.001} activations<-z,m
    b (sink) {label = "", layers = [], opt = {beta = 0.0}} from<-a
    "#);
}

#[test]
fn stage_location_and_description() {
    let p = ok(&GOOD.replace("name = \"tiny\"", "name = \"tiny\"\ndescription = \"d\""), &[]);
    assert_eq!(p.description, "d");
    assert_eq!(p.stage("train").expect("train").at.to_string(), "pipelines/x.toml:17:9");
    assert_eq!(ok(GOOD, &[]).description, "");
}

#[test]
fn empty_pipeline_is_valid() {
    assert_eq!(check("[pipeline]\nname = \"x\"\n", &[]), "pipeline x");
}

#[test]
fn schema_comment_and_inline_stages() {
    let p = ok(
        "#:schema ../schemas/pipeline.schema.json\n[pipeline]\nname = \"x\"\n[stages]\na = { kind = \"sink\" }\nb = { kind = \"sink\", from = \"a\" }\n",
        &[],
    );
    assert_eq!(p.stages.len(), 2);
    assert_eq!(p.stage("b").expect("b").at.to_string(), "pipelines/x.toml:6:1");
}

#[test]
fn error_fields() {
    let e = load("[pipeline]\nname = \"x\"\n[stages.t]\nkind = \"trian\"\n", &[]).expect_err("invalid");
    assert_eq!(e.len(), 1);
    let err = &e.errors()[0];
    assert_eq!((err.file.as_path(), err.line, err.col), (Path::new(FILE), 4, 8));
    assert_eq!(err.key_path, "stages.t.kind");
    assert_eq!(err.message, "unknown stage kind `trian`");
    assert_eq!(err.location(), "pipelines/x.toml:4:8");
}

/// Arbitrary text and overrides never panic, and every error renders.
#[test]
fn garbage_never_panics() {
    let inputs = [
        "",
        "\u{feff}",
        "=",
        "[",
        "[[stages]]\n[[stages]]",
        "[pipeline]\nname=\"x\"\n[[stages.a]]\nkind=\"sink\"",
        "pipeline = 1\nstages = []",
        "[pipeline]\nname = \"é\"\n[stages.\"é\"]\nkind = \"sink\"\nfrom = \"\u{1F600}\"",
        "a = \"\\u{0}\"\nb = 1979-05-27T07:32:00Z\nc = inf\nd = nan\ne = 0xffffffffffffffffff",
        "[pipeline]\nname = \"x\"\n[stages.s]\nkind = \"sink\"\nopt = { beta = nan }",
        "[pipeline]\nname = \"x\"\n[stages.s]\nkind = \"sink\"\nlayers = [99999999999]",
        "[pipeline]\nname = \"x\"\n[stages.s]\nkind = \"sink\"\nlabel = 1979-05-27",
        "\n\n\n\"unterminated",
        "x = [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
        "[pipeline]\nname=\"x\"\n[stages.s]\nkind=\"bundle\"\nfiles=\"${\"",
        "[a.b.c]\n[a]\nb = 1",
        "\r\n\r\n[pipeline\r\n",
        "[pipeline]\nname = \"x\"\nextends = \"\"\n",
    ];
    let overrides: [&[&str]; 6] = [
        &[],
        &["="],
        &["\"", "'", "a.'b", "a.\"b\\\"=1"],
        &["stages.s=1", "pipeline=2", "stages.s.kind.x=3"],
        &["x.y.z=[1,", "stages.\u{e9}=1", "stages.a.b=\n"],
        &["pipeline.name=é", "stages.new.kind=\"sink\"", "stages.new.from=new"],
    ];
    let deep = "a = ".to_string() + &"[".repeat(2000) + &"]".repeat(2000);
    let long_line = format!("[pipeline]\nname = \"{}\"", "x".repeat(500));
    let mut all: Vec<&str> = inputs.to_vec();
    all.push(&deep);
    all.push(&long_line);
    for text in &all {
        for o in &overrides {
            if let Err(e) = load(text, o) {
                assert!(!e.is_empty());
                for err in &e {
                    assert!(!err.render().is_empty());
                }
                let _ = e.to_string();
            }
        }
    }
}

/// Pseudo-random token soup (deterministic) never panics. `PIPE_FUZZ_ITERS` runs more rounds.
#[test]
fn random_inputs_never_panic() {
    const TOKENS: &[&str] = &[
        "[pipeline]",
        "[stages.a]",
        "[stages.b]",
        "[[stages]]",
        "[stages]",
        "\n",
        "\n",
        " ",
        "=",
        ".",
        "\"",
        "'",
        "name",
        "kind",
        "\"sink\"",
        "\"source\"",
        "\"train\"",
        "from",
        "activations",
        "data",
        "seed",
        "k",
        "opt",
        "{",
        "}",
        "[",
        "]",
        ",",
        "1",
        "-1",
        "0x7f",
        "1e400",
        "nan",
        "\"a\"",
        "\"b\"",
        "\"${X}\"",
        "\"${DATA}\"",
        "\"~/x\"",
        "extends",
        "\"x.toml\"",
        "datastore",
        "#",
        "\"\"\"",
        "é",
        "\u{1F600}",
        "\r",
        "\t",
        "\\",
        "true",
        "1979-05-27",
    ];
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let iters: usize = std::env::var("PIPE_FUZZ_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(2000);
    for _ in 0..iters {
        let n = (next() % 40) as usize;
        let text: String = (0..n).map(|_| TOKENS[(next() % TOKENS.len() as u64) as usize]).collect();
        let m = (next() % 3) as usize;
        let overrides: Vec<String> = (0..m)
            .map(|_| (0..(next() % 6)).map(|_| TOKENS[(next() % TOKENS.len() as u64) as usize]).collect())
            .collect();
        let overrides: Vec<&str> = overrides.iter().map(String::as_str).collect();
        if let Err(e) = load(&text, &overrides) {
            let _ = e.to_string();
        }
        let valid = format!("[pipeline]\nname = \"x\"\n{text}");
        if let Err(e) = load(&valid, &overrides) {
            let _ = e.to_string();
        }
    }
}
/// Deep nesting, thousands of errors and very deep override keys: no stack overflow, and (by
/// the windowed rendering and line index) no quadratic blow-up.
#[test]
fn pathological_inputs() {
    let n = 5000;
    let cases = [
        "a = ".to_string() + &"[".repeat(n) + &"]".repeat(n),
        "a = ".to_string() + &"{b=".repeat(n) + "1" + &"}".repeat(n),
        "[".to_string() + &"a.".repeat(n) + "b]",
        "x=1\n".repeat(n),
        "[pipeline]\nname=\"x\"\n".to_string() + &"[stages.a]\n".repeat(n),
    ];
    for text in &cases {
        let e = load(text, &[]).expect_err("invalid");
        assert!(e.to_string().lines().count() < 2000);
    }
    let deep = "a.".repeat(n) + "b=1";
    let e = load("", &[&deep]).expect_err("invalid");
    assert!(e.to_string().contains("nested more than 32 levels"), "{e}");
}

#[test]
fn executor_slurm_table() {
    let base = "[pipeline]\nname = \"x\"\n[stages.a]\nkind = \"sink\"\n";
    let p = ok(
        &format!(
            "{base}[executor.slurm]\npartition = \"gpu\"\nsbatch_args = [\"--qos=high\"]\n\
             [executor.slurm.stages.a]\ntime = \"1:00:00\"\n"
        ),
        &[],
    );
    let s = &p.executor.slurm;
    assert_eq!(s.partition.as_deref(), Some("gpu"));
    assert_eq!(s.sbatch_args, ["--qos=high"]);
    assert_eq!(s.stages["a"].time.as_deref(), Some("1:00:00"));
    assert_eq!((s.max_retries, s.array_size, s.gpus_per_job), (2, 8, 1), "defaults");
    // --set reaches it too, and none of it enters a key: a stage's params are untouched.
    let q = ok(base, &["executor.slurm.partition=cpu"]);
    assert_eq!(q.executor.slurm.partition.as_deref(), Some("cpu"));
    assert_eq!(q.stages[0].params, ok(base, &[]).stages[0].params);

    let e = check(&format!("{base}[executor.slurm]\npartitoin = \"gpu\"\n"), &[]);
    assert!(e.contains("unknown key `partitoin` in `[executor.slurm]`"), "{e}");
    assert!(e.contains("pipelines/x.toml:6:1"), "names the line: {e}");
    let e = check(&format!("{base}[executor.slurm.stages.b]\ntime = \"1:00:00\"\n"), &[]);
    assert!(e.contains("no stage `b` in this pipeline (stages: a)"), "{e}");
    let e = check(&format!("{base}[executor.slurm]\narray_size = 0\n"), &[]);
    assert!(e.contains("`array_size` must be at least 1"), "{e}");
    let e = check(&format!("{base}[executor]\nlocal = true\n"), &[]);
    assert!(e.contains("unknown key `local` in `[executor]`"), "{e}");
}
