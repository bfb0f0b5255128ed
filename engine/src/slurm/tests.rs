//! The coordinator against a fake scheduler that runs each job in-process (`execute_one`) once
//! its `afterok` dependencies completed, or ends it the way a test says (node failure, time
//! limit, a stage error), so retries, requeued dependents and blocked descendants can be
//! checked without a cluster. The real Slurm is exercised by `tests/e2e/slurm.rs`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::*;
use crate::config::tests::kinds;
use crate::plan::PlanOptions;

/// How the fake ends the `n`-th job (0-based) of a stage instead of running it.
type Script = BTreeMap<(String, usize), JobState>;

struct FakeJob {
    stage: String,
    deps: Vec<String>,
    state: JobState,
    outcome: PathBuf,
}

struct Fake<'a> {
    p: &'a Pipeline,
    registry: &'a Registry,
    store: &'a Store,
    plan: &'a Plan,
    script: Script,
    jobs: RefCell<BTreeMap<u64, FakeJob>>,
    submitted: RefCell<Vec<(String, Vec<String>)>>,
    cancelled: RefCell<Vec<String>>,
    /// Pressed (Ctrl-C) once this many jobs were submitted.
    interrupt_after: Option<(usize, Cancel)>,
    /// `sbatch` fails after this many jobs were submitted.
    refuse_after: Option<usize>,
}

fn arg_after(script: &str, flag: &str) -> String {
    let i = script.find(flag).unwrap_or_else(|| panic!("{flag} in {script}")) + flag.len() + 1;
    script[i..].split_whitespace().next().unwrap().trim_matches('"').to_string()
}

impl Scheduler for Fake<'_> {
    fn submit(&self, script: &Path, args: &[String]) -> Result<String, SlurmError> {
        if self.refuse_after == Some(self.submitted.borrow().len()) {
            return Err(SlurmError::Submit {
                script: script.into(),
                message: "sbatch: error: invalid partition".into(),
            });
        }
        let text = std::fs::read_to_string(script).unwrap();
        let stage = arg_after(&text, "--stage");
        let outcome = PathBuf::from(arg_after(&text, "--outcome"));
        let deps: Vec<String> = args
            .iter()
            .filter_map(|a| a.strip_prefix("--dependency="))
            .flat_map(|d| d.split(','))
            .filter_map(|d| d.strip_prefix("afterok:"))
            .map(str::to_string)
            .collect();
        let mut jobs = self.jobs.borrow_mut();
        let id = jobs.len() as u64 + 100;
        jobs.insert(id, FakeJob { stage: stage.clone(), deps, state: JobState::Pending, outcome });
        self.submitted.borrow_mut().push((stage, args.to_vec()));
        if let Some((n, cancel)) = &self.interrupt_after
            && self.submitted.borrow().len() == *n
        {
            cancel.cancel();
        }
        Ok(id.to_string())
    }

    fn states(&self, ids: &[String]) -> BTreeMap<String, JobState> {
        // Run every job whose dependencies completed, in id order, as Slurm would.
        loop {
            let ready = {
                let jobs = self.jobs.borrow();
                jobs.iter()
                    .find(|(_, j)| {
                        j.state == JobState::Pending
                            && j.deps
                                .iter()
                                .all(|d| jobs[&d.parse::<u64>().unwrap()].state == JobState::Completed)
                    })
                    .map(|(id, j)| (*id, j.stage.clone(), j.outcome.clone()))
            };
            let Some((id, stage, outcome)) = ready else { break };
            let nth = self.jobs.borrow().iter().filter(|(i, j)| j.stage == stage && **i < id).count();
            let state = match self.script.get(&(stage.clone(), nth)) {
                Some(JobState::Failed) => {
                    // The stage itself failed and said so.
                    JobOutcome {
                        state: "failed".into(),
                        error: Some("the stage broke".into()),
                        seconds: None,
                        host: "node1".into(),
                        job: Some(id.to_string()),
                    }
                    .write(&outcome)
                    .unwrap();
                    JobState::Failed
                }
                Some(s) => s.clone(),
                None => {
                    let done = crate::exec::execute_one(
                        self.p,
                        self.registry,
                        self.store,
                        self.plan,
                        &stage,
                        "cpu".into(),
                        Cancel::new(),
                        Mode::Whole,
                    )
                    .unwrap();
                    JobOutcome::from_outcome(&done.outcome).write(&outcome).unwrap();
                    if done.outcome.is_ok() { JobState::Completed } else { JobState::Failed }
                }
            };
            self.jobs.borrow_mut().get_mut(&id).unwrap().state = state;
        }
        // Jobs waiting on a job that did not complete are cancelled (--kill-on-invalid-dep).
        let mut jobs = self.jobs.borrow_mut();
        let dead: Vec<u64> = jobs
            .iter()
            .filter(|(_, j)| {
                j.state == JobState::Pending
                    && j.deps.iter().any(|d| {
                        let s = &jobs[&d.parse::<u64>().unwrap()].state;
                        !s.is_active() && *s != JobState::Completed
                    })
            })
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            jobs.get_mut(&id).unwrap().state = JobState::Cancelled;
        }
        ids.iter().map(|id| (id.clone(), jobs[&id.parse::<u64>().unwrap()].state.clone())).collect()
    }

    fn cancel(&self, ids: &[String]) {
        let mut jobs = self.jobs.borrow_mut();
        for id in ids {
            self.cancelled.borrow_mut().push(id.clone());
            if let Some(j) = jobs.get_mut(&id.parse::<u64>().unwrap())
                && j.state.is_active()
            {
                j.state = JobState::Cancelled;
            }
        }
    }
}

/// source `a` → train `t` → sink `s`, in a temporary folder with its datastore.
struct Setup {
    _dir: tempfile::TempDir,
    p: Pipeline,
    registry: Registry,
    store: Store,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rows.jsonl"), "{}\n").unwrap();
    let file = dir.path().join("p.toml");
    let text = r#"
[pipeline]
name = "chain"

[stages.a]
kind = "source"
seed = 1
data = "rows.jsonl"

[stages.t]
kind = "train"
k = 4
activations = ["a"]

[stages.s]
kind = "sink"
from = "t"
"#;
    std::fs::write(&file, text).unwrap();
    let registry = kinds::registry();
    let p = crate::config::load(&file, &[], &registry).unwrap();
    let store = Store::open(&dir.path().join("ds")).unwrap();
    Setup { _dir: dir, p, registry, store }
}

/// The summary, the submissions (stage, extra sbatch arguments) and the cancelled job ids.
type Ran = (RunSummary, Vec<(String, Vec<String>)>, Vec<String>);

fn go(s: &Setup, script: Script, max_retries: u32) -> Ran {
    go_with(s, script, max_retries, None)
}

fn go_with(s: &Setup, script: Script, max_retries: u32, interrupt_after: Option<usize>) -> Ran {
    try_go(s, script, max_retries, interrupt_after, None).unwrap()
}

fn try_go(
    s: &Setup,
    script: Script,
    max_retries: u32,
    interrupt_after: Option<usize>,
    refuse_after: Option<usize>,
) -> Result<Ran, (SlurmError, Vec<String>)> {
    let cancel = Cancel::new();
    let plan = crate::plan::plan(&s.p, &s.registry, &s.store, &PlanOptions::default()).unwrap();
    let fake = Fake {
        p: &s.p,
        registry: &s.registry,
        store: &s.store,
        plan: &plan,
        script,
        jobs: RefCell::new(BTreeMap::new()),
        submitted: RefCell::new(Vec::new()),
        cancelled: RefCell::new(Vec::new()),
        interrupt_after: interrupt_after.map(|n| (n, cancel.clone())),
        refuse_after,
    };
    let opts = SlurmRunOptions {
        slurm: SlurmOptions { poll_seconds: 0.01, max_retries, ..SlurmOptions::default() },
        only: Default::default(),
        cancel,
        detach: false,
        on_interrupt: OnInterrupt::Cancel,
        binary: PathBuf::from("/opt/pipe"),
    };
    match run(&s.p, &s.registry, &s.store, &plan, &opts, &fake) {
        Ok(summary) => Ok((summary, fake.submitted.into_inner(), fake.cancelled.into_inner())),
        Err(e) => Err((e, fake.cancelled.into_inner())),
    }
}

fn outcome<'a>(s: &'a RunSummary, name: &str) -> &'a Outcome {
    &s.stages.iter().find(|(n, _)| n == name).unwrap().1
}

#[test]
fn every_stage_is_one_job_chained_with_afterok() {
    let s = setup();
    let (summary, submitted, _) = go(&s, Script::new(), 2);
    assert!(summary.ok(), "{summary:?}");
    let names: Vec<&str> = submitted.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a", "t", "s"]);
    assert!(submitted[0].1.is_empty(), "a source waits for nothing");
    assert_eq!(submitted[1].1, ["--dependency=afterok:100"]);
    assert_eq!(submitted[2].1, ["--dependency=afterok:101"]);
    // The script runs the given binary on the snapshot, with the planned key.
    let file = read_jobs(&s.store, "chain").unwrap();
    let script = std::fs::read_to_string(file.run_dir.join("t.sh")).unwrap();
    assert!(script.contains("exec /opt/pipe --datastore") && script.contains("exec-stage"), "{script}");
    assert!(script.contains("#SBATCH --no-requeue") && !script.contains("--gpus"), "{script}");
    assert_eq!(file.stages["t"].state, "done");
    assert!(!file.attached);
    // A second run finds everything cached and submits nothing.
    let (summary, submitted, _) = go(&s, Script::new(), 2);
    assert!(summary.ok());
    assert!(submitted.is_empty());
}

#[test]
fn a_lost_job_is_resubmitted_and_its_queued_dependents_requeued() {
    let s = setup();
    let script = Script::from([(("a".to_string(), 0), JobState::NodeFail)]);
    let (summary, submitted, _) = go(&s, script, 2);
    assert!(summary.ok(), "{summary:?}");
    let names: Vec<&str> = submitted.iter().map(|(n, _)| n.as_str()).collect();
    // The first t and s (waiting on the lost job) were dropped; the new ones wait on the new a.
    assert_eq!(names, ["a", "t", "s", "a", "t", "s"], "{submitted:?}");
    assert_eq!(submitted[4].1, ["--dependency=afterok:103"]);
    let file = read_jobs(&s.store, "chain").unwrap();
    assert_eq!(file.stages["a"].retries, 1);
    assert_eq!(file.stages["a"].jobs.len(), 2);
}

#[test]
fn a_stage_error_is_not_retried_and_blocks_the_descendants() {
    let s = setup();
    let script = Script::from([(("t".to_string(), 0), JobState::Failed)]);
    let (summary, submitted, _) = go(&s, script, 2);
    assert!(!summary.ok());
    assert!(matches!(outcome(&summary, "a"), Outcome::Done { .. }));
    match outcome(&summary, "t") {
        Outcome::Failed(e) => assert!(e.contains("the stage broke") && e.contains("Slurm job 101"), "{e}"),
        o => panic!("{o:?}"),
    }
    assert!(matches!(outcome(&summary, "s"), Outcome::Blocked(e) if e.contains("upstream `t` failed")));
    assert_eq!(submitted.len(), 3, "no resubmission: {submitted:?}");
}

#[test]
fn retries_are_bounded() {
    let s = setup();
    let script =
        Script::from([(("t".to_string(), 0), JobState::Timeout), (("t".to_string(), 1), JobState::Timeout)]);
    let (summary, _, _) = go(&s, script, 1);
    match outcome(&summary, "t") {
        Outcome::Failed(e) => assert!(e.contains("ended TIMEOUT after 1 resubmission"), "{e}"),
        o => panic!("{o:?}"),
    }
    // Cancelled by someone: reported as such, never retried.
    let s = setup();
    let (summary, submitted, _) = go(&s, Script::from([(("a".to_string(), 0), JobState::Cancelled)]), 2);
    assert!(matches!(outcome(&summary, "a"), Outcome::Failed(e) if e.contains("was cancelled")));
    assert_eq!(submitted.len(), 3);
}

#[test]
fn ctrl_c_cancels_the_queued_jobs_when_told_to() {
    let s = setup();
    let (summary, submitted, cancelled) = go_with(&s, Script::new(), 2, Some(3));
    assert!(summary.cancelled);
    assert_eq!(submitted.len(), 3);
    assert_eq!(cancelled, ["100", "101", "102"]);
    for (name, o) in &summary.stages {
        assert_eq!(o, &Outcome::Cancelled, "{name}");
    }
    let file = read_jobs(&s.store, "chain").unwrap();
    assert_eq!(file.stages["t"].state, "cancelled");
    assert!(file.stages["t"].jobs.iter().all(|j| j.state == "CANCELLED"));
}

#[test]
fn a_failed_submission_cancels_what_this_run_queued() {
    let s = setup();
    let Err((e, cancelled)) = try_go(&s, Script::new(), 2, None, Some(2)) else { panic!("sbatch refused") };
    assert!(e.to_string().contains("invalid partition") && e.to_string().contains("s.sh"), "{e}");
    assert_eq!(cancelled, ["100", "101"]);
    let file = read_jobs(&s.store, "chain").unwrap();
    assert!(!file.attached);
    assert!(file.stages.values().flat_map(|s| &s.jobs).all(|j| j.state == "CANCELLED"));
}
