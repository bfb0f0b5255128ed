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
use crate::stage::{Cancel, DeviceUse, Registry, StageContext, StageError, Upstream};
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
    let selected: BTreeSet<String> = if opts.only.is_empty() {
        plan.stages.iter().map(|s| s.name.clone()).collect()
    } else {
        let mut sel = BTreeSet::new();
        for o in &opts.only {
            if plan.stage(o).is_none() {
                return Err(ExecError::UnknownStage(o.clone()));
            }
            sel.extend(dag.ancestors(o));
        }
        sel
    };

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
            write_json(&record_path, &rec)
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
                        let (outcome, object) = std::panic::catch_unwind(AssertUnwindSafe(|| {
                            execute(p, registry, store, s, upstream, dev, cancel)
                        }))
                        .unwrap_or_else(|_| {
                            (Outcome::Failed("internal error: the executor panicked".into()), None)
                        });
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

fn link(store: &Store, p: &Pipeline, stage: &str, obj: &Object) {
    if let Err(e) = store.link_result(&p.name, stage, obj) {
        tracing::warn!("cannot update results/{}/{stage}: {e}", p.name);
    }
}

fn upstreams(
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

/// Waits for the key's lock, polling so that Ctrl-C still works while another process holds it.
fn acquire(store: &Store, s: &StagePlan, cancel: &Cancel) -> Result<Option<KeyLock>, StoreError> {
    let mut waited = false;
    loop {
        if let Some(l) = store.try_lock(&s.key)? {
            return Ok(Some(l));
        }
        if !waited {
            tracing::info!(stage = %s.name, key = %s.key.short(), "another pipe process is computing this key; waiting for it");
            waited = true;
        }
        if cancel.is_cancelled() {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn execute(
    p: &Pipeline,
    registry: &Registry,
    store: &Store,
    s: &StagePlan,
    inputs: BTreeMap<String, Vec<Upstream>>,
    device: String,
    cancel: Cancel,
) -> (Outcome, Option<Object>) {
    let span = tracing::info_span!("stage", name = %s.name);
    let _enter = span.enter();
    let fail = |e: &dyn std::fmt::Display| {
        tracing::error!(stage = %s.name, "{e}");
        (Outcome::Failed(e.to_string()), None)
    };
    let lock = match acquire(store, s, &cancel) {
        Ok(Some(l)) => l,
        Ok(None) => return (Outcome::Cancelled, None),
        Err(e) => return fail(&e),
    };
    let forced = s.action == Action::Run && s.object.is_some();
    if !forced {
        // Another process may have published it while we waited.
        match store.lookup(&s.kind, &s.key) {
            Ok(Some(obj)) => return (Outcome::Cached, Some(obj)),
            Ok(None) => {}
            Err(e) => return fail(&e),
        }
    } else if let Err(e) = store.discard_partial(&s.kind, &s.key, &lock) {
        return fail(&e);
    }
    let Some(kind) = registry.get(&s.kind) else {
        return fail(&format!("unknown stage kind `{}`", s.kind));
    };
    let work = match store.begin(&s.kind, &s.preimage, &lock) {
        Ok(w) => w,
        Err(e) => return fail(&e),
    };
    if let Err(e) = crate::logging::open(&s.name, &work.log) {
        tracing::warn!("cannot open the stage log {}: {e}", work.log.display());
    }
    let decl = p.stage(&s.name);
    let external = decl
        .map(|d| d.external.iter().map(|e| (e.role.clone(), e.paths.clone())).collect())
        .unwrap_or_default();
    let progress = Progress::for_stage(&s.name, work.progress.clone(), work.resumed);
    let mut ctx = StageContext {
        name: s.name.clone(),
        key: s.key,
        work_dir: work.scratch.clone(),
        out_dir: work.out.clone(),
        resumed: work.resumed,
        inputs,
        external,
        device,
        progress: progress.clone(),
        cancel,
        metrics: BTreeMap::new(),
    };
    tracing::info!(
        "{} {} ({}) key {} on {}",
        if work.resumed { "resuming" } else { "running" },
        s.name,
        s.kind,
        s.key.short(),
        ctx.device
    );
    let t0 = Instant::now();
    let started = SystemTime::now();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| kind.run(&s.run_params, &mut ctx)))
        .unwrap_or_else(|panic| {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(StageError::failed(format!("the stage panicked: {msg}")))
        });
    progress.finish();
    let out = match result {
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
            // The log stays open through publishing, so a publish error lands in it too.
            match store.publish(work, info, &lock) {
                Ok(obj) => (Outcome::Done { seconds: secs, resumed }, Some(obj)),
                Err(e) => fail(&e),
            }
        }
        Err(StageError::Cancelled) => {
            tracing::warn!("{} cancelled; its work dir is kept for resuming", s.name);
            (Outcome::Cancelled, None)
        }
        Err(e) => {
            let msg = error_chain(&e);
            tracing::error!("{} failed: {msg}", s.name);
            (Outcome::Failed(msg), None)
        }
    };
    // One close for every outcome (it fsyncs the log wherever the rename put it).
    crate::logging::close(&s.name);
    drop(lock);
    out
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
