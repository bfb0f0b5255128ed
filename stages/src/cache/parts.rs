//! The `cache` stage in parts, for a cluster job array ([`engine::Stage::split`]): the split plan,
//! one part's run, and the assembly of the parts into the outputs of a whole run, byte for byte.
//!
//! The plan (`parts.json` in the work dir) comes from reading the dataset exactly as a whole run
//! does ([`Windows`]), for the lengths only, on the CPU: the whole run's shard list, cut into at
//! most `max_parts` runs of consecutive shards, balanced by tokens. A shard begins and ends on a
//! window boundary, so a part is a range of whole windows: computed from its first document on,
//! it sees the whole run's windows, hence its micro-batches and its bits. Part `i` keeps its work
//! in `part-0000i/` of the work dir (shared by all parts; each part writes only its own folder):
//!
//! - `shards/00012.safetensors`: its finished shards, under their global names;
//! - `stats/00012.bin`: the batch statistics ([`Batch`]) of that shard's windows, in order;
//! - `state.json`: the [`ResumeState`] committed after each finished shard, with the part's plan
//!   and what its models contribute to `cache.json` ([`PartRecord`]), so that a killed part
//!   resumes after its last finished shard.
//!
//! Merged in another order, the statistics would differ in their last bits, so the assembly
//! replays the windows' merges in dataset order from an empty state (a window's statistics take
//! 32·d bytes: 128 KiB a window at d = 4096, a few MiB a shard, gone with the work dir). It renames the shards into
//! the out dir (the work dir and the staging out dir of a key are on one file system) and writes
//! `stats.safetensors` and `cache.json` as a whole run does, without loading a model.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use engine::{StageContext, StageError};
use serde::{Deserialize, Serialize};

use super::format::{Batch, Shard, ShardInfo, Welford};
use super::stage::{
    CacheParams, Inputs, KeptStats, Models, Produced, ResumeState, Target, Windows, compute, remove_unlisted,
    shard_ends, shard_file, write_durably, write_outputs,
};

/// The split plan, in the work dir.
const PLAN_FILE: &str = "parts.json";

/// `parts.json`: the whole run's shards and how they are cut into parts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct PartsPlan {
    /// The batch size the windows were cut for (`READ_AHEAD ×` it documents); every part runs
    /// with it.
    batch_size: usize,
    /// Documents consumed and tokens stored by the whole run.
    docs: u64,
    tokens: u64,
    /// The whole run's shards, in order.
    shards: Vec<ShardInfo>,
    parts: Vec<PartPlan>,
}

/// One part of a [`PartsPlan`]: consecutive whole shards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct PartPlan {
    /// Global indices of its shards.
    shards: Range<usize>,
    /// Its documents, `doc_start..doc_end` in dataset order.
    doc_start: u64,
    doc_end: u64,
    /// Tokens stored before its first document (the `max_tokens` cut counts from the start).
    tokens_before: u64,
    /// Tokens it stores.
    tokens: u64,
}

/// What a part's resume state records beyond a whole run's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct PartRecord {
    index: usize,
    plan: PartPlan,
    produced: Produced,
}

impl PartsPlan {
    fn path(ctx: &StageContext) -> PathBuf {
        ctx.work_dir().join(PLAN_FILE)
    }

    /// The plan of a split into `count` parts.
    fn load(ctx: &StageContext, count: usize) -> Result<PartsPlan, StageError> {
        let path = PartsPlan::path(ctx);
        let redo = || start_over(ctx);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StageError::failed(format!(
                    "{} is missing, so the split of this cache cannot be run: {}",
                    path.display(),
                    redo()
                )));
            }
            Err(e) => return Err(StageError::io(path.display(), e)),
        };
        let plan: PartsPlan = serde_json::from_str(&text).map_err(|e| {
            StageError::failed(format!("{}: unreadable split plan ({e}): {}", path.display(), redo()))
        })?;
        if plan.parts.len() != count {
            return Err(StageError::failed(format!(
                "{} plans {} parts but the split was recorded with {count}: {}",
                path.display(),
                plan.parts.len(),
                redo()
            )));
        }
        Ok(plan)
    }
}

/// What to do when the split's files disagree: the key's whole work folder goes (the engine's
/// record of the split and of the parts done lies beside the stage's work dir).
fn start_over(ctx: &StageContext) -> String {
    let root = ctx.work_dir().parent().unwrap_or(ctx.work_dir());
    format!("delete {} to start this stage over", root.display())
}

/// The folder of part `index` in the work dir.
fn part_dir(ctx: &StageContext, index: usize) -> PathBuf {
    ctx.work_dir().join(format!("part-{index:05}"))
}

/// Plans at most `max_parts` parts (see the module doc); 1 when there is a single shard.
pub(super) fn split(p: &CacheParams, ctx: &mut StageContext, max_parts: usize) -> Result<usize, StageError> {
    if max_parts <= 1 {
        return Ok(1);
    }
    let inputs = Inputs::open(p, ctx)?;
    let (shards, docs, tokens) = whole_run_shards(p, ctx, &inputs)?;
    if shards.len() <= 1 {
        tracing::info!("{tokens} tokens fit in one shard: no split");
        return Ok(1);
    }
    let ranges = balance(&shards.iter().map(|s| s.tokens).collect::<Vec<_>>(), max_parts);
    let sum = |r: Range<usize>| shards[r].iter().map(|s| s.tokens).sum::<u64>();
    let parts = ranges
        .into_iter()
        .map(|r| {
            let last = &shards[r.end - 1];
            PartPlan {
                doc_start: shards[r.start].first_doc,
                doc_end: last.first_doc + last.docs,
                tokens_before: sum(0..r.start),
                tokens: sum(r.clone()),
                shards: r,
            }
        })
        .collect();
    let plan = PartsPlan { batch_size: p.batch_size, docs, tokens, shards, parts };
    let path = PartsPlan::path(ctx);
    write_durably(&path, &serde_json::to_vec_pretty(&plan).expect("serializable"))
        .map_err(StageError::other)?;
    tracing::info!(
        "{tokens} tokens of {docs} documents in {} shards: {} parts of {}..{} tokens",
        plan.shards.len(),
        plan.parts.len(),
        plan.parts.iter().map(|p| p.tokens).min().unwrap_or(0),
        plan.parts.iter().map(|p| p.tokens).max().unwrap_or(0),
    );
    Ok(plan.parts.len())
}

/// The shards a whole run would write, with the documents it consumes and the tokens it stores:
/// its windows, lengths only.
fn whole_run_shards(
    p: &CacheParams,
    ctx: &StageContext,
    inputs: &Inputs,
) -> Result<(Vec<ShardInfo>, u64, u64), StageError> {
    let mut windows = Windows::new(inputs.texts_from(p, 0)?, inputs, p, 0, 0, None);
    let progress = ctx.progress().clone();
    progress.set_total(p.max_tokens.unwrap_or(0), "tokens");
    progress.set_message("planning the split");
    let mut shards = Vec::new();
    let mut open: Option<ShardInfo> = None;
    let (mut docs, mut tokens) = (0, 0);
    loop {
        ctx.check_cancelled()?;
        let Some(w) = windows.next_window()? else { break };
        if !w.kept.is_empty() {
            let index = shards.len();
            let s = open.get_or_insert_with(|| ShardInfo {
                file: shard_file(index),
                tokens: 0,
                first_doc: docs,
                docs: 0,
            });
            s.docs += w.kept.len() as u64;
            s.tokens += w.tokens_after - tokens;
        }
        (docs, tokens) = (w.docs_after, w.tokens_after);
        progress.set_done(tokens);
        if shard_ends(open.as_ref().map_or(0, |s| s.tokens), p.shard_tokens, w.last) {
            shards.extend(open.take());
        }
    }
    progress.set_message("");
    Ok((shards, docs, tokens))
}

/// Cuts shards of `tokens` tokens each into at most `max_parts` runs of consecutive shards, none
/// empty, each cut where the running sum comes nearest to its share of the total.
fn balance(tokens: &[u64], max_parts: usize) -> Vec<Range<usize>> {
    let n = tokens.len();
    let parts = max_parts.min(n).max(1);
    let mut before = vec![0u64];
    for t in tokens {
        before.push(before.last().expect("starts with 0") + t);
    }
    let total = before[n] as u128;
    let mut cuts = vec![0];
    for j in 1..parts {
        let target = (total * j as u128 / parts as u128) as u64;
        let lo = cuts.last().expect("starts with 0") + 1;
        let cut =
            (lo..=n - (parts - j)).min_by_key(|&i| before[i].abs_diff(target)).expect("a shard is left");
        cuts.push(cut);
    }
    cuts.push(n);
    cuts.windows(2).map(|c| c[0]..c[1]).collect()
}

/// Part `index` of `count`: its windows into its folder (see the module doc).
pub(super) fn run_part(
    p: &CacheParams,
    ctx: &mut StageContext,
    index: usize,
    count: usize,
) -> Result<(), StageError> {
    let t0 = Instant::now();
    let plan = PartsPlan::load(ctx, count)?;
    if plan.batch_size != p.batch_size {
        return Err(StageError::failed(format!(
            "the split in {} cut its windows for batch_size = {}, and this run has batch_size = {}: \
             set batch_size = {} (every part must compute the windows of one whole run)",
            PartsPlan::path(ctx).display(),
            plan.batch_size,
            p.batch_size,
            plan.batch_size
        )));
    }
    let part = plan.parts.get(index).ok_or_else(|| {
        StageError::failed(format!("part {index} does not exist: the split has {} parts", plan.parts.len()))
    })?;
    let dir = part_dir(ctx, index);
    std::fs::create_dir_all(&dir).map_err(|e| StageError::io(dir.display(), e))?;
    let state_path = dir.join("state.json");
    let inputs = Inputs::open(p, ctx)?;
    let models = Models::load(p, ctx, &inputs)?;
    let produced = models.produced(&inputs);
    let mut state = ResumeState::load(&state_path)?;
    match &state.part {
        None => {
            state = ResumeState {
                docs: part.doc_start,
                tokens: part.tokens_before,
                part: Some(PartRecord { index, plan: part.clone(), produced: produced.clone() }),
                ..ResumeState::default()
            };
        }
        Some(r) if r.index != index || r.plan != *part => {
            return Err(StageError::failed(format!(
                "{} belongs to another split plan than {}: delete the part's folder {} to recompute it",
                state_path.display(),
                PartsPlan::path(ctx).display(),
                dir.display()
            )));
        }
        Some(r) if r.produced != produced => {
            return Err(StageError::failed(format!(
                "part {index} began computing in {} and storing {} with {}, and this attempt computes in \
                 {} and stores {} with {}: run it where it began, or set dtype and store_dtype explicitly \
                 and delete {} to recompute it",
                r.produced.compute_dtype,
                r.produced.dtype,
                describe(&r.produced),
                produced.compute_dtype,
                produced.dtype,
                describe(&produced),
                dir.display()
            )));
        }
        Some(_) => {}
    }
    ctx.progress().set_total(part.tokens, "tokens");
    let target = Target {
        shards_dir: dir.join("shards"),
        state_path,
        stats: KeptStats::PerShard(dir.join("stats")),
        first_shard: part.shards.start,
        end_doc: Some(part.doc_end),
        progress_from: part.tokens_before,
    };
    let started_tokens = state.tokens;
    let state = compute(p, ctx, &inputs, &models, state, &target, t0)?;
    let planned = &plan.shards[part.shards.clone()];
    if !state.done || state.docs != part.doc_end || state.shards != planned {
        return Err(StageError::failed(format!(
            "part {index} stored {} tokens of documents {}..{} in {} shards, but the split plan {} \
             expects {} tokens of documents {}..{} in shards {}..{}: the dataset or the tokenizer \
             changed since the split; {}",
            state.tokens - part.tokens_before,
            part.doc_start,
            state.docs,
            state.shards.len(),
            PartsPlan::path(ctx).display(),
            part.tokens,
            part.doc_start,
            part.doc_end,
            part.shards.start,
            part.shards.end,
            start_over(ctx)
        )));
    }
    let secs = t0.elapsed().as_secs_f64();
    tracing::info!(
        "part {index} of {count}: {} tokens of documents {}..{} in shards {}..{} ({:.0} tokens/s this attempt)",
        part.tokens,
        part.doc_start,
        part.doc_end,
        part.shards.start,
        part.shards.end,
        (state.tokens - started_tokens) as f64 / secs
    );
    Ok(())
}

/// The model pair of `produced`, for messages.
fn describe(produced: &Produced) -> String {
    let paths: Vec<String> = produced.models.iter().map(|m| m.path.display().to_string()).collect();
    paths.join(" and ")
}

/// The outputs from the parts: checks every part against the plan, then replays the statistics,
/// moves the shards into the out dir and writes `stats.safetensors` and `cache.json`. Resumable:
/// a shard already moved by an earlier attempt is found in the out dir.
///
/// `tokens_per_s` is that of one device: all tokens over the parts' summed seconds (each part's
/// from the start of each of its attempts, model loading included, to its last finished shard),
/// comparable with a whole run's on one device.
pub(super) fn assemble(p: &CacheParams, ctx: &mut StageContext, count: usize) -> Result<(), StageError> {
    let plan = PartsPlan::load(ctx, count)?;
    let inputs = Inputs::open(p, ctx)?;
    let mut records = Vec::with_capacity(plan.parts.len());
    let mut seconds = 0.0;
    for (index, part) in plan.parts.iter().enumerate() {
        let path = part_dir(ctx, index).join("state.json");
        let state = ResumeState::load(&path)?;
        let planned = &plan.shards[part.shards.clone()];
        let record = state.part.filter(|r| r.index == index && r.plan == *part);
        match record {
            Some(r) if state.done && state.shards == planned => records.push(r),
            Some(_) => {
                return Err(StageError::failed(format!(
                    "part {index} is not complete: {} lists {} of its {} shards{}; {}",
                    path.display(),
                    state.shards.len(),
                    planned.len(),
                    if state.shards.len() == planned.len() { ", not those the plan expects" } else { "" },
                    start_over(ctx)
                )));
            }
            None if !path.exists() => {
                return Err(StageError::failed(format!(
                    "part {index} has not run: {} is missing; {}",
                    path.display(),
                    start_over(ctx)
                )));
            }
            None => {
                return Err(StageError::failed(format!(
                    "{} belongs to another split plan than {}: {}",
                    path.display(),
                    PartsPlan::path(ctx).display(),
                    start_over(ctx)
                )));
            }
        }
        seconds += state.seconds;
    }
    let produced = &records[0].produced;
    if let Some(other) = records.iter().find(|r| r.produced != *produced) {
        return Err(StageError::failed(format!(
            "the parts do not agree: part 0 computed in {} and stored {} with {}, part {} computed in \
             {} and stored {} with {}; set dtype and store_dtype explicitly, then {}",
            produced.compute_dtype,
            produced.dtype,
            describe(produced),
            other.index,
            other.produced.compute_dtype,
            other.produced.dtype,
            describe(&other.produced),
            start_over(ctx)
        )));
    }
    let d = produced.d_model;
    let out_shards = ctx.out_dir().join("shards");
    std::fs::create_dir_all(&out_shards).map_err(|e| StageError::io(out_shards.display(), e))?;
    let mut welford = Welford::new(2 * d);
    for (index, part) in plan.parts.iter().enumerate() {
        let dir = part_dir(ctx, index);
        for shard in &plan.shards[part.shards.clone()] {
            let stats = KeptStats::file_of(&dir.join("stats"), &shard.file);
            for batch in Batch::read_all(&stats, 2 * d).map_err(StageError::other)? {
                welford.merge(&batch);
            }
            let name = shard.file.trim_start_matches("shards/");
            move_shard(ctx, &dir.join("shards").join(name), &out_shards.join(name))?;
            Shard::open(&out_shards.join(name), d, produced.dtype, shard.tokens, shard.docs)
                .map_err(StageError::other)?;
        }
    }
    let names = plan.shards.iter().map(|s| s.file.trim_start_matches("shards/").to_string()).collect();
    remove_unlisted(&out_shards, &names)?;
    tracing::info!(
        "assembled {} tokens of {} documents in {} shards from {} parts",
        plan.tokens,
        plan.docs,
        plan.shards.len(),
        plan.parts.len()
    );
    let state =
        ResumeState { shards: plan.shards, docs: plan.docs, tokens: plan.tokens, ..ResumeState::default() };
    write_outputs(p, ctx, &inputs, produced, &state, &welford, state.tokens as f64 / seconds)
}

/// Renames a part's shard into the out dir; one already there was moved by an earlier attempt.
fn move_shard(ctx: &StageContext, from: &Path, to: &Path) -> Result<(), StageError> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && to.is_file() => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StageError::failed(format!(
            "{} is missing, and not in {} either, though its part's state lists it; {}",
            from.display(),
            to.parent().unwrap_or(to).display(),
            start_over(ctx)
        ))),
        Err(e) => Err(StageError::io(format!("moving {} to {}", from.display(), to.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use engine::Cancel;
    use engine::config::Pipeline;
    use engine::exec::{Executed, Mode, Outcome, execute_one};
    use engine::plan::Plan;
    use engine::store::Store;

    use super::*;
    use crate::cache::{CacheMeta, StoreDtype};

    fn check_balance(tokens: &[u64], max_parts: usize, expected: &[Range<usize>]) {
        assert_eq!(balance(tokens, max_parts), expected, "{tokens:?} into at most {max_parts}");
    }

    #[test]
    fn parts_are_runs_of_shards_with_near_equal_tokens() {
        check_balance(&[10, 10, 10, 10, 10, 10], 3, &[0..2, 2..4, 4..6]);
        check_balance(&[10, 10, 10, 10, 10, 4], 3, &[0..2, 2..4, 4..6]);
        check_balance(&[100, 1, 1, 1], 2, &[0..1, 1..4]);
        check_balance(&[1, 1, 1, 100], 2, &[0..3, 3..4]);
        check_balance(&[1, 1, 1, 100], 3, &[0..2, 2..3, 3..4]);
        check_balance(&[10, 10], 5, &[0..1, 1..2]);
        check_balance(&[0, 0, 5], 3, &[0..1, 1..2, 2..3]);
        check_balance(&[7, 3], 1, std::slice::from_ref(&(0..2)));
    }

    /// Documents of varied lengths made from the committed tiny corpus.
    fn corpus(path: &Path, docs: usize) {
        let web = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/web.jsonl"))
            .unwrap();
        let texts: Vec<String> = web
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["text"].as_str().unwrap().to_string()
            })
            .collect();
        let mut out = String::new();
        for i in 0..docs {
            let text: String = texts[i * 7 % texts.len()].chars().take(60 + i * 53 % 280).collect();
            out.push_str(&serde_json::json!({ "text": text }).to_string());
            out.push('\n');
        }
        std::fs::write(path, out).unwrap();
    }

    /// Windows of 16 documents (batch_size 2), shards of about two windows.
    fn pipeline_text(data: &Path, extra: &str) -> String {
        let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/tiny/llama");
        format!(
            "[pipeline]\nname = \"split\"\n[stages.cache]\nkind = \"cache\"\nbase = \"{}\"\nchat = \"{}\"\n\
             data = \"{}\"\nlayer = 2\nbatch_size = 2\nshard_tokens = 1500\nignore_first_n = 2\n{extra}\n",
            tiny.join("base").display(),
            tiny.join("chat").display(),
            data.display()
        )
    }

    /// One datastore with the one-stage pipeline planned in it.
    struct Project {
        pipeline: Pipeline,
        store: Store,
        plan: Plan,
        registry: engine::Registry,
    }

    impl Project {
        fn new(root: &Path, text: &str) -> Project {
            let registry = crate::registry();
            let pipeline =
                engine::config::load_str(&root.join("p.toml"), text, &[], &registry, &|_| None).unwrap();
            let store = Store::open(&root.join("store")).unwrap();
            let plan = engine::plan::plan(&pipeline, &registry, &store, &Default::default()).unwrap();
            Project { pipeline, store, plan, registry }
        }

        fn exec(&self, mode: Mode, cancel: Cancel) -> Executed {
            let (p, r) = (&self.pipeline, &self.registry);
            execute_one(p, r, &self.store, &self.plan, "cache", "cpu".into(), cancel, mode).unwrap()
        }

        /// Runs `mode` to completion and returns the published out dir, if any.
        fn done(&self, mode: Mode) -> Option<PathBuf> {
            let e = self.exec(mode, Cancel::new());
            assert!(matches!(e.outcome, Outcome::Done { .. }), "{mode:?}: {:?}", e.outcome);
            e.object.map(|o| o.out_dir())
        }

        fn work_root(&self) -> PathBuf {
            self.store.work_root("cache", &self.plan.stage("cache").unwrap().key)
        }

        fn scratch(&self) -> PathBuf {
            self.work_root().join("scratch")
        }

        /// Splits into at most `max_parts`; returns the number of parts.
        fn split(&self, max_parts: usize) -> usize {
            let e = self.exec(Mode::Split { max_parts }, Cancel::new());
            assert!(matches!(e.outcome, Outcome::Done { .. }), "{:?}", e.outcome);
            e.parts.expect("a split says how many parts")
        }

        fn parts_plan(&self) -> PartsPlan {
            serde_json::from_slice(&std::fs::read(self.scratch().join(PLAN_FILE)).unwrap()).unwrap()
        }
    }

    /// Every file below `dir`, by relative path.
    fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(root, &path, out);
                } else {
                    out.insert(path.strip_prefix(root).unwrap().to_owned(), std::fs::read(&path).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(dir, dir, &mut out);
        out
    }

    fn assert_same_outputs(whole: &Path, split: &Path) {
        let (a, b) = (tree(whole), tree(split));
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (file, bytes) in &a {
            assert!(bytes == &b[file], "{} differs between the whole and the split run", file.display());
        }
    }

    /// Over 400 documents in `dir`, the pipeline with `extra` and its whole run: the pipeline's
    /// text, the run's out dir and its `cache.json`.
    fn whole_run(dir: &Path, extra: &str) -> (String, PathBuf, CacheMeta) {
        let data = dir.join("docs.jsonl");
        corpus(&data, 400);
        let text = pipeline_text(&data, extra);
        let out = Project::new(&dir.join("whole"), &text).done(Mode::Whole).expect("published");
        let meta = CacheMeta::read(&out).unwrap();
        (text, out, meta)
    }

    /// The parts run out of order, one killed while writing a shard and resumed, one cancelled
    /// after its first shard and resumed; the assembly equals the whole run byte for byte.
    #[test]
    fn parts_in_any_order_killed_and_cancelled_assemble_into_the_whole_run() {
        let dir = tempfile::tempdir().unwrap();
        let (text, whole_out, meta) = whole_run(dir.path(), "");

        let split = Project::new(&dir.path().join("split"), &text);
        assert_eq!(split.split(3), 3);
        let plan = split.parts_plan();
        assert_eq!(plan.shards, meta.shards, "the plan's shards are the whole run's");
        assert_eq!((plan.docs, plan.tokens), (meta.docs, meta.tokens));
        assert_eq!(plan.parts.len(), 3);
        assert!(plan.parts.iter().all(|p| p.shards.len() >= 3), "{:?}", plan.parts);
        let scratch = split.scratch();

        assert!(split.done(Mode::Part(2)).is_none(), "a part publishes nothing");

        // Part 0, then as if killed by -9 while writing its second shard: the state still at the
        // first shard, the second half written, the part not marked done.
        split.done(Mode::Part(0));
        let part0 = scratch.join("part-00000");
        let mut state = ResumeState::load(&part0.join("state.json")).unwrap();
        state.shards.truncate(1);
        (state.docs, state.tokens, state.done) = (state.shards[0].docs, state.shards[0].tokens, false);
        state.save(&part0.join("state.json")).unwrap();
        let torn = part0.join(shard_file(1));
        let f = std::fs::OpenOptions::new().write(true).open(&torn).unwrap();
        f.set_len(f.metadata().unwrap().len() / 2).unwrap();
        std::fs::remove_file(split.store.part_path(
            "cache",
            &split.plan.stage("cache").unwrap().key,
            0,
            "done",
        ))
        .unwrap();
        split.done(Mode::Part(0));

        // Part 1, cancelled once its first shard is committed (Ctrl-C, or a lock lost), then again.
        let part1_state = scratch.join("part-00001/state.json");
        let cancel = Cancel::new();
        let returned = AtomicBool::new(false);
        let cancelled = std::thread::scope(|scope| {
            scope.spawn(|| {
                while !part1_state.exists() && !returned.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                cancel.cancel();
            });
            let e = split.exec(Mode::Part(1), cancel.clone());
            returned.store(true, Ordering::SeqCst);
            e
        });
        assert_eq!(cancelled.outcome, Outcome::Cancelled);
        let state = ResumeState::load(&part1_state).unwrap();
        assert!(!state.done && !state.shards.is_empty() && state.shards.len() < 3, "{state:?}");
        split.done(Mode::Part(1));

        // The local executor finds every part done and assembles them.
        let split_out = split.done(Mode::Whole).expect("published");
        assert_same_outputs(&whole_out, &split_out);
        let metrics = |out: &Path| {
            let manifest: serde_json::Value =
                serde_json::from_slice(&std::fs::read(out.parent().unwrap().join("manifest.json")).unwrap())
                    .unwrap();
            let mut m = manifest["metrics"].clone();
            assert!(m["tokens_per_s"].as_f64().unwrap() > 0.0, "{m}");
            m.as_object_mut().unwrap().remove("tokens_per_s");
            m
        };
        assert_eq!(metrics(&whole_out), metrics(&split_out));
    }

    /// `dtype = "auto"` is what the checkpoints' configs name: the tiny pair as shipped (f32), and
    /// a copy whose configs say bfloat16, which runs and stores in bf16 on the CPU; the stored
    /// activations stay near the f32 run's.
    #[test]
    fn auto_dtype_is_the_checkpoints_own() {
        let dir = tempfile::tempdir().unwrap();
        let (_, f32_out, f32_meta) = whole_run(dir.path(), "max_tokens = 3000");
        assert_eq!((f32_meta.compute_dtype.as_str(), f32_meta.dtype), ("f32", StoreDtype::F32));

        let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/tiny/llama");
        for model in ["base", "chat"] {
            let to = dir.path().join("bf16").join(model);
            std::fs::create_dir_all(&to).unwrap();
            for entry in std::fs::read_dir(tiny.join(model)).unwrap() {
                let from = entry.unwrap().path();
                std::fs::copy(&from, to.join(from.file_name().unwrap())).unwrap();
            }
            let config = std::fs::read_to_string(to.join("config.json")).unwrap();
            assert!(config.contains("\"dtype\": \"float32\""));
            std::fs::write(to.join("config.json"), config.replace("\"float32\"", "\"bfloat16\"")).unwrap();
        }
        let text = pipeline_text(&dir.path().join("docs.jsonl"), "max_tokens = 3000")
            .replace(&tiny.display().to_string(), &dir.path().join("bf16").display().to_string());
        let out = Project::new(&dir.path().join("bf16-store"), &text).done(Mode::Whole).expect("published");
        let meta = CacheMeta::read(&out).unwrap();
        assert_eq!((meta.compute_dtype.as_str(), meta.dtype), ("bf16", StoreDtype::Bf16));
        assert_eq!((meta.docs, meta.tokens), (f32_meta.docs, f32_meta.tokens));

        let rows = |out: &Path| {
            let cache = crate::cache::ActivationCache::open(out).unwrap();
            let mut rows = vec![0f32; 200 * 2 * cache.d_model()];
            cache.range_into(0..200, &mut rows);
            rows
        };
        let (x, y) = (rows(&f32_out), rows(&out));
        let (mut num, mut den) = (0f64, 0f64);
        for (u, v) in x.iter().zip(&y) {
            num += f64::from(u - v).powi(2);
            den += f64::from(*u).powi(2);
        }
        let rel = (num / den).sqrt();
        eprintln!("bf16 vs f32 stored activations: relative error {rel:.2e}");
        assert!(rel > 0.0 && rel < 0.02, "bf16 vs f32 relative error {rel:e}");
    }

    /// `max_tokens` cuts inside a window; the split is run by the local executor, part after part.
    #[test]
    fn a_max_tokens_cut_inside_a_window_splits_like_the_whole_run() {
        let dir = tempfile::tempdir().unwrap();
        let (text, whole_out, meta) = whole_run(dir.path(), "max_tokens = 5000\nstore_dtype = \"bf16\"");
        assert!(
            meta.tokens >= 5000 && meta.docs < 400 && !meta.docs.is_multiple_of(16),
            "{} docs",
            meta.docs
        );

        let split = Project::new(&dir.path().join("split"), &text);
        assert!(split.split(4) >= 2);
        let split_out = split.done(Mode::Whole).expect("published");
        assert_same_outputs(&whole_out, &split_out);
    }

    /// A single shard is not split; a part run with another batch size, or a part whose state is
    /// gone when the parts are assembled, fails naming what to fix.
    #[test]
    fn one_shard_is_no_split_and_disagreeing_parts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("docs.jsonl");
        corpus(&data, 40);
        let one = Project::new(&dir.path().join("one"), &pipeline_text(&data, "").replace("1500", "100000"));
        assert_eq!(one.split(3), 1);
        assert!(!one.scratch().join(PLAN_FILE).exists());
        one.done(Mode::Whole).expect("published");

        let root = dir.path().join("three");
        let text = pipeline_text(&data, "").replace("1500", "300");
        let split = Project::new(&root, &text);
        assert_eq!(split.split(2), 2);
        let other = Project::new(&root, &text.replace("batch_size = 2", "batch_size = 3"));
        let e = other.exec(Mode::Part(0), Cancel::new());
        assert!(
            matches!(&e.outcome, Outcome::Failed(m) if m.contains("batch_size = 2") && m.contains("parts.json")),
            "{:?}",
            e.outcome
        );
        split.done(Mode::Part(0));
        split.done(Mode::Part(1));
        std::fs::remove_file(split.scratch().join("part-00001/state.json")).unwrap();
        let e = split.exec(Mode::Whole, Cancel::new());
        assert!(
            matches!(&e.outcome, Outcome::Failed(m) if m.contains("part 1 has not run")
                && m.contains("part-00001/state.json") && m.contains("to start this stage over")),
            "{:?}",
            e.outcome
        );
    }
}
