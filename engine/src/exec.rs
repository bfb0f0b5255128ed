//! The executor: runs a plan in topological order, independent stages in parallel up to `jobs`,
//! one device each for stages that want an accelerator. A failed stage blocks only its
//! descendants; Ctrl-C stops scheduling and leaves partials resumable.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use crate::config::Pipeline;
use crate::graph::Dag;
use crate::plan::{Action, Plan, StagePlan};
use crate::progress::Progress;
use crate::stage::{Cancel, DeviceUse, Portion, Registry, StageContext, StageError, Upstream};
use crate::store::{
    KeyLock, Object, PublishInfo, RunRecord, StageRecord, Store, StoreError, rfc3339, write_json,
};

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub jobs: usize,
    /// Devices handed to accelerator stages, one each (`cpu`, `cuda:0`, ...). `cpu` is shared.
    pub devices: Vec<String>,
    /// Run only these stages (and what they need). Empty: all.
    pub only: BTreeSet<String>,
    pub cancel: Cancel,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self { jobs: 1, devices: vec!["cpu".into()], only: BTreeSet::new(), cancel: Cancel::new() }
    }
}

/// How one stage ended in this run.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Already in the store (possibly computed meanwhile by another `pipe run`).
    Cached,
    Done {
        seconds: f64,
        resumed: bool,
    },
    Failed(String),
    Cancelled,
    /// An upstream failed or was cancelled.
    Blocked(String),
    /// Not selected by `--only`.
    NotSelected,
    /// Left to run as cluster jobs (these) when the coordinator detached.
    Queued(String),
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Cached => "cached",
            Outcome::Done { .. } => "done",
            Outcome::Failed(_) => "failed",
            Outcome::Cancelled => "cancelled",
            Outcome::Blocked(_) => "blocked",
            Outcome::NotSelected => "not-selected",
            Outcome::Queued(_) => "queued",
        }
    }
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Cached | Outcome::Done { .. } | Outcome::NotSelected)
    }
}

#[derive(Clone, Debug)]
pub struct RunSummary {
    /// In plan order.
    pub stages: Vec<(String, Outcome)>,
    pub record: std::path::PathBuf,
    pub cancelled: bool,
}

impl RunSummary {
    pub fn ok(&self) -> bool {
        !self.cancelled && self.stages.iter().all(|(_, o)| o.is_ok())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("unknown stage `{0}` in --only")]
    UnknownStage(String),
}

struct Done {
    name: String,
    device: Option<String>,
    outcome: Outcome,
    object: Option<Object>,
}

/// Runs the plan. Stages are attempted in plan (topological) order as their upstreams finish.
pub fn run(
    p: &Pipeline,
    registry: &Registry,
    store: &Store,
    plan: &Plan,
    opts: &RunOptions,
) -> Result<RunSummary, ExecError> {
    let _store_guard = store.lock_shared()?;
    let dag = Dag::new(p);
    let selected = selection(&dag, plan, &opts.only)?;

    let started = SystemTime::now();
    let record_path = store.new_run_path(&p.name, started)?;
    let mut outcomes: BTreeMap<String, Outcome> = BTreeMap::new();
    let mut objects: BTreeMap<String, Object> = BTreeMap::new();
    let mut seconds: BTreeMap<String, f64> = BTreeMap::new();
    for s in &plan.stages {
        if !selected.contains(&s.name) {
            outcomes.insert(s.name.clone(), Outcome::NotSelected);
        } else if s.action == Action::Skip
            && let Some(obj) = &s.object
        {
            outcomes.insert(s.name.clone(), Outcome::Cached);
            objects.insert(s.name.clone(), obj.clone());
        }
    }
    let write_record =
        |outcomes: &BTreeMap<String, Outcome>, seconds: &BTreeMap<String, f64>, status: &str| {
            write_run_record(&record_path, p, plan, started, outcomes, seconds, status)
        };
    write_record(&outcomes, &seconds, "running")?;
    for (name, obj) in &objects {
        link(store, p, name, obj);
    }

    let jobs = opts.jobs.max(1);
    let mut free_devices: Vec<String> = opts.devices.iter().rev().cloned().collect();
    let accel_devices = opts.devices.iter().any(|d| d != "cpu");
    let (tx, rx) = mpsc::channel::<Done>();
    let mut in_flight: BTreeSet<String> = BTreeSet::new();

    std::thread::scope(|scope| -> Result<(), ExecError> {
        loop {
            // Launch what is ready, in plan order.
            if !opts.cancel.is_cancelled() {
                for s in &plan.stages {
                    if in_flight.len() >= jobs {
                        break;
                    }
                    if outcomes.contains_key(&s.name) || in_flight.contains(&s.name) {
                        continue;
                    }
                    let parents = dag.parents(&s.name);
                    if !parents
                        .iter()
                        .all(|u| matches!(outcomes.get(u), Some(Outcome::Cached | Outcome::Done { .. })))
                    {
                        continue;
                    }
                    let Some(kind) = registry.get(&s.kind) else { continue };
                    let device = if kind.device() == DeviceUse::Accelerator && accel_devices {
                        match free_devices.iter().rposition(|d| d != "cpu") {
                            Some(i) => Some(free_devices.remove(i)),
                            None => continue,
                        }
                    } else {
                        None
                    };
                    let upstream = upstreams(p, s, &objects, &plan.stages);
                    let tx = tx.clone();
                    let decl_name = s.name.clone();
                    in_flight.insert(s.name.clone());
                    let cancel = opts.cancel.clone();
                    scope.spawn(move || {
                        let dev = device.clone().unwrap_or_else(|| "cpu".into());
                        // A panic outside the stage (the stage's own is caught in `execute`) must still
                        // report back, or the scheduler would wait for this stage forever.
                        let done = std::panic::catch_unwind(AssertUnwindSafe(|| {
                            execute(p, registry, store, s, upstream, dev, cancel, Mode::Whole)
                        }))
                        .unwrap_or_else(|_| {
                            Executed::of(
                                Outcome::Failed("internal error: the executor panicked".into()),
                                None,
                            )
                        });
                        let (outcome, object) = (done.outcome, done.object);
                        let _ = tx.send(Done { name: decl_name, device, outcome, object });
                    });
                }
            }
            if in_flight.is_empty() {
                break;
            }
            let done = match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(d) => d,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            in_flight.remove(&done.name);
            if let Some(d) = done.device {
                free_devices.push(d);
            }
            if let Outcome::Done { seconds: s, .. } = &done.outcome {
                seconds.insert(done.name.clone(), *s);
            }
            if let Some(obj) = done.object {
                link(store, p, &done.name, &obj);
                objects.insert(done.name.clone(), obj);
            }
            if !matches!(done.outcome, Outcome::Cached | Outcome::Done { .. }) {
                let why = format!("upstream `{}` {}", done.name, done.outcome.as_str());
                for d in dag.descendants(&done.name) {
                    if d != done.name && selected.contains(&d) && !outcomes.contains_key(&d) {
                        outcomes.insert(d, Outcome::Blocked(why.clone()));
                    }
                }
            }
            outcomes.insert(done.name, done.outcome);
            // Once stages run, a record that cannot be updated (disk full) must not stop the others.
            if let Err(e) = write_record(&outcomes, &seconds, "running") {
                tracing::warn!("cannot update the run record: {e}");
            }
        }
        Ok(())
    })?;

    let cancelled = opts.cancel.is_cancelled();
    for s in &plan.stages {
        if !outcomes.contains_key(&s.name) {
            outcomes.insert(
                s.name.clone(),
                if cancelled { Outcome::Cancelled } else { Outcome::Blocked("not reached".into()) },
            );
        }
    }
    let summary = RunSummary {
        stages: plan.stages.iter().map(|s| (s.name.clone(), outcomes[&s.name].clone())).collect(),
        record: record_path.clone(),
        cancelled,
    };
    let status = if cancelled {
        "cancelled"
    } else if summary.ok() {
        "ok"
    } else {
        "failed"
    };
    if let Err(e) = write_record(&outcomes, &seconds, status) {
        tracing::warn!("cannot write the run record: {e}");
    }
    Ok(summary)
}

/// Writes the run record of a run that started at `started`: each stage's outcome so far
/// (`pending` where there is none yet), and `status` (`running` until the end).
pub(crate) fn write_run_record(
    path: &std::path::Path,
    p: &Pipeline,
    plan: &Plan,
    started: SystemTime,
    outcomes: &BTreeMap<String, Outcome>,
    seconds: &BTreeMap<String, f64>,
    status: &str,
) -> Result<(), StoreError> {
    let rec = RunRecord {
        format: crate::store::STORE_FORMAT,
        pipeline: p.name.clone(),
        file: p.file.clone(),
        files: p.files.clone(),
        started: rfc3339(started),
        finished: (status != "running").then(|| rfc3339(SystemTime::now())),
        status: status.to_string(),
        stages: plan
            .stages
            .iter()
            .map(|s| {
                let o = outcomes.get(&s.name);
                let error = match o {
                    Some(Outcome::Failed(e)) | Some(Outcome::Blocked(e)) => Some(e.clone()),
                    _ => None,
                };
                (
                    s.name.clone(),
                    StageRecord {
                        kind: s.kind.clone(),
                        key: s.key.hex(),
                        preimage: s.preimage.to_json(),
                        state: o.map(|o| o.as_str()).unwrap_or("pending").to_string(),
                        seconds: seconds.get(&s.name).copied(),
                        error,
                    },
                )
            })
            .collect(),
    };
    write_json(path, &rec)
}

/// The stages a run covers: all, or those of `--only` and what they need.
pub(crate) fn selection(
    dag: &Dag,
    plan: &Plan,
    only: &BTreeSet<String>,
) -> Result<BTreeSet<String>, ExecError> {
    if only.is_empty() {
        return Ok(plan.stages.iter().map(|s| s.name.clone()).collect());
    }
    let mut sel = BTreeSet::new();
    for o in only {
        if plan.stage(o).is_none() {
            return Err(ExecError::UnknownStage(o.clone()));
        }
        sel.extend(dag.ancestors(o));
    }
    Ok(sel)
}

pub(crate) fn link(store: &Store, p: &Pipeline, stage: &str, obj: &Object) {
    if let Err(e) = store.link_result(&p.name, stage, obj) {
        tracing::warn!("cannot update results/{}/{stage}: {e}", p.name);
    }
}

pub(crate) fn upstreams(
    p: &Pipeline,
    s: &StagePlan,
    objects: &BTreeMap<String, Object>,
    plans: &[StagePlan],
) -> BTreeMap<String, Vec<Upstream>> {
    let decl = p.stage(&s.name);
    let mut out = BTreeMap::new();
    for (role, ups) in decl.map(|d| d.inputs.as_slice()).unwrap_or(&[]) {
        let list = ups
            .iter()
            .filter_map(|u| {
                let obj = objects.get(u)?;
                let up = plans.iter().find(|x| &x.name == u)?;
                Some(Upstream { stage: u.clone(), kind: up.kind.clone(), key: up.key, dir: obj.out_dir() })
            })
            .collect();
        out.insert(role.clone(), list);
    }
    out
}

/// Waits for a lock, polling so that Ctrl-C still works while another process holds it.
fn acquire(
    store: &Store,
    s: &StagePlan,
    cancel: &Cancel,
    part: Option<usize>,
) -> Result<Option<KeyLock>, StoreError> {
    let mut waited = false;
    loop {
        let on_lost = {
            let cancel = cancel.clone();
            move || cancel.cancel()
        };
        let got = match part {
            None => store.try_lock_watched(&s.key, on_lost)?,
            Some(i) => store.try_lock_part(&s.key, i, on_lost)?,
        };
        if let Some(l) = got {
            return Ok(Some(l));
        }
        if !waited {
            let by = store.lock_holder(&s.key).map(|h| format!(" ({})", h.describe())).unwrap_or_default();
            match part {
                None => {
                    tracing::info!(stage = %s.name, key = %s.key.short(), "another pipe process{by} is computing this key; waiting for it")
                }
                Some(i) => {
                    tracing::info!(stage = %s.name, key = %s.key.short(), "another pipe process is computing part {i}; waiting for it")
                }
            }
            waited = true;
        }
        if cancel.is_cancelled() {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What one call of [`execute_one`] does with a stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Compute and publish the stage (the parts of an earlier split first, if there is one).
    Whole,
    /// As `Whole`, but a forced stage keeps its work dir: a cluster job's, whose coordinator
    /// cleared it before queueing the jobs (it may hold their parts).
    Resume,
    /// Split the stage into at most this many parts (see [`crate::Stage::split`]); publishes
    /// nothing.
    Split { max_parts: usize },
    /// Compute one part of an earlier split; publishes nothing.
    Part(usize),
}

/// How one [`execute_one`] call ended.
#[derive(Clone, Debug)]
pub struct Executed {
    pub outcome: Outcome,
    pub object: Option<Object>,
    /// After [`Mode::Split`]: how many parts there are.
    pub parts: Option<usize>,
}

impl Executed {
    fn of(outcome: Outcome, object: Option<Object>) -> Self {
        Self { outcome, object, parts: None }
    }
}

/// Runs one stage of a plan in this process, as a cluster job does (`pipe exec-stage`): its
/// upstreams must be published. Locks, resume and publishing are as in [`run`].
#[allow(clippy::too_many_arguments)]
pub fn execute_one(
    p: &Pipeline,
    registry: &Registry,
    store: &Store,
    plan: &Plan,
    stage: &str,
    device: String,
    cancel: Cancel,
    mode: Mode,
) -> Result<Executed, ExecError> {
    let s = plan.stage(stage).ok_or_else(|| ExecError::UnknownStage(stage.to_string()))?;
    let mut objects = BTreeMap::new();
    for up in Dag::new(p).parents(stage) {
        let ups = plan.stage(&up).ok_or_else(|| ExecError::UnknownStage(up.clone()))?;
        match store.lookup(&ups.kind, &ups.key)? {
            Some(obj) => {
                objects.insert(up.clone(), obj);
            }
            None => {
                return Ok(Executed::of(Outcome::Blocked(format!("upstream `{up}` is not published")), None));
            }
        }
    }
    let inputs = upstreams(p, s, &objects, &plan.stages);
    let done = execute(p, registry, store, s, inputs, device, cancel, mode);
    if let Some(obj) = &done.object {
        link(store, p, stage, obj);
    }
    Ok(done)
}

#[allow(clippy::too_many_arguments)]
fn execute(
    p: &Pipeline,
    registry: &Registry,
    store: &Store,
    s: &StagePlan,
    inputs: BTreeMap<String, Vec<Upstream>>,
    device: String,
    cancel: Cancel,
    mode: Mode,
) -> Executed {
    let span = tracing::info_span!("stage", name = %s.name);
    let _enter = span.enter();
    let fail = |e: &dyn std::fmt::Display| {
        tracing::error!(stage = %s.name, "{e}");
        Executed::of(Outcome::Failed(e.to_string()), None)
    };
    let Some(kind) = registry.get(&s.kind) else {
        return fail(&format!("unknown stage kind `{}`", s.kind));
    };
    let forced = s.action == Action::Run && s.object.is_some();
    let part = match mode {
        Mode::Part(i) => Some(i),
        _ => None,
    };
    if part.is_some() && !forced {
        // A part needs no key lock, only its own; a published object makes it moot.
        match store.lookup(&s.kind, &s.key) {
            Ok(Some(obj)) => return Executed::of(Outcome::Cached, Some(obj)),
            Ok(None) => {}
            Err(e) => return fail(&e),
        }
    }
    let lock = match acquire(store, s, &cancel, part) {
        Ok(Some(l)) => l,
        Ok(None) => return Executed::of(Outcome::Cancelled, None),
        Err(e) => return fail(&e),
    };
    if let Some(i) = part {
        return execute_part(p, kind, store, s, inputs, device, cancel, i, &lock);
    }
    if !forced {
        // Another process may have published it while we waited.
        match store.lookup(&s.kind, &s.key) {
            Ok(Some(obj)) => return Executed::of(Outcome::Cached, Some(obj)),
            Ok(None) => {}
            Err(e) => return fail(&e),
        }
    } else if mode == Mode::Whole
        && let Err(e) = store.discard_partial(&s.kind, &s.key, &lock)
    {
        return fail(&e);
    }
    let work = match store.begin(&s.kind, &s.preimage, &lock) {
        Ok(w) => w,
        Err(e) => return fail(&e),
    };
    if let Err(e) = crate::logging::open(&s.name, &work.log) {
        tracing::warn!("cannot open the stage log {}: {e}", work.log.display());
    }
    let progress = Progress::for_stage(&s.name, work.progress.clone(), work.resumed);
    let mut ctx =
        context(p, s, &work.scratch, &work.out, work.resumed, inputs, device, &progress, cancel.clone());
    let t0 = Instant::now();
    let started = SystemTime::now();
    let out = match mode {
        Mode::Split { max_parts } => {
            let result = match store.split_count(&s.kind, &s.key) {
                Some(n) => Ok(n),
                None => guarded(|| kind.split(&s.run_params, &mut ctx, max_parts.max(1))).and_then(|n| {
                    store.write_split(&work, n.max(1), &lock).map(|()| n.max(1)).map_err(StageError::other)
                }),
            };
            progress.finish();
            match result {
                Ok(n) => {
                    tracing::info!("{} split into {n} part{}", s.name, if n == 1 { "" } else { "s" });
                    let secs = t0.elapsed().as_secs_f64();
                    Executed {
                        outcome: Outcome::Done { seconds: secs, resumed: work.resumed },
                        object: None,
                        parts: Some(n),
                    }
                }
                Err(e) => ended(s, e),
            }
        }
        Mode::Whole | Mode::Resume | Mode::Part(_) => {
            tracing::info!(
                "{} {} ({}) key {} on {}",
                if work.resumed { "resuming" } else { "running" },
                s.name,
                s.kind,
                s.key.short(),
                ctx.device
            );
            let result = match store.split_count(&s.kind, &s.key).filter(|&n| n > 1) {
                None => guarded(|| kind.run(&s.run_params, &mut ctx)),
                Some(n) => run_parts(kind, store, s, &mut ctx, n, &cancel).and_then(|()| {
                    ctx.portion = Portion::Assemble { count: n };
                    guarded(|| kind.run(&s.run_params, &mut ctx))
                }),
            };
            progress.finish();
            match result {
                Ok(()) => {
                    let resumed = work.resumed;
                    let info = PublishInfo {
                        preimage: &s.preimage,
                        metrics: std::mem::take(&mut ctx.metrics),
                        produced_by: &s.name,
                        started,
                        resumed,
                    };
                    let secs = t0.elapsed().as_secs_f64();
                    tracing::info!("finished {} in {secs:.2}s", s.name);
                    if lock.is_lost() {
                        fail(&"the stage's lock was broken by another machine; nothing was published")
                    } else {
                        // The log stays open through publishing, so a publish error lands in it too.
                        match store.publish(work, info, &lock) {
                            Ok(obj) => Executed::of(Outcome::Done { seconds: secs, resumed }, Some(obj)),
                            Err(e) => fail(&e),
                        }
                    }
                }
                Err(e) => ended(s, e),
            }
        }
    };
    // One close for every outcome (it fsyncs the log wherever the rename put it).
    crate::logging::close(&s.name);
    drop(lock);
    out
}

/// The parts of a split that are not done yet, one after the other, each under its own lock
/// (waiting for parts that other processes compute).
fn run_parts(
    kind: &dyn crate::stage::DynStage,
    store: &Store,
    s: &StagePlan,
    ctx: &mut StageContext,
    count: usize,
    cancel: &Cancel,
) -> Result<(), StageError> {
    for index in 0..count {
        if store.part_done(&s.kind, &s.key, index) {
            continue;
        }
        let Some(lock) = acquire(store, s, cancel, Some(index)).map_err(StageError::other)? else {
            return Err(StageError::Cancelled);
        };
        if store.part_done(&s.kind, &s.key, index) {
            continue;
        }
        tracing::info!("{}: part {index} of {count}", s.name);
        ctx.portion = Portion::Part { index, count };
        guarded(|| kind.run(&s.run_params, ctx))?;
        if lock.is_lost() {
            return Err(StageError::failed(format!(
                "the lock of part {index} was broken by another machine"
            )));
        }
        store.mark_part_done(&s.kind, &s.key, index, &lock).map_err(StageError::other)?;
    }
    Ok(())
}

/// One part of a split, as a job of an array runs it: logged beside the part, never published.
#[allow(clippy::too_many_arguments)]
fn execute_part(
    p: &Pipeline,
    kind: &dyn crate::stage::DynStage,
    store: &Store,
    s: &StagePlan,
    inputs: BTreeMap<String, Vec<Upstream>>,
    device: String,
    cancel: Cancel,
    index: usize,
    lock: &KeyLock,
) -> Executed {
    let fail = |e: &dyn std::fmt::Display| {
        tracing::error!(stage = %s.name, "{e}");
        Executed::of(Outcome::Failed(e.to_string()), None)
    };
    let Some(count) = store.split_count(&s.kind, &s.key) else {
        return fail(&format!(
            "stage `{}` has not been split (no {}/split.json)",
            s.name,
            store.work_root(&s.kind, &s.key).display()
        ));
    };
    if index >= count {
        return fail(&format!(
            "part {index} does not exist: stage `{}` was split into {count} parts",
            s.name
        ));
    }
    if store.part_done(&s.kind, &s.key, index) {
        return Executed::of(Outcome::Cached, None);
    }
    let work = match store.begin(&s.kind, &s.preimage, lock) {
        Ok(w) => w,
        Err(e) => return fail(&e),
    };
    let log = store.part_path(&s.kind, &s.key, index, "log");
    if let Err(e) = crate::logging::open(&s.name, &log) {
        tracing::warn!("cannot open the part log {}: {e}", log.display());
    }
    let progress =
        Progress::for_stage(&s.name, store.part_path(&s.kind, &s.key, index, "progress.json"), work.resumed);
    let mut ctx = context(p, s, &work.scratch, &work.out, work.resumed, inputs, device, &progress, cancel);
    ctx.portion = Portion::Part { index, count };
    tracing::info!(
        "running part {index} of {count} of {} ({}) key {} on {}",
        s.name,
        s.kind,
        s.key.short(),
        ctx.device
    );
    let t0 = Instant::now();
    let result = guarded(|| kind.run(&s.run_params, &mut ctx));
    progress.finish();
    let out = match result {
        Ok(()) if lock.is_lost() => fail(&format!("the lock of part {index} was broken by another machine")),
        Ok(()) => match store.mark_part_done(&s.kind, &s.key, index, lock) {
            Ok(()) => {
                let secs = t0.elapsed().as_secs_f64();
                tracing::info!("finished part {index} of {} in {secs:.2}s", s.name);
                Executed::of(Outcome::Done { seconds: secs, resumed: work.resumed }, None)
            }
            Err(e) => fail(&e),
        },
        Err(e) => ended(s, e),
    };
    crate::logging::close(&s.name);
    out
}

#[allow(clippy::too_many_arguments)]
fn context(
    p: &Pipeline,
    s: &StagePlan,
    scratch: &std::path::Path,
    out: &std::path::Path,
    resumed: bool,
    inputs: BTreeMap<String, Vec<Upstream>>,
    device: String,
    progress: &Progress,
    cancel: Cancel,
) -> StageContext {
    let external = p
        .stage(&s.name)
        .map(|d| d.external.iter().map(|e| (e.role.clone(), e.paths.clone())).collect())
        .unwrap_or_default();
    StageContext {
        name: s.name.clone(),
        key: s.key,
        work_dir: scratch.to_path_buf(),
        out_dir: out.to_path_buf(),
        resumed,
        inputs,
        external,
        device,
        progress: progress.clone(),
        cancel,
        metrics: BTreeMap::new(),
        portion: Portion::Whole,
    }
}

/// Runs stage code, turning a panic into a stage error.
fn guarded<T>(f: impl FnOnce() -> Result<T, StageError>) -> Result<T, StageError> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(StageError::failed(format!("the stage panicked: {msg}")))
    })
}

/// The outcome of a stage error.
fn ended(s: &StagePlan, e: StageError) -> Executed {
    match e {
        StageError::Cancelled => {
            tracing::warn!("{} cancelled; its work dir is kept for resuming", s.name);
            Executed::of(Outcome::Cancelled, None)
        }
        e => {
            let msg = error_chain(&e);
            tracing::error!("{} failed: {msg}", s.name);
            Executed::of(Outcome::Failed(msg), None)
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let cs = c.to_string();
        if !s.contains(&cs) {
            s.push_str(": ");
            s.push_str(&cs);
        }
        cur = c.source();
    }
    s
}
