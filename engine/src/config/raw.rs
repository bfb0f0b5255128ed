//! The raw serde layer of a pipeline file's `[pipeline]` table: it mirrors the TOML exactly
//! (`deny_unknown_fields`), feeds the JSON Schema, and is turned into [`super::Pipeline`] fields
//! by validation.

use schemars::JsonSchema;
use serde::Deserialize;

/// `[pipeline]`: what the pipeline is called and where its outputs go.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PipelineHeader {
    /// The pipeline's name; it becomes a folder name in the datastore. Letters, digits, `_`, `.`
    /// and `-`, starting with a letter or digit, at most 100 characters.
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"), length(min = 1, max = 100))]
    pub name: String,
    /// What the pipeline is for.
    #[serde(default)]
    pub description: Option<String>,
    /// Another pipeline file this one builds on, relative to this file (`${VAR}` and `~/` are
    /// expanded). Its tables are merged under this file's: keys here win, tables merge
    /// recursively, arrays and other values replace.
    #[serde(default)]
    pub extends: Option<String>,
    /// The datastore folder, relative to this file (`${VAR}` and `~/` are expanded).
    #[serde(default)]
    pub datastore: Option<String>,
}

/// The keys `[pipeline]` accepts, for "did you mean" help.
pub(crate) const HEADER_KEYS: &[&str] = &["name", "description", "extends", "datastore"];

/// `[executor]`: how `pipe run` runs the stages when it is not on this machine. Nothing in it
/// enters any key: the same stage gives the same object whatever runs it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecutorTable {
    /// `pipe run --executor slurm`: every stage to run becomes an `sbatch` job.
    #[serde(default)]
    pub slurm: SlurmOptions,
}

/// `[executor.slurm]`: the jobs' resources and the coordinator's behaviour. Command-line flags of
/// `pipe run` override these.
#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SlurmOptions {
    /// `--partition` of every job (default: the cluster's default partition).
    pub partition: Option<String>,
    /// GPUs per job of a stage that wants an accelerator (`--gpus`); 0 runs them on CPUs.
    #[schemars(range(min = 0))]
    pub gpus_per_job: u32,
    /// `--cpus-per-task` of every job.
    pub cpus_per_task: Option<u32>,
    /// `--mem` of every job, e.g. `"64G"`.
    pub mem: Option<String>,
    /// `--time` of every job, e.g. `"24:00:00"`.
    pub time: Option<String>,
    /// More `sbatch` options, e.g. `["--account=lab", "--qos=high"]`.
    pub sbatch_args: Vec<String>,
    /// A stage whose job was preempted, timed out, lost its node or died without reporting is
    /// resubmitted (and resumes from its checkpoints) at most this many times.
    pub max_retries: u32,
    /// Parts of a stage that splits (`cache`) run as a job array of at most this many jobs; 1
    /// runs it as one job.
    #[schemars(range(min = 1))]
    pub array_size: usize,
    /// Seconds between two looks at the queue.
    pub poll_seconds: f64,
    /// The `pipe` binary the jobs run, on a path every node sees (default: the running one).
    pub binary: Option<String>,
    /// The device of an accelerator stage inside a job with GPUs.
    pub device: String,
    /// Per-stage resources, by stage name: `[executor.slurm.stages.train] time = "48:00:00"`.
    pub stages: std::collections::BTreeMap<String, SlurmStageOptions>,
}

impl Default for SlurmOptions {
    fn default() -> Self {
        Self {
            partition: None,
            gpus_per_job: 1,
            cpus_per_task: None,
            mem: None,
            time: None,
            sbatch_args: Vec::new(),
            max_retries: 2,
            array_size: 8,
            poll_seconds: 10.0,
            binary: None,
            device: "cuda:0".into(),
            stages: Default::default(),
        }
    }
}

/// `[executor.slurm.stages.<name>]`: what differs for one stage's jobs.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SlurmStageOptions {
    pub partition: Option<String>,
    pub gpus_per_job: Option<u32>,
    pub cpus_per_task: Option<u32>,
    pub mem: Option<String>,
    pub time: Option<String>,
    /// Added after the pipeline-wide `sbatch_args`.
    #[serde(default)]
    pub sbatch_args: Vec<String>,
    #[schemars(range(min = 1))]
    pub array_size: Option<usize>,
}
