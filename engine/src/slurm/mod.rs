//! The Slurm executor: `pipe run FILE --executor slurm`. This process (the coordinator) plans as
//! usual, then turns every stage it has to run into an `sbatch` job that runs `pipe exec-stage`
//! on a worker, chained with `--dependency=afterok` on its upstreams' jobs. A stage that splits
//! (`cache`) becomes a job array over its parts plus one job that assembles and publishes them.
//! The coordinator watches the queue (`squeue`, then `scontrol`/`sacct` for ended jobs),
//! resubmits a job that was preempted, timed out or died without reporting (its stage resumes
//! from its checkpoints), and records everything under `$DATASTORE/jobs/<pipeline>/`, so that
//! `pipe status` shows the jobs and a later `pipe run` reattaches to jobs still in the queue.
//!
//! Keys, locks, resume and publishing are the local executor's: a job is `exec::execute_one`
//! in another process, and the datastore on a shared filesystem is the only channel between
//! jobs and the coordinator (the job's outcome file, the published object).

pub mod scheduler;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

pub use scheduler::{JobState, Scheduler, SlurmCli};

use crate::config::{Pipeline, SlurmOptions};
use crate::exec::{ExecError, Mode, Outcome, RunSummary};
use crate::graph::Dag;
use crate::plan::{Action, Plan};
use crate::stage::{Cancel, DeviceUse, Registry};
use crate::store::{KeyLock, Store, StoreError, read_json, rfc3339, write_atomic, write_json};

#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot submit {script}: {message} (is Slurm reachable from here: sbatch on PATH, SLURM_CONF?)")]
    Submit { script: PathBuf, message: String },
    #[error(
        "another `pipe run --executor slurm` coordinates pipeline `{pipeline}`{holder}; wait for it, or stop it (Ctrl-C, answering `n` to leave its jobs queued) and run this again to reattach to them"
    )]
    Coordinated { pipeline: String, holder: String },
    #[error("{0}")]
    Other(String),
}

/// What to do with the jobs when the coordinator is interrupted (Ctrl-C, SIGTERM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnInterrupt {
    /// Ask on the terminal (cancel when there is none).
    Ask,
    Cancel,
    /// Leave them queued; a later `pipe run` reattaches.
    Detach,
}

#[derive(Clone, Debug)]
pub struct SlurmRunOptions {
    pub slurm: SlurmOptions,
    pub only: BTreeSet<String>,
    pub cancel: Cancel,
    /// Submit, record and return at once, leaving the jobs to run.
    pub detach: bool,
    pub on_interrupt: OnInterrupt,
    /// The `pipe` binary the jobs run.
    pub binary: PathBuf,
}

/// `jobs/<pipeline>/state.json`: the coordinator's record of its jobs, read by `pipe status`
/// and by the next coordinator.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct JobsFile {
    pub pipeline: String,
    pub file: PathBuf,
    pub coordinator: String,
    /// Whether a coordinator is watching the jobs (false after `--detach` or an exit).
    pub attached: bool,
    pub updated: String,
    pub run_dir: PathBuf,
    pub stages: BTreeMap<String, StageJobs>,
}

/// The jobs of one stage.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StageJobs {
    pub key: String,
    /// `waiting`, `submitted`, `done`, `cached`, `failed`, `cancelled`, `blocked`.
    pub state: String,
    /// Resubmissions so far.
    pub retries: u32,
    pub jobs: Vec<JobRec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One submitted job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRec {
    pub id: String,
    /// `run` (computes, or assembles, and publishes) or `parts` (an array over a split's parts).
    pub role: String,
    /// For `parts`: the part indices the array runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<usize>,
    /// The last state seen.
    pub state: String,
    /// Where `pipe exec-stage` writes how it ended (for `parts`: with `{part}` in the name).
    pub outcome: PathBuf,
    /// The job's stdout and stderr (`%j`/`%A_%a` expanded by Slurm).
    pub log: PathBuf,
}

/// What `pipe exec-stage` writes when it ends.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobOutcome {
    /// `done`, `cached`, `failed`, `cancelled`, `blocked`.
    pub state: String,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub seconds: Option<f64>,
    pub host: String,
    #[serde(default)]
    pub job: Option<String>,
}

impl JobOutcome {
    pub fn from_outcome(o: &Outcome) -> Self {
        let (error, seconds) = match o {
            Outcome::Failed(e) | Outcome::Blocked(e) => (Some(e.clone()), None),
            Outcome::Done { seconds, .. } => (None, Some(*seconds)),
            _ => (None, None),
        };
        JobOutcome {
            state: o.as_str().to_string(),
            error,
            seconds,
            host: crate::lease::hostname(),
            job: std::env::var("SLURM_JOB_ID").ok(),
        }
    }
    pub fn write(&self, path: &Path) -> Result<(), StoreError> {
        write_json(path, self)
    }
}

pub fn jobs_dir(store: &Store, pipeline: &str) -> PathBuf {
    store.root().join("jobs").join(pipeline)
}

/// The jobs file of a pipeline, if a Slurm run ever recorded one.
pub fn read_jobs(store: &Store, pipeline: &str) -> Option<JobsFile> {
    read_json(&jobs_dir(store, pipeline).join("state.json")).ok().flatten()
}

#[derive(Clone, Debug, PartialEq)]
enum TaskState {
    Waiting,
    /// Its `run` job is the last of `jobs`.
    Submitted,
    Ended(Outcome),
}

struct Task {
    name: String,
    state: TaskState,
    retries: u32,
    jobs: Vec<JobRec>,
}

impl Task {
    fn run_job(&self) -> Option<&JobRec> {
        self.jobs.iter().rev().find(|j| j.role == "run")
    }
    fn active_ids(&self) -> Vec<String> {
        self.jobs.iter().filter(|j| JobState::parse(&j.state).is_active()).map(|j| j.id.clone()).collect()
    }
    /// Marks the jobs still queued or running as cancelled (by us) and returns their ids, for
    /// `scancel`.
    fn drop_active(&mut self) -> Vec<String> {
        let ids = self.active_ids();
        for j in &mut self.jobs {
            if JobState::parse(&j.state).is_active() {
                j.state = "CANCELLED".into();
            }
        }
        ids
    }
}

/// Runs the plan's stages as Slurm jobs and waits for them (unless detached).
pub fn run(
    p: &Pipeline,
    registry: &Registry,
    store: &Store,
    plan: &Plan,
    opts: &SlurmRunOptions,
    sched: &dyn Scheduler,
) -> Result<RunSummary, SlurmError> {
    let _coordinator = coordinator_lock(store, &p.name)?;
    let _store_guard = store.lock_shared()?;
    let dag = Dag::new(p);
    let selected = crate::exec::selection(&dag, plan, &opts.only)?;
    let started = SystemTime::now();
    let record_path = store.new_run_path(&p.name, started)?;
    let jobs_root = jobs_dir(store, &p.name);
    let stamp = record_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let run_dir = jobs_root.join(&stamp);
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| SlurmError::Other(format!("cannot create {}: {e}", run_dir.display())))?;
    // The jobs load this snapshot, not the pipeline file: editing the file while jobs wait in the
    // queue must not change what they compute. Paths in it are absolute.
    let snapshot = run_dir.join("pipeline.toml");
    let text = toml::to_string(&p.effective)
        .map_err(|e| SlurmError::Other(format!("cannot snapshot the pipeline: {e}")))?;
    write_atomic(&snapshot, text.as_bytes())?;

    let previous = read_jobs(store, &p.name);
    let mut tasks: Vec<Task> = Vec::new();
    let mut outcomes: BTreeMap<String, Outcome> = BTreeMap::new();
    let mut adopted = 0;
    for s in &plan.stages {
        let state = if !selected.contains(&s.name) {
            TaskState::Ended(Outcome::NotSelected)
        } else if s.action == Action::Skip && s.object.is_some() {
            TaskState::Ended(Outcome::Cached)
        } else {
            TaskState::Waiting
        };
        let mut task = Task { name: s.name.clone(), state, retries: 0, jobs: Vec::new() };
        // Reattach to this stage's jobs of an earlier coordinator, if they are still queued.
        if task.state == TaskState::Waiting
            && let Some(prev) = previous.as_ref().and_then(|f| f.stages.get(&s.name))
            && prev.key == s.key.hex()
            && prev.jobs.iter().any(|j| j.role == "run")
        {
            let ids: Vec<String> = prev.jobs.iter().map(|j| j.id.clone()).collect();
            let states = sched.states(&ids);
            if states.values().any(JobState::is_active) {
                task.jobs = prev.jobs.clone();
                for j in &mut task.jobs {
                    if let Some(st) = states.get(&j.id) {
                        j.state = st.as_str().to_string();
                    }
                }
                task.retries = prev.retries;
                task.state = TaskState::Submitted;
                adopted += 1;
            }
        }
        if let TaskState::Ended(o) = &task.state {
            outcomes.insert(s.name.clone(), o.clone());
        }
        tasks.push(task);
    }
    if adopted > 0 {
        tracing::info!("reattached to the Slurm jobs of {adopted} stage(s) of an earlier run");
    }
    for (name, o) in &outcomes {
        if matches!(o, Outcome::Cached)
            && let Some(obj) = plan.stage(name).and_then(|s| s.object.clone())
        {
            crate::exec::link(store, p, name, &obj);
        }
    }
    let mut c = Coordinator {
        p,
        registry,
        store,
        plan,
        opts,
        sched,
        dag,
        run_dir,
        snapshot,
        jobs_root,
        tasks,
        seconds: BTreeMap::new(),
        started,
        record_path,
    };
    c.save(true, "running");
    let status = match c.drive() {
        Ok(s) => s,
        Err(e) => {
            // A submission failed halfway (the scheduler went away, a bad sbatch option): what was
            // queued by this run is cancelled rather than left to run unwatched.
            let ids: Vec<String> = c.tasks.iter_mut().flat_map(Task::drop_active).collect();
            if !ids.is_empty() {
                tracing::warn!("cancelling the job(s) already queued: {}", ids.join(","));
                c.sched.cancel(&ids);
            }
            for t in &mut c.tasks {
                if matches!(t.state, TaskState::Waiting | TaskState::Submitted) {
                    t.state = TaskState::Ended(Outcome::Cancelled);
                }
            }
            c.save(false, "failed");
            return Err(e);
        }
    };
    // Interrupted, whether its jobs were cancelled or left running.
    let summary = c.summary(c.opts.cancel.is_cancelled());
    c.save(status == "running", if status == "running" { "detached" } else { status });
    Ok(summary)
}

/// One coordinator per pipeline and datastore at a time, across login nodes (a lease).
fn coordinator_lock(store: &Store, pipeline: &str) -> Result<KeyLock, SlurmError> {
    match store.try_lock_coordinator(pipeline)? {
        Some(l) => Ok(l),
        None => {
            let holder = store
                .coordinator_holder(pipeline)
                .map(|h| format!(" ({})", h.describe()))
                .unwrap_or_default();
            Err(SlurmError::Coordinated { pipeline: pipeline.to_string(), holder })
        }
    }
}

struct Coordinator<'a> {
    p: &'a Pipeline,
    registry: &'a Registry,
    store: &'a Store,
    plan: &'a Plan,
    opts: &'a SlurmRunOptions,
    sched: &'a dyn Scheduler,
    dag: Dag,
    run_dir: PathBuf,
    snapshot: PathBuf,
    jobs_root: PathBuf,
    tasks: Vec<Task>,
    seconds: BTreeMap<String, f64>,
    started: SystemTime,
    record_path: PathBuf,
}

/// The resources of one stage's jobs.
struct Resources {
    partition: Option<String>,
    gpus: u32,
    cpus: Option<u32>,
    mem: Option<String>,
    time: Option<String>,
    extra: Vec<String>,
    array_size: usize,
}

impl Coordinator<'_> {
    /// Submits and watches until every task ended; returns the run's status.
    fn drive(&mut self) -> Result<&'static str, SlurmError> {
        let poll = Duration::from_secs_f64(self.opts.slurm.poll_seconds.max(0.05));
        loop {
            if self.opts.cancel.is_cancelled() {
                return Ok(self.interrupted());
            }
            self.submit_ready()?;
            self.save(true, "running");
            if self.opts.detach {
                let n: usize = self.tasks.iter().map(|t| t.active_ids().len()).sum();
                eprintln!(
                    "detached: {n} Slurm job(s) queued; `pipe status {}` shows them, `pipe run {} --executor slurm` reattaches",
                    self.p.file.display(),
                    self.p.file.display()
                );
                return Ok("running");
            }
            if self.tasks.iter().all(|t| matches!(t.state, TaskState::Ended(_))) {
                let ok = self.tasks.iter().all(|t| matches!(&t.state, TaskState::Ended(o) if o.is_ok()));
                return Ok(if ok { "ok" } else { "failed" });
            }
            let t0 = Instant::now();
            while t0.elapsed() < poll && !self.opts.cancel.is_cancelled() {
                std::thread::sleep(Duration::from_millis(50).min(poll));
            }
            if self.opts.cancel.is_cancelled() {
                continue;
            }
            self.poll();
        }
    }

    fn task(&self, name: &str) -> &Task {
        self.tasks.iter().find(|t| t.name == name).expect("a task per stage")
    }

    fn task_mut(&mut self, name: &str) -> &mut Task {
        self.tasks.iter_mut().find(|t| t.name == name).expect("a task per stage")
    }

    fn resources(&self, stage: &str) -> Resources {
        let g = &self.opts.slurm;
        let o = g.stages.get(stage).cloned().unwrap_or_default();
        let accel = self
            .plan
            .stage(stage)
            .and_then(|s| self.registry.get(&s.kind))
            .is_some_and(|k| k.device() == DeviceUse::Accelerator);
        let mut extra = g.sbatch_args.clone();
        extra.extend(o.sbatch_args.iter().cloned());
        Resources {
            partition: o.partition.or_else(|| g.partition.clone()),
            gpus: if accel { o.gpus_per_job.unwrap_or(g.gpus_per_job) } else { 0 },
            cpus: o.cpus_per_task.or(g.cpus_per_task),
            mem: o.mem.or_else(|| g.mem.clone()),
            time: o.time.or_else(|| g.time.clone()),
            extra,
            array_size: o.array_size.unwrap_or(g.array_size).max(1),
        }
    }

    /// Submits every waiting task whose upstreams are done or submitted.
    fn submit_ready(&mut self) -> Result<(), SlurmError> {
        for i in 0..self.tasks.len() {
            if self.tasks[i].state != TaskState::Waiting {
                continue;
            }
            let name = self.tasks[i].name.clone();
            let parents = self.dag.parents(&name);
            let mut deps = Vec::new();
            let mut upstream_running = false;
            let mut ready = true;
            for u in &parents {
                let t = self.task(u);
                match &t.state {
                    TaskState::Ended(Outcome::Cached | Outcome::Done { .. } | Outcome::NotSelected) => {}
                    TaskState::Submitted => {
                        deps.push(t.run_job().map(|j| j.id.clone()).unwrap_or_default());
                        upstream_running = true;
                    }
                    _ => ready = false,
                }
            }
            if !ready {
                continue;
            }
            self.submit(&name, &deps, upstream_running)?;
        }
        Ok(())
    }

    fn submit(&mut self, name: &str, deps: &[String], upstream_running: bool) -> Result<(), SlurmError> {
        let s = self.plan.stage(name).expect("planned").clone();
        let res = self.resources(name);
        let splits = self.registry.get(&s.kind).is_some_and(|k| k.splits());
        let attempt = self.task(name).retries;
        let forced = s.action == Action::Run && s.object.is_some();
        if forced && attempt == 0 && self.task(name).jobs.is_empty() {
            // `--force`: start from nothing once, here; the jobs then keep what they compute.
            let lock = self.store.lock(&s.key)?;
            self.store.discard_partial(&s.kind, &s.key, &lock)?;
        }
        let mut parts: Vec<usize> = Vec::new();
        // A stage that splits is split here, on the coordinator's machine (for `cache`: reading
        // and tokenizing the dataset, no model), once its inputs are published, so that the
        // array and everything after it can be queued at once.
        if splits && res.array_size > 1 && !upstream_running {
            let count = match self.store.split_count(&s.kind, &s.key) {
                Some(n) => n,
                None => {
                    tracing::info!("{name}: splitting into at most {} parts for a job array", res.array_size);
                    let done = crate::exec::execute_one(
                        self.p,
                        self.registry,
                        self.store,
                        self.plan,
                        name,
                        "cpu".into(),
                        self.opts.cancel.clone(),
                        Mode::Split { max_parts: res.array_size },
                    )?;
                    match (&done.outcome, done.parts) {
                        (Outcome::Cached, _) => {
                            if let Some(obj) = &done.object {
                                crate::exec::link(self.store, self.p, name, obj);
                            }
                            self.task_mut(name).state = TaskState::Ended(Outcome::Cached);
                            return Ok(());
                        }
                        (Outcome::Done { .. }, Some(n)) => n,
                        (Outcome::Cancelled, _) => return Ok(()),
                        (o, _) => {
                            let why = match o {
                                Outcome::Failed(e) => e.clone(),
                                o => o.as_str().to_string(),
                            };
                            self.end(name, Outcome::Failed(format!("splitting failed: {why}")));
                            return Ok(());
                        }
                    }
                }
            };
            if count > 1 {
                parts = (0..count).filter(|&i| !self.store.part_done(&s.kind, &s.key, i)).collect();
            }
        }
        let mut jobs = Vec::new();
        let mut run_deps: Vec<String> = deps.iter().map(|d| format!("afterok:{d}")).collect();
        if !parts.is_empty() {
            let outcome = self.run_dir.join(format!("{name}.{attempt}.part-{{part}}.outcome.json"));
            let log = self.run_dir.join(format!("{name}.{attempt}.parts-%A_%a.out"));
            let script = self.write_script(name, &s.key.hex(), &res, &log, &outcome, true)?;
            let list: Vec<String> = parts.iter().map(|i| i.to_string()).collect();
            let mut args = vec![format!("--array={}", list.join(","))];
            if !deps.is_empty() {
                args.push(format!(
                    "--dependency={}",
                    deps.iter().map(|d| format!("afterok:{d}")).collect::<Vec<_>>().join(",")
                ));
            }
            let id = self.sched.submit(&script, &args)?;
            tracing::info!("{name}: submitted parts {} as job array {id}", compact(&parts));
            // The assembling job runs after every part ended however it ended: it computes any
            // part that failed itself (or fails with that part's error).
            run_deps.push(format!("afterany:{id}"));
            jobs.push(JobRec {
                id,
                role: "parts".into(),
                parts: parts.clone(),
                state: "PENDING".into(),
                outcome,
                log,
            });
        }
        let outcome = self.run_dir.join(format!("{name}.{attempt}.outcome.json"));
        let log = self.run_dir.join(format!("{name}.{attempt}-%j.out"));
        let script = self.write_script(name, &s.key.hex(), &res, &log, &outcome, false)?;
        let mut args = Vec::new();
        if !run_deps.is_empty() {
            args.push(format!("--dependency={}", run_deps.join(",")));
        }
        let id = self.sched.submit(&script, &args)?;
        tracing::info!(
            "{name}: submitted job {id}{}",
            if run_deps.is_empty() { String::new() } else { format!(" ({})", run_deps.join(",")) }
        );
        jobs.push(JobRec {
            id,
            role: "run".into(),
            parts: Vec::new(),
            state: "PENDING".into(),
            outcome,
            log,
        });
        let t = self.task_mut(name);
        t.jobs.extend(jobs);
        t.state = TaskState::Submitted;
        Ok(())
    }

    /// The batch script of one stage's jobs (kept in the run dir, for the curious and for
    /// resubmission by hand).
    fn write_script(
        &self,
        name: &str,
        key: &str,
        res: &Resources,
        log: &Path,
        outcome: &Path,
        parts: bool,
    ) -> Result<PathBuf, SlurmError> {
        let q = |s: &str| shell_quote(s);
        let mut lines = vec!["#!/bin/bash".to_string()];
        let mut opt = |o: String| lines.push(format!("#SBATCH {o}"));
        opt(format!("--job-name=pipe:{}:{name}", self.p.name));
        opt(format!("--output={}", log.display()));
        opt("--open-mode=append".into());
        // The coordinator resubmits; Slurm's own requeue would reuse the id behind its back.
        opt("--no-requeue".into());
        opt("--kill-on-invalid-dep=yes".into());
        if let Some(p) = &res.partition {
            opt(format!("--partition={p}"));
        }
        if res.gpus > 0 {
            opt(format!("--gpus={}", res.gpus));
        }
        if let Some(c) = res.cpus {
            opt(format!("--cpus-per-task={c}"));
        }
        if let Some(m) = &res.mem {
            opt(format!("--mem={m}"));
        }
        if let Some(t) = &res.time {
            opt(format!("--time={t}"));
        }
        for e in &res.extra {
            opt(e.clone());
        }
        let device = if res.gpus > 0 { self.opts.slurm.device.clone() } else { "cpu".into() };
        let outcome_s = outcome.to_string_lossy().replace("{part}", "${SLURM_ARRAY_TASK_ID}");
        let mut cmd = format!(
            "exec {} --datastore {} exec-stage {} --stage {} --key {} --device {} --outcome \"{}\"",
            q(&self.opts.binary.to_string_lossy()),
            q(&self.store.root().to_string_lossy()),
            q(&self.snapshot.to_string_lossy()),
            q(name),
            key,
            q(&device),
            outcome_s,
        );
        if parts {
            cmd.push_str(" --part \"${SLURM_ARRAY_TASK_ID}\"");
        }
        if self.plan.stage(name).is_some_and(|s| s.action == Action::Run && s.object.is_some()) {
            cmd.push_str(" --force");
        }
        lines.push(format!("# stage `{name}` of pipeline `{}` ({})", self.p.name, self.p.file.display()));
        lines.push(cmd);
        let path = self.run_dir.join(format!("{name}{}.sh", if parts { ".parts" } else { "" }));
        write_atomic(&path, (lines.join("\n") + "\n").as_bytes())?;
        Ok(path)
    }

    /// One look at the queue: update job states and act on jobs that ended.
    fn poll(&mut self) {
        let ids: Vec<String> = self.tasks.iter().flat_map(|t| t.active_ids()).collect();
        if ids.is_empty() {
            return;
        }
        let states = self.sched.states(&ids);
        let mut ended_runs = Vec::new();
        for t in &mut self.tasks {
            for j in &mut t.jobs {
                if let Some(st) = states.get(&j.id) {
                    let was_active = JobState::parse(&j.state).is_active();
                    if j.state != st.as_str() {
                        tracing::debug!("{}: job {} {}", t.name, j.id, st.as_str());
                    }
                    j.state = st.as_str().to_string();
                    if was_active && !st.is_active() && j.role == "run" && t.state == TaskState::Submitted {
                        ended_runs.push((t.name.clone(), j.clone(), st.clone()));
                    }
                }
            }
        }
        for (name, job, state) in ended_runs {
            // Handling an earlier one may have requeued this stage (its job was waiting on a job
            // that is being resubmitted): its cancellation is ours, not an end.
            let t = self.task(&name);
            if t.state != TaskState::Submitted || t.run_job().map(|j| &j.id) != Some(&job.id) {
                continue;
            }
            self.job_ended(&name, &job, &state);
        }
    }

    fn job_ended(&mut self, name: &str, job: &JobRec, state: &JobState) {
        let s = self.plan.stage(name).expect("planned");
        let outcome: Option<JobOutcome> = read_json(&job.outcome).ok().flatten();
        // A forced stage's old object is there all along: only the job's word counts for it.
        let forced = s.action == Action::Run && s.object.is_some();
        let reported_ok = outcome.as_ref().is_some_and(|o| matches!(o.state.as_str(), "done" | "cached"));
        let published = self.store.lookup(&s.kind, &s.key).ok().flatten().filter(|_| reported_ok || !forced);
        if let Some(obj) = published {
            crate::exec::link(self.store, self.p, name, &obj);
            let seconds = outcome.as_ref().and_then(|o| o.seconds);
            let o = match outcome.as_ref().map(|o| o.state.as_str()) {
                Some("cached") => Outcome::Cached,
                _ => Outcome::Done { seconds: seconds.unwrap_or(0.0), resumed: self.task(name).retries > 0 },
            };
            if let Some(sec) = seconds {
                self.seconds.insert(name.to_string(), sec);
            }
            tracing::info!("{name}: job {} {} ({})", job.id, o.as_str(), state.as_str());
            self.end(name, o);
            return;
        }
        let log = job.log.to_string_lossy().replace("%j", &job.id);
        // The stage itself failed: another attempt would fail the same way.
        if let Some(o) = &outcome
            && o.state == "failed"
        {
            let e = o.error.clone().unwrap_or_else(|| "failed".into());
            self.end(name, Outcome::Failed(format!("{e} (Slurm job {}, log {log})", job.id)));
            return;
        }
        if *state == JobState::Cancelled {
            self.end(
                name,
                Outcome::Failed(format!(
                    "Slurm job {} was cancelled; its work dir is kept, `pipe run` again resumes it",
                    job.id
                )),
            );
            return;
        }
        let retries = self.task(name).retries;
        if state.is_retryable() && retries < self.opts.slurm.max_retries {
            tracing::warn!(
                "{name}: Slurm job {} ended {} without finishing the stage; resubmitting ({} of {} retries; it resumes from its checkpoints)",
                job.id,
                state.as_str(),
                retries + 1,
                self.opts.slurm.max_retries
            );
            self.requeue_dependents(name);
            let t = self.task_mut(name);
            t.retries += 1;
            t.state = TaskState::Waiting;
            t.drop_active();
            return;
        }
        let why = match (state, retries) {
            (s, r) if s.is_retryable() && r > 0 => {
                format!("Slurm job {} ended {} after {r} resubmission(s) (log {log})", job.id, s.as_str())
            }
            (s, _) => {
                format!("Slurm job {} ended {} without publishing the stage (log {log})", job.id, s.as_str())
            }
        };
        self.end(name, Outcome::Failed(why));
    }

    /// A resubmitted stage gets new job ids, so its queued descendants (waiting on the old ones)
    /// are cancelled and submitted again after it.
    fn requeue_dependents(&mut self, name: &str) {
        let mut ids = Vec::new();
        for d in self.dag.descendants(name) {
            if d == name {
                continue;
            }
            let t = self.task_mut(&d);
            if t.state == TaskState::Submitted {
                ids.extend(t.drop_active());
                t.state = TaskState::Waiting;
            }
        }
        self.sched.cancel(&ids);
    }

    /// Ends a task; a task that did not succeed blocks its descendants (and cancels their jobs).
    fn end(&mut self, name: &str, o: Outcome) {
        let failed = !o.is_ok();
        self.task_mut(name).state = TaskState::Ended(o.clone());
        if failed {
            tracing::error!(
                "{name}: {}",
                match &o {
                    Outcome::Failed(e) => e.clone(),
                    o => o.as_str().to_string(),
                }
            );
            let why = format!("upstream `{name}` {}", o.as_str());
            let mut cancel = Vec::new();
            for d in self.dag.descendants(name) {
                if d == name {
                    continue;
                }
                let t = self.task_mut(&d);
                if matches!(t.state, TaskState::Waiting | TaskState::Submitted) {
                    cancel.extend(t.drop_active());
                    t.state = TaskState::Ended(Outcome::Blocked(why.clone()));
                }
            }
            self.sched.cancel(&cancel);
        }
    }

    /// Ctrl-C: cancel the jobs or leave them queued. Returns the run's status.
    fn interrupted(&mut self) -> &'static str {
        let ids: Vec<String> = self.tasks.iter().flat_map(|t| t.active_ids()).collect();
        if ids.is_empty() {
            return "cancelled";
        }
        let action = match self.opts.on_interrupt {
            OnInterrupt::Ask if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() => {
                crate::progress::suspend(|| {
                    eprint!(
                        "cancel the {} queued or running Slurm job(s) of this run ({})? [y/N] (N leaves them running; `pipe run` again reattaches) ",
                        ids.len(),
                        ids.join(",")
                    );
                    let _ = std::io::stderr().flush();
                });
                let mut line = String::new();
                let _ = std::io::stdin().lock().read_line(&mut line);
                if line.trim().eq_ignore_ascii_case("y") || line.trim().eq_ignore_ascii_case("yes") {
                    OnInterrupt::Cancel
                } else {
                    OnInterrupt::Detach
                }
            }
            OnInterrupt::Ask => OnInterrupt::Cancel,
            other => other,
        };
        if action == OnInterrupt::Detach {
            eprintln!(
                "left {} Slurm job(s) running; `pipe run {} --executor slurm` reattaches",
                ids.len(),
                self.p.file.display()
            );
            return "running";
        }
        eprintln!("cancelling Slurm job(s) {}", ids.join(","));
        self.sched.cancel(&ids);
        for t in &mut self.tasks {
            t.drop_active();
            if matches!(t.state, TaskState::Waiting | TaskState::Submitted) {
                t.state = TaskState::Ended(Outcome::Cancelled);
            }
        }
        "cancelled"
    }

    fn outcomes(&self) -> BTreeMap<String, Outcome> {
        self.tasks
            .iter()
            .filter_map(|t| match &t.state {
                TaskState::Ended(o) => Some((t.name.clone(), o.clone())),
                _ => None,
            })
            .collect()
    }

    fn summary(&self, cancelled: bool) -> RunSummary {
        let outcomes = self.outcomes();
        RunSummary {
            stages: self
                .plan
                .stages
                .iter()
                .map(|s| {
                    let o = outcomes.get(&s.name).cloned().unwrap_or_else(|| {
                        let ids = self.task(&s.name).active_ids();
                        if ids.is_empty() {
                            Outcome::Blocked("not submitted".into())
                        } else {
                            Outcome::Queued(ids.join(","))
                        }
                    });
                    (s.name.clone(), o)
                })
                .collect(),
            record: self.record_path.clone(),
            cancelled,
        }
    }

    /// Writes the jobs file and the run record.
    fn save(&self, attached: bool, status: &str) {
        let file = JobsFile {
            pipeline: self.p.name.clone(),
            file: self.p.file.clone(),
            coordinator: format!("{} pid {}", crate::lease::hostname(), std::process::id()),
            attached,
            updated: rfc3339(SystemTime::now()),
            run_dir: self.run_dir.clone(),
            stages: self
                .tasks
                .iter()
                .filter(|t| !matches!(t.state, TaskState::Ended(Outcome::NotSelected)))
                .map(|t| {
                    let key = self.plan.stage(&t.name).map(|s| s.key.hex()).unwrap_or_default();
                    let (state, error) = match &t.state {
                        TaskState::Waiting => ("waiting".to_string(), None),
                        TaskState::Submitted => ("submitted".to_string(), None),
                        TaskState::Ended(o) => (
                            o.as_str().to_string(),
                            match o {
                                Outcome::Failed(e) | Outcome::Blocked(e) => Some(e.clone()),
                                _ => None,
                            },
                        ),
                    };
                    (
                        t.name.clone(),
                        StageJobs { key, state, retries: t.retries, jobs: t.jobs.clone(), error },
                    )
                })
                .collect(),
        };
        if let Err(e) = write_json(&self.jobs_root.join("state.json"), &file) {
            tracing::warn!("cannot write the jobs file: {e}");
        }
        let outcomes = self.outcomes();
        if let Err(e) = crate::exec::write_run_record(
            &self.record_path,
            self.p,
            self.plan,
            self.started,
            &outcomes,
            &self.seconds,
            status,
        ) {
            tracing::warn!("cannot update the run record: {e}");
        }
    }
}

/// `0-3,5,7-8` for a sorted list of indices.
fn compact(v: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j { v[i].to_string() } else { format!("{}-{}", v[i], v[j]) });
        i = j + 1;
    }
    out.join(",")
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-:+=@".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The Slurm view of a pipeline's stages for `pipe status`: the recorded jobs of each stage at
/// its current key, with states asked of the scheduler where it answers.
pub fn status(
    store: &Store,
    p: &Pipeline,
    plan: &Plan,
    sched: &dyn Scheduler,
) -> Option<(JobsFile, BTreeMap<String, StageJobs>)> {
    let mut file = read_jobs(store, &p.name)?;
    // A coordinator killed hard left `attached`; its lease says whether it is alive.
    file.attached &= store.coordinator_holder(&p.name).is_some_and(|h| !h.is_stale());
    let mut out = BTreeMap::new();
    for s in &plan.stages {
        if let Some(sj) = file.stages.get(&s.name)
            && sj.key == s.key.hex()
        {
            out.insert(s.name.clone(), sj.clone());
        }
    }
    let ids: Vec<String> = out
        .values()
        .flat_map(|sj| sj.jobs.iter())
        .filter(|j| JobState::parse(&j.state).is_active())
        .map(|j| j.id.clone())
        .collect();
    let live = sched.states(&ids);
    for sj in out.values_mut() {
        for j in &mut sj.jobs {
            // Gone: purged, or no Slurm reachable from here; the recorded state is all we know.
            if let Some(st) = live.get(&j.id).filter(|s| **s != JobState::Gone) {
                j.state = st.as_str().to_string();
            }
        }
    }
    Some((file, out))
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn compact_ranges_and_quoting() {
        assert_eq!(compact(&[0, 1, 2, 3, 5, 7, 8]), "0-3,5,7-8");
        assert_eq!(compact(&[4]), "4");
        assert_eq!(shell_quote("/a/b-c_d.toml"), "/a/b-c_d.toml");
        assert_eq!(shell_quote("/my data/it's"), "'/my data/it'\\''s'");
    }
}
