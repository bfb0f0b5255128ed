//! Planning: the key of every stage (a Merkle hash over upstream keys and external content), its
//! state in the store, and what `pipe run` would do with it and why.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

use crate::config::Pipeline;
use crate::hash::HashError;
use crate::key::{self, Canon, Key, PreImage};
use crate::stage::Registry;
use crate::store::{Object, Partial, StageRecord, Store, StoreError};

/// Where a stage's key stands in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Published: a run skips it.
    Cached,
    /// An unfinished attempt left a work dir: a run resumes it.
    Partial,
    /// Never produced, and no earlier run of this pipeline produced this stage.
    Missing,
    /// An earlier run produced this stage, but with another key: parameters, inputs or the
    /// stage version changed since.
    Stale,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Cached => "cached",
            State::Partial => "partial",
            State::Missing => "missing",
            State::Stale => "stale",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Skip,
    Run,
    Resume,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Skip => "skip",
            Action::Run => "run",
            Action::Resume => "resume",
        }
    }
}

/// The plan for one stage.
#[derive(Clone, Debug)]
pub struct StagePlan {
    pub name: String,
    pub kind: String,
    pub key: Key,
    pub preimage: PreImage,
    /// All parameters, [`Stage::UNKEYED`](crate::stage::Stage::UNKEYED) ones included: what `run`
    /// is given. The key's pre-image holds the rest.
    pub run_params: Canon,
    pub state: State,
    pub action: Action,
    pub reasons: Vec<String>,
    pub object: Option<Object>,
    pub partial: Option<Partial>,
    /// The key this stage had in the latest earlier run of this pipeline, if different.
    pub previous_key: Option<Key>,
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub pipeline: String,
    pub stages: Vec<StagePlan>,
    /// External files read (not answered by the memo) while computing keys.
    pub files_hashed: u64,
    pub bytes_hashed: u64,
}

impl Plan {
    pub fn stage(&self, name: &str) -> Option<&StagePlan> {
        self.stages.iter().find(|s| s.name == name)
    }
}

/// Errors that stop planning: an external input that cannot be read, or the store.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Inputs(Vec<InputError>),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An external input of a stage that could not be hashed (missing model file, unreadable folder).
#[derive(Debug)]
pub struct InputError {
    pub stage: String,
    pub role: String,
    pub at: String,
    pub path: PathBuf,
    pub error: HashError,
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cause = match &self.error {
            HashError::Io { source, .. } => source.to_string(),
            e => e.to_string(),
        };
        write!(
            f,
            "error: stage `{}`: input `{}` ({}): cannot read {}: {cause}",
            self.stage,
            self.role,
            self.at,
            self.path.display()
        )
    }
}

/// Options that change actions, not keys.
#[derive(Clone, Debug, Default)]
pub struct PlanOptions {
    /// Stages to recompute even when cached.
    pub force: BTreeSet<String>,
}

/// Computes every stage's key (hashing external inputs through the store's memo), looks up the
/// store and the pipeline's latest run record, and decides skip / run / resume with reasons.
pub fn plan(p: &Pipeline, registry: &Registry, store: &Store, opts: &PlanOptions) -> Result<Plan, PlanError> {
    let hasher = store.hasher();
    let mut keys: BTreeMap<&str, Key> = BTreeMap::new();
    let mut errors = Vec::new();
    let mut preimages = Vec::new();
    // Hash every external input first (errors for all of them, not just the first).
    let mut external: BTreeMap<(&str, &str), Vec<Key>> = BTreeMap::new();
    for s in &p.stages {
        for ext in &s.external {
            let mut hashes = Vec::new();
            for path in &ext.paths {
                match hasher.hash_path(path) {
                    Ok(h) => hashes.push(h),
                    Err(error) => errors.push(InputError {
                        stage: s.name.clone(),
                        role: ext.role.clone(),
                        at: ext.at.to_string(),
                        path: path.clone(),
                        error,
                    }),
                }
            }
            external.insert((s.name.as_str(), ext.role.as_str()), hashes);
        }
    }
    if !errors.is_empty() {
        return Err(PlanError::Inputs(errors));
    }
    for s in &p.stages {
        let kind = registry.get(&s.kind);
        let version = kind.map(|k| k.version()).unwrap_or(0);
        let unkeyed = kind.map(|k| k.unkeyed()).unwrap_or_default();
        let pre = PreImage {
            kind: s.kind.clone(),
            version,
            params: s.params.without(unkeyed),
            inputs: s
                .inputs
                .iter()
                .map(|(role, ups)| {
                    (role.clone(), ups.iter().filter_map(|u| keys.get(u.as_str()).copied()).collect())
                })
                .collect(),
            external: s
                .external
                .iter()
                .map(|e| {
                    (e.role.clone(), external.remove(&(s.name.as_str(), e.role.as_str())).unwrap_or_default())
                })
                .collect(),
        };
        keys.insert(&s.name, pre.key());
        preimages.push(pre);
    }

    let latest = latest_records(store, p);
    let name_of: BTreeMap<Key, &str> = keys.iter().map(|(n, k)| (*k, *n)).collect();
    let mut stages = Vec::new();
    for (s, pre) in p.stages.iter().zip(preimages) {
        let key = pre.key();
        let object = store.lookup(&s.kind, &key)?;
        let partial = if object.is_none() { store.partial(&s.kind, &key) } else { None };
        let prev = latest.get(s.name.as_str());
        let prev_key = prev.and_then(|r| Key::parse(&r.key)).filter(|k| *k != key);
        let state = if object.is_some() {
            State::Cached
        } else if partial.is_some() {
            State::Partial
        } else if prev_key.is_some() {
            State::Stale
        } else {
            State::Missing
        };
        let forced = opts.force.contains(&s.name);
        let mut reasons = Vec::new();
        let action = if forced {
            reasons.push("forced with --force".to_string());
            Action::Run
        } else if let Some(obj) = &object {
            reasons.push(format!("cached since {} ({})", obj.manifest.finished, obj.manifest.produced_by));
            Action::Skip
        } else if let Some(part) = &partial {
            reasons.push(match &part.progress {
                Some(pr) if pr.total.is_some() || pr.done > 0 => format!(
                    "resuming an interrupted attempt at {}{} {}",
                    pr.done,
                    pr.total.map(|t| format!("/{t}")).unwrap_or_default(),
                    pr.unit
                ),
                _ => "resuming an interrupted attempt".to_string(),
            });
            Action::Resume
        } else {
            match prev.and_then(|r| PreImage::from_json(&r.preimage)) {
                Some(old) if old.key() != key => reasons.extend(explain(&old, &pre, &name_of, s)),
                Some(_) => {
                    reasons.push("its output is gone from the datastore (gc'd or never finished)".into())
                }
                None => reasons.push(format!("no output with this key yet (first run of `{}`)", s.name)),
            }
            Action::Run
        };
        stages.push(StagePlan {
            name: s.name.clone(),
            kind: s.kind.clone(),
            key,
            preimage: pre,
            run_params: s.params.clone(),
            state,
            action,
            reasons,
            object,
            partial,
            previous_key: prev_key,
        });
    }
    Ok(Plan {
        pipeline: p.name.clone(),
        stages,
        files_hashed: hasher.stats.files_read.load(std::sync::atomic::Ordering::Relaxed),
        bytes_hashed: hasher.stats.bytes_read.load(std::sync::atomic::Ordering::Relaxed),
    })
}

/// The newest completed record of each stage of `p` across the pipeline's runs, reading records
/// newest first and stopping once every stage is found.
fn latest_records(store: &Store, p: &Pipeline) -> BTreeMap<String, StageRecord> {
    let mut out = BTreeMap::new();
    for run in store.runs_newest_first(&p.name) {
        for (name, st) in run.stages {
            if matches!(st.state.as_str(), "done" | "cached") && p.stage(&name).is_some() {
                out.entry(name).or_insert(st);
            }
        }
        if out.len() == p.stages.len() {
            break;
        }
    }
    out
}

/// Why `new` differs from `old`, in the user's terms: parameter paths, upstream stages, input
/// files, the stage version.
pub fn explain(
    old: &PreImage,
    new: &PreImage,
    name_of: &BTreeMap<Key, &str>,
    stage: &crate::config::StageDecl,
) -> Vec<String> {
    let mut out = Vec::new();
    if old.kind != new.kind {
        out.push(format!("kind changed: {} -> {}", old.kind, new.kind));
    }
    if old.version != new.version {
        out.push(format!("stage version of `{}` changed: {} -> {}", new.kind, old.version, new.version));
    }
    for c in key::diff(&old.params, &new.params) {
        out.push(format!("parameter {c}"));
    }
    let roles = |l: &[(String, Vec<Key>)]| -> BTreeMap<String, Vec<Key>> { l.iter().cloned().collect() };
    let (oi, ni) = (roles(&old.inputs), roles(&new.inputs));
    for (role, nk) in &ni {
        match oi.get(role) {
            Some(ok) if ok == nk => {}
            Some(ok) if ok.len() == nk.len() => {
                for (o, n) in ok.iter().zip(nk) {
                    if o != n {
                        let who = name_of.get(n).copied().unwrap_or("?");
                        out.push(format!("upstream `{who}` (input `{role}`) changed"));
                    }
                }
            }
            Some(_) => out.push(format!("input `{role}` now names other stages")),
            None => out.push(format!("input `{role}` added")),
        }
    }
    for role in oi.keys().filter(|r| !ni.contains_key(*r)) {
        out.push(format!("input `{role}` removed"));
    }
    let (oe, ne) = (roles(&old.external), roles(&new.external));
    for (role, nk) in &ne {
        if oe.get(role) != Some(nk) {
            let paths = stage
                .external
                .iter()
                .find(|e| &e.role == role)
                .map(|e| e.paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            out.push(format!("content of input `{role}` changed ({paths})"));
        }
    }
    for role in oe.keys().filter(|r| !ne.contains_key(*r)) {
        out.push(format!("input `{role}` removed"));
    }
    if out.is_empty() {
        out.push("key format changed".into());
    }
    out
}

/// A two-stage pipeline and a datastore for the engine's tests (plan, report, report_html).
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::tests::kinds;
    use crate::exec::{RunOptions, run};

    /// `web` (a source reading `web.bin`) and `train` reading `web`.
    pub(crate) const TEXT: &str = r#"
[pipeline]
name = "p"
[stages.web]
kind = "source"
data = "web.bin"
seed = 1
[stages.train]
kind = "train"
activations = ["web"]
k = 4
"#;

    /// A temporary folder with `web.bin`, a datastore in it, and the engine-test kinds.
    pub(crate) struct Fixture {
        pub dir: tempfile::TempDir,
        pub store: Store,
        pub registry: Registry,
    }

    impl Fixture {
        pub fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("web.bin"), b"tokens").unwrap();
            let store = Store::open(&dir.path().join("ds")).unwrap();
            Self { dir, store, registry: kinds::registry() }
        }
        fn load(&self, overrides: &[&str]) -> Pipeline {
            self.load_as("p", overrides)
        }
        /// [`TEXT`] as `<file>.toml` in the folder, with `--set` overrides.
        pub fn load_as(&self, file: &str, overrides: &[&str]) -> Pipeline {
            let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
            let env = |_: &str| None;
            let path = self.dir.path().join(format!("{file}.toml"));
            crate::config::load_str(&path, TEXT, &o, &self.registry, &env).unwrap()
        }
        /// (name, state, action, reasons) per stage.
        fn plan(&self, overrides: &[&str]) -> Vec<(String, &'static str, &'static str, Vec<String>)> {
            let p =
                plan(&self.load(overrides), &self.registry, &self.store, &PlanOptions::default()).unwrap();
            p.stages.into_iter().map(|s| (s.name, s.state.as_str(), s.action.as_str(), s.reasons)).collect()
        }
        fn run(&self, overrides: &[&str]) {
            let p = self.load(overrides);
            let pl = plan(&p, &self.registry, &self.store, &PlanOptions::default()).unwrap();
            assert!(run(&p, &self.registry, &self.store, &pl, &RunOptions::default()).unwrap().ok());
        }
    }

    #[test]
    fn first_plan_runs_everything() {
        let f = Fixture::new();
        let p = f.plan(&[]);
        assert_eq!(p[0].1, "missing");
        assert_eq!(p[0].2, "run");
        assert_eq!(p[0].3, ["no output with this key yet (first run of `web`)"]);
    }

    #[test]
    fn a_changed_parameter_is_explained_by_path_and_descendants_by_upstream() {
        let f = Fixture::new();
        f.run(&[]);
        assert!(f.plan(&[]).iter().all(|s| s.1 == "cached" && s.2 == "skip"));
        let p = f.plan(&["stages.train.k=8"]);
        assert_eq!((p[0].1, p[0].2), ("cached", "skip"));
        assert_eq!((p[1].1, p[1].2), ("stale", "run"));
        assert_eq!(p[1].3, ["parameter k: 4 -> 8"]);
        let p = f.plan(&["stages.web.seed=3"]);
        assert_eq!(p[0].3, ["parameter seed: 1 -> 3"]);
        assert_eq!(p[1].3, ["upstream `web` (input `activations`) changed"]);
    }

    #[test]
    fn a_changed_input_file_is_named() {
        let f = Fixture::new();
        f.run(&[]);
        std::fs::write(f.dir.path().join("web.bin"), b"tokens!").unwrap();
        let p = f.plan(&[]);
        assert_eq!(p[0].3.len(), 1);
        assert!(p[0].3[0].starts_with("content of input `data` changed ("), "{:?}", p[0].3);
        assert!(p[0].3[0].ends_with("web.bin)"), "{:?}", p[0].3);
    }

    #[test]
    fn a_stage_version_change_is_explained() {
        let old = PreImage {
            kind: "x".into(),
            version: 1,
            params: crate::key::Canon::Null,
            inputs: vec![],
            external: vec![],
        };
        let new = PreImage { version: 2, ..old.clone() };
        let f = Fixture::new();
        let p = f.load(&[]);
        assert_eq!(
            explain(&old, &new, &BTreeMap::new(), &p.stages[0]),
            ["stage version of `x` changed: 1 -> 2"]
        );
    }

    #[test]
    fn missing_inputs_are_all_named() {
        let f = Fixture::new();
        let text = TEXT.replace(
            "[stages.train]",
            "[stages.chat]\nkind = \"source\"\ndata = \"chat.bin\"\nseed = 2\n[stages.train]",
        );
        let env = |_: &str| None;
        let p = crate::config::load_str(&f.dir.path().join("p.toml"), &text, &[], &f.registry, &env).unwrap();
        std::fs::remove_file(f.dir.path().join("web.bin")).unwrap();
        let err = plan(&p, &f.registry, &f.store, &PlanOptions::default()).unwrap_err().to_string();
        assert!(err.contains("stage `chat`: input `data`"), "{err}");
        assert!(err.contains("stage `web`: input `data`"), "{err}");
        assert!(err.contains("No such file or directory"), "{err}");
    }
}
