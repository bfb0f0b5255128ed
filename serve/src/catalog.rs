//! What the explorer shows: pipelines, their stages' published objects, and the "views" built
//! from them. A view is one latent table (the `latents.parquet` of a `scale` or `collect`
//! object) with what belongs to it, found by following keys: the crosscoder it was computed
//! from, the `collect` object with that crosscoder's `examples.db`, the activation cache whose
//! `cache.json` names the models and layer (for steering), and the figures of the stages that
//! read the table or the crosscoder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use engine::Key;
use engine::key::PreImage;
use engine::plan::Plan;
use engine::store::{Object, Store};
use serde::Serialize;

/// One stage of a pipeline as the explorer sees it.
#[derive(Clone, Debug)]
pub struct StageEntry {
    pub name: String,
    pub kind: String,
    pub key: Key,
    /// (input role, upstream keys), as in the key's pre-image.
    pub inputs: Vec<(String, Vec<Key>)>,
    /// The published object, when there is one.
    pub object: Option<Object>,
}

impl StageEntry {
    fn input(&self, role: &str) -> &[Key] {
        self.inputs.iter().find(|(r, _)| r == role).map_or(&[], |(_, k)| k.as_slice())
    }

    /// Whether the object lists `path` (relative to its `out/`) among its files.
    pub fn has_file(&self, path: &str) -> bool {
        self.object.as_ref().is_some_and(|o| o.manifest.files.iter().any(|f| f.path == path))
    }

    fn reads(&self, key: &Key) -> bool {
        self.inputs.iter().any(|(_, keys)| keys.contains(key))
    }
}

/// One pipeline: from a pipeline file's plan, or from the run records in the datastore.
#[derive(Clone, Debug)]
pub struct PipelineEntry {
    pub name: String,
    pub file: PathBuf,
    /// Of the newest run (`ok`, `failed`, ...), or `planned` for a pipeline file's plan.
    pub status: String,
    pub started: Option<String>,
    pub stages: Vec<StageEntry>,
}

impl PipelineEntry {
    pub fn stage(&self, name: &str) -> Option<&StageEntry> {
        self.stages.iter().find(|s| s.name == name)
    }

    fn by_key(&self, key: &Key) -> Option<&StageEntry> {
        self.stages.iter().find(|s| &s.key == key)
    }

    /// The view of latent table `table` (a stage with a published `latents.parquet`).
    pub fn view(&self, table: &str) -> Option<View> {
        let t = self.stage(table).filter(|s| s.has_file("latents.parquet"))?;
        let crosscoder = t.input("crosscoder").first().and_then(|k| self.by_key(k));
        let examples = if t.has_file("examples.db") {
            Some(t)
        } else {
            let ck = crosscoder.map(|c| c.key);
            self.stages
                .iter()
                .find(|s| s.has_file("examples.db") && ck.is_some_and(|k| s.input("crosscoder").contains(&k)))
        };
        let cache = t
            .input("activations")
            .iter()
            .chain(crosscoder.map_or(&[][..], |c| c.input("activations")))
            .filter_map(|k| self.by_key(k))
            .find(|s| s.has_file("cache.json"));
        // The collect table whose statistics fill in what a scale table lacks.
        let statistics = examples.filter(|e| e.name != t.name && e.has_file("latents.parquet"));
        let mut figures = Vec::new();
        for s in &self.stages {
            let related = s.reads(&t.key) || crosscoder.is_some_and(|c| s.reads(&c.key));
            if !related || s.object.is_none() {
                continue;
            }
            for f in &s.object.as_ref().expect("checked").manifest.files {
                if f.path.ends_with(".png") {
                    figures.push(Figure { stage: s.name.clone(), path: f.path.clone() });
                }
            }
        }
        Some(View {
            table: t.name.clone(),
            table_kind: t.kind.clone(),
            crosscoder: crosscoder.filter(|c| c.object.is_some()).map(|c| c.name.clone()),
            examples: examples.map(|e| e.name.clone()),
            statistics: statistics.map(|s| s.name.clone()),
            cache: cache.map(|c| c.name.clone()),
            figures,
        })
    }

    /// Every view of the pipeline, in stage order.
    pub fn views(&self) -> Vec<View> {
        self.stages.iter().filter_map(|s| self.view(&s.name)).collect()
    }
}

/// A figure file of a stage's object.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub stage: String,
    pub path: String,
}

/// A latent table and the stages that belong to it (by stage name).
#[derive(Clone, Debug, Serialize)]
pub struct View {
    pub table: String,
    pub table_kind: String,
    pub crosscoder: Option<String>,
    pub examples: Option<String>,
    pub statistics: Option<String>,
    pub cache: Option<String>,
    pub figures: Vec<Figure>,
}

impl View {
    /// Steering needs the crosscoder's decoder and the cache's models.
    pub fn can_steer(&self) -> bool {
        self.crosscoder.is_some() && self.cache.is_some()
    }
}

/// Everything the explorer can show.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub pipelines: Vec<PipelineEntry>,
}

impl Catalog {
    pub fn pipeline(&self, name: &str) -> Option<&PipelineEntry> {
        self.pipelines.iter().find(|p| p.name == name)
    }

    /// A pipeline file's plan: its stages with the objects their current keys have.
    pub fn from_plan(plan: &Plan, file: &Path) -> Catalog {
        let stages = plan
            .stages
            .iter()
            .map(|s| StageEntry {
                name: s.name.clone(),
                kind: s.kind.clone(),
                key: s.key,
                inputs: s.preimage.inputs.clone(),
                object: s.object.clone(),
            })
            .collect();
        Catalog {
            pipelines: vec![PipelineEntry {
                name: plan.pipeline.clone(),
                file: file.to_path_buf(),
                status: "planned".into(),
                started: None,
                stages,
            }],
        }
    }

    /// The same stages and keys with their objects looked up again (a `pipe run` since may have
    /// published some).
    pub fn refreshed(&self, store: &Store) -> Catalog {
        let mut c = self.clone();
        for p in &mut c.pipelines {
            for s in &mut p.stages {
                s.object = store.lookup(&s.kind, &s.key).ok().flatten();
            }
        }
        c
    }

    /// Every pipeline with run records in `store`: each stage at the newest key that has a
    /// published object (runs read newest first), in the newest run's stage order.
    pub fn from_runs(store: &Store) -> Catalog {
        let mut names: Vec<String> = store.all_runs().into_iter().map(|r| r.pipeline).collect();
        names.sort();
        names.dedup();
        let mut pipelines = Vec::new();
        for name in names {
            let mut runs = store.runs_newest_first(&name).peekable();
            let Some(newest) = runs.peek().cloned() else { continue };
            let mut found: BTreeMap<String, StageEntry> = BTreeMap::new();
            for run in std::iter::once(newest.clone()).chain(runs.skip(1)) {
                for (stage, rec) in &run.stages {
                    if found.contains_key(stage) {
                        continue;
                    }
                    let Some(pre) = PreImage::from_json(&rec.preimage) else { continue };
                    let Some(key) = Key::parse(&rec.key) else { continue };
                    let Ok(Some(object)) = store.lookup(&rec.kind, &key) else { continue };
                    found.insert(
                        stage.clone(),
                        StageEntry {
                            name: stage.clone(),
                            kind: rec.kind.clone(),
                            key,
                            inputs: pre.inputs,
                            object: Some(object),
                        },
                    );
                }
            }
            let mut stages: Vec<StageEntry> = Vec::new();
            for stage in newest.stages.keys() {
                if let Some(s) = found.remove(stage) {
                    stages.push(s);
                }
            }
            stages.extend(found.into_values());
            pipelines.push(PipelineEntry {
                name,
                file: newest.file.clone(),
                status: newest.status.clone(),
                started: Some(newest.started.clone()),
                stages,
            });
        }
        Catalog { pipelines }
    }
}
