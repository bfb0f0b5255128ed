//! What the figures are drawn from: a latent table (`scale` or `collect` output) reduced to the
//! columns the figures need, and a training log (`metrics.jsonl`).

use std::collections::BTreeMap;
use std::path::Path;

use crate::latents::{Class, ClassThresholds, LatentTable};

/// The columns of one latent table that the figures use. Optional parts are `None` when the
/// table does not have them (a `collect` table has no ν; a `scale` table without `statistics`
/// has no frequencies).
#[derive(Clone, Debug)]
pub struct Latents {
    pub label: String,
    pub delta_norm: Vec<f64>,
    pub cos_sim: Vec<f64>,
    /// Never active on the data (from `dead`, else `count_active == 0`); all false if unknown.
    pub dead: Vec<bool>,
    pub classes: Vec<Class>,
    pub nu: Option<Nu>,
    pub frequency: Option<Vec<f64>>,
    /// Share of a latent's activations on chat-template tokens.
    pub template_share: Option<Vec<f64>>,
}

/// Latent Scaling results (DOMAIN.md §5b).
#[derive(Clone, Debug)]
pub struct Nu {
    pub error: Vec<f64>,
    pub reconstruction: Vec<f64>,
    /// The effective chat-only set (the latents ν was computed for).
    pub chat_only: Vec<bool>,
    /// The shared baseline set.
    pub shared: Vec<bool>,
    /// Chat-only with low νᵋ and νʳ.
    pub chat_specific: Vec<bool>,
}

impl Latents {
    /// Reads `latents.parquet` from a stage's output folder.
    pub fn read(dir: &Path, label: &str, thresholds: &ClassThresholds) -> Result<Latents, String> {
        let path = dir.join("latents.parquet");
        let table = LatentTable::read_parquet(&path).map_err(|e| e.to_string())?;
        Latents::from_table(&table, label, thresholds).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_table(t: &LatentTable, label: &str, thresholds: &ClassThresholds) -> Result<Latents, String> {
        let need = |name: &str| t.f64s(name).ok_or_else(|| format!("no numeric column `{name}`"));
        let delta_norm = need("delta_norm")?;
        let cos_sim = need("dec_cos_sim")?;
        let n = delta_norm.len();
        let dead = match (t.bools("dead"), t.f64s("count_active")) {
            (Some(d), _) => d.to_vec(),
            (None, Some(c)) => c.iter().map(|c| *c == 0.0).collect(),
            (None, None) => vec![false; n],
        };
        // The table's own classes when it has them (what its stage decided), else by `thresholds`.
        let classes: Vec<Class> = match t.get("class") {
            Some(crate::latents::Column::Str(names)) => names
                .iter()
                .zip(&delta_norm)
                .map(|(name, d)| Class::from_name(name).unwrap_or_else(|| Class::of(*d, thresholds)))
                .collect(),
            _ => delta_norm.iter().map(|d| Class::of(*d, thresholds)).collect(),
        };
        let flags = |name: &str| t.bools(name).map(<[bool]>::to_vec);
        let nu = match (t.f64s("nu_error"), t.f64s("nu_reconstruction"), flags("effective_chat_only")) {
            (Some(error), Some(reconstruction), Some(chat_only)) => Some(Nu {
                error,
                reconstruction,
                chat_only,
                shared: flags("shared_baseline").unwrap_or_else(|| vec![false; n]),
                chat_specific: flags("chat_specific").unwrap_or_else(|| vec![false; n]),
            }),
            _ => None,
        };
        Ok(Latents {
            label: label.to_string(),
            delta_norm,
            cos_sim,
            dead,
            classes,
            nu,
            frequency: t.f64s("frequency"),
            template_share: t.f64s("template_share"),
        })
    }

    pub fn len(&self) -> usize {
        self.delta_norm.len()
    }

    pub fn is_empty(&self) -> bool {
        self.delta_norm.is_empty()
    }

    /// Δ_norm of the latents that are not dead.
    pub fn alive_delta_norm(&self) -> Vec<f64> {
        self.delta_norm.iter().zip(&self.dead).filter(|(_, d)| !**d).map(|(x, _)| *x).collect()
    }

    pub fn count(&self, class: Class) -> usize {
        self.classes.iter().zip(&self.dead).filter(|(c, d)| **c == class && !**d).count()
    }

    /// Which `classes` entries disagree with the table's own `class` column (thresholds that differ
    /// from the ones the upstream stage used): (latent, table's class, ours).
    pub fn class_mismatch(
        t: &LatentTable,
        thresholds: &ClassThresholds,
    ) -> Option<(usize, String, &'static str)> {
        let (Some(crate::latents::Column::Str(names)), Some(delta)) = (t.get("class"), t.f64s("delta_norm"))
        else {
            return None;
        };
        names.iter().zip(&delta).enumerate().find_map(|(j, (name, d))| {
            let ours = Class::of(*d, thresholds).name();
            (name != ours).then(|| (j, name.clone(), ours))
        })
    }
}

/// One series of `metrics.jsonl`: (step, value) per metric name, for one split.
#[derive(Clone, Debug, Default)]
pub struct Series {
    pub metrics: BTreeMap<String, Vec<(f64, f64)>>,
}

/// A training run's log: the `train` and `val` series.
#[derive(Clone, Debug, Default)]
pub struct TrainLog {
    pub label: String,
    pub train: Series,
    pub val: Series,
}

impl TrainLog {
    /// Reads `metrics.jsonl` (one JSON object per line with `split` and `step`).
    pub fn read(path: &Path, label: &str) -> Result<TrainLog, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut log = TrainLog { label: label.into(), ..TrainLog::default() };
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?;
            let Some(step) = v.get("step").and_then(serde_json::Value::as_f64) else { continue };
            let series = match v.get("split").and_then(serde_json::Value::as_str) {
                Some("val") => &mut log.val,
                _ => &mut log.train,
            };
            for (k, x) in v.as_object().into_iter().flatten() {
                if let (false, Some(x)) = (k == "step", x.as_f64())
                    && x.is_finite()
                {
                    series.metrics.entry(k.clone()).or_default().push((step, x));
                }
            }
        }
        Ok(log)
    }

    pub fn get(&self, split_val: bool, metric: &str) -> &[(f64, f64)] {
        let s = if split_val { &self.val } else { &self.train };
        s.metrics.get(metric).map(Vec::as_slice).unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latents::Column;

    #[test]
    fn latents_from_a_scale_like_table() {
        let mut t = LatentTable::default();
        t.push("delta_norm", Column::F64(vec![0.95, 0.5, 0.05, 0.7])).unwrap();
        t.push("dec_cos_sim", Column::F64(vec![0.1, 0.99, 0.2, 0.5])).unwrap();
        t.push("count_active", Column::I64(vec![3, 5, 0, 1])).unwrap();
        t.push(
            "class",
            Column::Str(["Chat only", "Shared", "Base only", "Other"].map(String::from).to_vec()),
        )
        .unwrap();
        let th = ClassThresholds::default();
        let l = Latents::from_table(&t, "x", &th).unwrap();
        assert_eq!(l.dead, [false, false, true, false]);
        assert_eq!(l.alive_delta_norm(), [0.95, 0.5, 0.7]);
        assert_eq!((l.count(Class::ChatOnly), l.count(Class::BaseOnly)), (1, 0));
        assert!(l.nu.is_none() && l.frequency.is_none());
        assert_eq!(Latents::class_mismatch(&t, &th), None);
        let other = ClassThresholds { chat_only: 0.96, ..th };
        assert_eq!(Latents::class_mismatch(&t, &other), Some((0, "Chat only".into(), "Other")));
        t.columns.retain(|(n, _)| n != "dec_cos_sim");
        assert!(Latents::from_table(&t, "x", &th).unwrap_err().contains("dec_cos_sim"));
    }

    #[test]
    fn training_log_splits_train_and_val() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        std::fs::write(
            &p,
            "{\"split\":\"train\",\"step\":0,\"loss\":2.0,\"l0\":4}\n{\"split\":\"val\",\"step\":0,\"loss\":2.5}\n\n{\"split\":\"train\",\"step\":10,\"loss\":1.0}\n",
        )
        .unwrap();
        let log = TrainLog::read(&p, "a").unwrap();
        assert_eq!(log.get(false, "loss"), [(0.0, 2.0), (10.0, 1.0)]);
        assert_eq!(log.get(true, "loss"), [(0.0, 2.5)]);
        assert_eq!(log.get(false, "l0"), [(0.0, 4.0)]);
        std::fs::write(&p, "{\"step\":0}\nnot json\n").unwrap();
        assert!(TrainLog::read(&p, "a").unwrap_err().contains("metrics.jsonl:2"));
    }
}
