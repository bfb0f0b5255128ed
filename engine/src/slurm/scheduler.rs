//! The Slurm commands the coordinator uses (`sbatch`, `squeue`, `scontrol`, `sacct`, `scancel`)
//! behind a small trait, and the parsing of what they print.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::SlurmError;

/// A job's state as Slurm reports it, folded to what the coordinator acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobState {
    Pending,
    Running,
    Completed,
    /// Non-zero exit (the stage failed, or the process died).
    Failed,
    Cancelled,
    Timeout,
    Preempted,
    NodeFail,
    OutOfMemory,
    BootFail,
    Deadline,
    /// A state this code does not know, as printed.
    Other(String),
    /// The scheduler no longer knows the job (purged after `MinJobAge`, no accounting).
    Gone,
}

impl JobState {
    /// From Slurm's long state names (`squeue %T`, `scontrol JobState=`, `sacct State`).
    pub fn parse(s: &str) -> JobState {
        // sacct prints `CANCELLED by 0`.
        let word = s.split_whitespace().next().unwrap_or("").trim_end_matches('+');
        match word {
            "PENDING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "RESV_DEL_HOLD" | "SPECIAL_EXIT" => {
                JobState::Pending
            }
            "RUNNING" | "CONFIGURING" | "COMPLETING" | "SUSPENDED" | "RESIZING" | "SIGNALING"
            | "STAGE_OUT" | "STOPPED" => JobState::Running,
            "COMPLETED" => JobState::Completed,
            "FAILED" => JobState::Failed,
            "CANCELLED" => JobState::Cancelled,
            "TIMEOUT" => JobState::Timeout,
            "PREEMPTED" => JobState::Preempted,
            "NODE_FAIL" => JobState::NodeFail,
            "OUT_OF_MEMORY" => JobState::OutOfMemory,
            "BOOT_FAIL" => JobState::BootFail,
            "DEADLINE" => JobState::Deadline,
            other => JobState::Other(other.to_string()),
        }
    }

    /// Still queued or running.
    pub fn is_active(&self) -> bool {
        matches!(self, JobState::Pending | JobState::Running)
    }

    /// Ended for a reason that another attempt may not meet (the cluster's doing, not the stage's).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            JobState::Timeout
                | JobState::Preempted
                | JobState::NodeFail
                | JobState::BootFail
                | JobState::OutOfMemory
                | JobState::Failed
                | JobState::Gone
        )
    }

    pub fn as_str(&self) -> &str {
        match self {
            JobState::Pending => "PENDING",
            JobState::Running => "RUNNING",
            JobState::Completed => "COMPLETED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
            JobState::Timeout => "TIMEOUT",
            JobState::Preempted => "PREEMPTED",
            JobState::NodeFail => "NODE_FAIL",
            JobState::OutOfMemory => "OUT_OF_MEMORY",
            JobState::BootFail => "BOOT_FAIL",
            JobState::Deadline => "DEADLINE",
            JobState::Other(s) => s,
            JobState::Gone => "GONE",
        }
    }
}

/// The state of a job (or, for an array, of all its tasks) from the states of its lines.
fn fold(states: &[JobState]) -> JobState {
    if states.is_empty() {
        return JobState::Gone;
    }
    if states.contains(&JobState::Running) {
        return JobState::Running;
    }
    if states.contains(&JobState::Pending) {
        return JobState::Pending;
    }
    states.iter().find(|s| **s != JobState::Completed).cloned().unwrap_or(JobState::Completed)
}

/// The job id a line's id belongs to: `123`, `123_4` and `123_[0-3]` all belong to `123`.
fn base_id(id: &str) -> &str {
    id.split(['_', '.', ';']).next().unwrap_or(id)
}

/// Parses `squeue -h -o "%i|%T"` output into states by job id (array tasks folded).
pub fn parse_squeue(out: &str) -> BTreeMap<String, JobState> {
    let mut lines: BTreeMap<String, Vec<JobState>> = BTreeMap::new();
    for line in out.lines() {
        let Some((id, state)) = line.trim().split_once('|') else { continue };
        lines.entry(base_id(id).to_string()).or_default().push(JobState::parse(state.trim()));
    }
    lines.into_iter().map(|(id, s)| (id, fold(&s))).collect()
}

/// Parses `scontrol show job -o ID` output (one line per job or array task) into the job's state.
pub fn parse_scontrol(out: &str) -> Option<JobState> {
    let states: Vec<JobState> = out
        .lines()
        .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("JobState=")))
        .map(JobState::parse)
        .collect();
    (!states.is_empty()).then(|| fold(&states))
}

/// Parses `sacct -n -P -X -o JobID,State -j ID` output into states by job id.
pub fn parse_sacct(out: &str) -> BTreeMap<String, JobState> {
    parse_squeue(out)
}

/// What the coordinator asks of the cluster.
pub trait Scheduler {
    /// Submits a batch script with extra `sbatch` arguments; returns the job id.
    fn submit(&self, script: &Path, args: &[String]) -> Result<String, SlurmError>;
    /// The states of these jobs; a job the scheduler no longer knows is [`JobState::Gone`].
    fn states(&self, ids: &[String]) -> BTreeMap<String, JobState>;
    /// Cancels these jobs (errors are logged, not returned: a job may have ended meanwhile).
    fn cancel(&self, ids: &[String]);
}

/// The real thing: Slurm's command-line tools, from `$PATH` (or `bin`).
#[derive(Clone, Debug, Default)]
pub struct SlurmCli {
    pub bin: Option<PathBuf>,
}

impl SlurmCli {
    fn command(&self, name: &str) -> Command {
        match &self.bin {
            Some(dir) => Command::new(dir.join(name)),
            None => Command::new(name),
        }
    }

    fn output(&self, name: &str, args: &[&str]) -> Result<String, String> {
        let out = self.command(name).args(args).output().map_err(|e| format!("cannot run `{name}`: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "`{name} {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

impl Scheduler for SlurmCli {
    fn submit(&self, script: &Path, args: &[String]) -> Result<String, SlurmError> {
        let mut all: Vec<&str> = vec!["--parsable"];
        all.extend(args.iter().map(String::as_str));
        let script_s = script.to_string_lossy();
        all.push(&script_s);
        let out = self
            .output("sbatch", &all)
            .map_err(|message| SlurmError::Submit { script: script.into(), message })?;
        // `--parsable` prints `id` or `id;cluster`.
        let id = out.trim().split(';').next().unwrap_or("").trim().to_string();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SlurmError::Submit {
                script: script.into(),
                message: format!("sbatch printed no job id: {:?}", out.trim()),
            });
        }
        Ok(id)
    }

    fn states(&self, ids: &[String]) -> BTreeMap<String, JobState> {
        let mut found = BTreeMap::new();
        if ids.is_empty() {
            return found;
        }
        let list = ids.join(",");
        match self.output("squeue", &["-h", "-t", "all", "-o", "%i|%T", "-j", &list]) {
            Ok(out) => found = parse_squeue(&out),
            // One purged id fails the whole call: ask one by one.
            Err(_) => {
                for id in ids {
                    if let Ok(out) = self.output("squeue", &["-h", "-t", "all", "-o", "%i|%T", "-j", id]) {
                        found.extend(parse_squeue(&out));
                    }
                }
            }
        }
        for id in ids {
            if found.contains_key(id) {
                continue;
            }
            let state = self
                .output("scontrol", &["show", "job", "-o", id])
                .ok()
                .and_then(|out| parse_scontrol(&out))
                .or_else(|| {
                    self.output("sacct", &["-n", "-P", "-X", "-o", "JobID,State", "-j", id])
                        .ok()
                        .and_then(|out| parse_sacct(&out).remove(id))
                })
                .unwrap_or(JobState::Gone);
            found.insert(id.clone(), state);
        }
        found.retain(|id, _| ids.contains(id));
        found
    }

    fn cancel(&self, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        let args: Vec<&str> = ids.iter().map(String::as_str).collect();
        if let Err(e) = self.output("scancel", &args) {
            tracing::warn!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeue_lines_fold_array_tasks_into_their_job() {
        // As printed by Slurm 22.05 for a plain job, a running array and a pending range.
        let out = "12|RUNNING\n7_0|COMPLETED\n7_1|RUNNING\n7_[2-3]|PENDING\n9_0|COMPLETED\n9_1|FAILED\n10|CANCELLED\n";
        let s = parse_squeue(out);
        assert_eq!(s["12"], JobState::Running);
        assert_eq!(s["7"], JobState::Running);
        assert_eq!(s["9"], JobState::Failed);
        assert_eq!(s["10"], JobState::Cancelled);
    }

    #[test]
    fn scontrol_and_sacct_states() {
        let out = "JobId=8 ArrayJobId=7 ArrayTaskId=0 JobName=wrap JobState=COMPLETED Reason=None ExitCode=0:0\n\
                   JobId=7 ArrayJobId=7 ArrayTaskId=2 JobName=wrap JobState=TIMEOUT Reason=TimeLimit ExitCode=0:15\n";
        assert_eq!(parse_scontrol(out), Some(JobState::Timeout));
        assert_eq!(parse_scontrol("slurm_load_jobs error: Invalid job id specified"), None);
        assert_eq!(parse_sacct("15|CANCELLED by 0\n")["15"], JobState::Cancelled);
        assert_eq!(JobState::parse("PREEMPTED"), JobState::Preempted);
        assert_eq!(JobState::parse("WEIRD"), JobState::Other("WEIRD".into()));
    }

    #[test]
    fn what_is_retried() {
        for s in
            [JobState::Timeout, JobState::Preempted, JobState::NodeFail, JobState::Gone, JobState::Failed]
        {
            assert!(s.is_retryable(), "{s:?}");
        }
        for s in [JobState::Cancelled, JobState::Completed, JobState::Deadline, JobState::Running] {
            assert!(!s.is_retryable(), "{s:?}");
        }
    }
}
