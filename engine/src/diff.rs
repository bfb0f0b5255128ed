//! `pipe diff` across N pipelines: the labels that name them, which stages are compared, and the
//! figure folder the stage kinds write their comparisons into (built in a temporary sibling and
//! renamed into place, so a reader never sees half of one).

use std::collections::BTreeMap;
use std::fs;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use crate::config::Pipeline;
use crate::plan::{Plan, State};
use crate::stage::{Compared, Registry};

/// One pipeline of a diff: its label (see [`labels`]), validated pipeline and plan.
#[derive(Clone, Copy, Debug)]
pub struct Side<'a> {
    pub label: &'a str,
    pub pipeline: &'a Pipeline,
    pub plan: &'a Plan,
}

/// Names for the pipelines of a diff, in order: each pipeline's `[pipeline] name`; for names that
/// repeat, the file stem instead; labels still equal get `#1`, `#2`, … in order.
pub fn labels(pipelines: &[&Pipeline]) -> Vec<String> {
    let count = |names: &[String], n: &str| names.iter().filter(|x| x.as_str() == n).count();
    let names: Vec<String> = pipelines.iter().map(|p| p.name.clone()).collect();
    let stem = |p: &Pipeline| {
        p.file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| p.name.clone())
    };
    let mut out: Vec<String> = pipelines
        .iter()
        .zip(&names)
        .map(|(p, n)| if count(&names, n) > 1 { stem(p) } else { n.clone() })
        .collect();
    let before = out.clone();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for l in out.iter_mut() {
        if count(&before, l) > 1 {
            let i = seen.entry(l.clone()).or_insert(0);
            *i += 1;
            *l = format!("{l}#{i}");
        }
    }
    out
}

/// The default name of a diff's figure folder: the labels, each made a safe path component,
/// joined by `--`; a long name is cut and ends in a hash of the whole, so it stays one component.
pub fn folder_name(labels: &[String]) -> String {
    let safe: Vec<String> = labels
        .iter()
        .map(|l| {
            let s: String = l
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') { c } else { '_' })
                .collect();
            let s = s.trim_start_matches('.').to_string();
            if s.is_empty() { "_".to_string() } else { s }
        })
        .collect();
    let name = safe.join("--");
    if name.len() <= 200 {
        return name;
    }
    let hash = blake3::hash(name.as_bytes()).to_hex();
    format!("{}-{}", &name[..180], &hash.as_str()[..16])
}

/// A comparison to ask a stage kind for: the published outputs of one stage name across the
/// pipelines that have it, in the order the pipelines were given.
#[derive(Clone, Debug)]
pub struct FigureJob {
    pub stage: String,
    pub kind: String,
    pub outputs: Vec<Compared>,
}

/// Every stage name that at least two pipelines have published with the same kind (the kind of
/// the first pipeline that has it published), unless all of them share one key.
pub fn figure_jobs(sides: &[Side<'_>]) -> Vec<FigureJob> {
    let mut names: Vec<&str> = Vec::new();
    for s in sides {
        for st in &s.plan.stages {
            if !names.contains(&st.name.as_str()) {
                names.push(&st.name);
            }
        }
    }
    let mut jobs = Vec::new();
    for name in names {
        let published: Vec<(&Side<'_>, &crate::plan::StagePlan)> = sides
            .iter()
            .filter_map(|s| s.plan.stage(name).map(|st| (s, st)))
            .filter(|(_, st)| st.state == State::Cached && st.object.is_some())
            .collect();
        let Some((_, first)) = published.first() else { continue };
        let same: Vec<_> = published.iter().filter(|(_, st)| st.kind == first.kind).collect();
        if same.len() < 2 || same.iter().all(|(_, st)| st.key == first.key) {
            continue;
        }
        jobs.push(FigureJob {
            stage: name.to_string(),
            kind: first.kind.clone(),
            outputs: same
                .iter()
                .filter_map(|(side, st)| {
                    st.object.as_ref().map(|o| Compared {
                        label: side.label.to_string(),
                        stage: st.name.clone(),
                        dir: o.out_dir(),
                    })
                })
                .collect(),
        });
    }
    jobs
}

/// What a figure folder holds once written.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    /// The folder, in place.
    pub folder: PathBuf,
    /// Per compared stage that wrote something: files relative to `folder`, `/`-separated.
    pub stages: Vec<StageFigures>,
    /// Comparisons that failed; the rest of the folder is still written.
    pub warnings: Vec<FigureWarning>,
}

#[derive(Clone, Debug)]
pub struct StageFigures {
    pub stage: String,
    pub kind: String,
    pub files: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct FigureWarning {
    pub stage: String,
    pub kind: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "refusing to replace {}: it exists and was not written by `pipe diff` (no {MARKER}); choose another --out",
        .0.display()
    )]
    NotADiffFolder(PathBuf),
}

/// The file that marks a folder as a figure folder, so that only such a folder is ever replaced.
pub const MARKER: &str = ".pipe-diff";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DiffError + '_ {
    move |source| DiffError::Io { path: path.to_path_buf(), source }
}

/// Fails unless `folder` is absent, an empty folder or an earlier figure folder: the only things
/// [`write_figures`] may replace.
pub fn check_folder(folder: &Path) -> Result<(), DiffError> {
    match fs::read_dir(folder) {
        Ok(mut entries) => {
            if entries.next().is_none() || folder.join(MARKER).is_file() {
                Ok(())
            } else {
                Err(DiffError::NotADiffFolder(folder.to_path_buf()))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(folder)(e)),
    }
}

/// Runs every job's `compare` into `<folder>/<stage>/` and puts the folder in place of an older
/// one. A stage folder that stays empty is removed; a failing (or panicking) comparison becomes a
/// warning. Reads published objects only.
pub fn write_figures(
    registry: &Registry,
    jobs: &[FigureJob],
    folder: &Path,
    about: &[String],
) -> Result<Figures, DiffError> {
    check_folder(folder)?;
    let parent = folder.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(io(parent))?;
    let name = folder.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "diff".into());
    let tmp = parent.join(format!(".{name}.tmp-{}-{}", std::process::id(), crate::store::unique()));
    let result = fill(registry, jobs, &tmp, about).and_then(|figs| {
        swap_into_place(&tmp, folder)?;
        Ok(figs)
    });
    if tmp.exists() {
        let _ = fs::remove_dir_all(&tmp);
    }
    let (stages, warnings) = result?;
    Ok(Figures { folder: folder.to_path_buf(), stages, warnings })
}

type Filled = (Vec<StageFigures>, Vec<FigureWarning>);

fn fill(registry: &Registry, jobs: &[FigureJob], tmp: &Path, about: &[String]) -> Result<Filled, DiffError> {
    fs::create_dir(tmp).map_err(io(tmp))?;
    let marker = tmp.join(MARKER);
    fs::write(&marker, about.iter().map(|l| format!("{l}\n")).collect::<String>()).map_err(io(&marker))?;
    let mut stages = Vec::new();
    let mut warnings = Vec::new();
    for job in jobs {
        let Some(kind) = registry.get(&job.kind) else { continue };
        let dest = tmp.join(&job.stage);
        fs::create_dir(&dest).map_err(io(&dest))?;
        let warn =
            |message: String| FigureWarning { stage: job.stage.clone(), kind: job.kind.clone(), message };
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| kind.compare(&job.outputs, &dest)));
        let files = match outcome {
            Ok(Ok(files)) => files,
            Ok(Err(e)) => {
                warnings.push(warn(e.to_string()));
                let _ = fs::remove_dir_all(&dest);
                continue;
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panicked".into());
                warnings.push(warn(format!("panicked: {what}")));
                let _ = fs::remove_dir_all(&dest);
                continue;
            }
        };
        let mut rel: Vec<String> = files
            .iter()
            .map(|f| {
                let inside = if f.is_absolute() { f.strip_prefix(&dest).unwrap_or(f) } else { f.as_path() };
                let parts: Vec<String> =
                    inside.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
                format!("{}/{}", job.stage, parts.join("/"))
            })
            .collect();
        rel.dedup();
        let empty = fs::read_dir(&dest).map(|mut d| d.next().is_none()).unwrap_or(true);
        if empty {
            let _ = fs::remove_dir(&dest);
            continue;
        }
        stages.push(StageFigures { stage: job.stage.clone(), kind: job.kind.clone(), files: rel });
    }
    Ok((stages, warnings))
}

/// Renames `tmp` to `folder`, moving an older `folder` aside first and deleting it after. A reader
/// sees the old folder, briefly none, or the new one; never a mix. Retries when another diff of
/// the same labels puts its folder in place at the same moment.
fn swap_into_place(tmp: &Path, folder: &Path) -> Result<(), DiffError> {
    let mut last = None;
    for _ in 0..5 {
        let old = folder.with_file_name(format!(
            ".{}.old-{}-{}",
            folder.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            std::process::id(),
            crate::store::unique()
        ));
        let moved = match fs::rename(folder, &old) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(io(folder)(e)),
        };
        let res = fs::rename(tmp, folder);
        if moved {
            let _ = fs::remove_dir_all(&old);
        }
        match res {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(io(folder)(last.unwrap_or_else(|| std::io::Error::other("cannot rename into place"))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn pipeline(name: &str, file: &str) -> Pipeline {
        Pipeline {
            name: name.into(),
            description: String::new(),
            file: PathBuf::from(file),
            files: vec![],
            datastore: None,
            stages: vec![],
            executor: Default::default(),
            effective: toml::Table::new(),
        }
    }

    fn check_labels(input: &[(&str, &str)], want: &[&str]) {
        let ps: Vec<Pipeline> = input.iter().map(|(n, f)| pipeline(n, f)).collect();
        let refs: Vec<&Pipeline> = ps.iter().collect();
        assert_eq!(labels(&refs), want);
    }

    #[test]
    fn labels_are_names_then_stems_then_numbered() {
        check_labels(&[("l1", "/x/a.toml"), ("topk", "/x/b.toml")], &["l1", "topk"]);
        check_labels(
            &[("sweep", "/x/k32.toml"), ("sweep", "/x/k64.toml"), ("base", "/x/base.toml")],
            &["k32", "k64", "base"],
        );
        check_labels(&[("s", "/x/a.toml"), ("s", "/y/a.toml"), ("t", "/y/t.toml")], &["a#1", "a#2", "t"]);
        // A stem that equals another pipeline's name is numbered too.
        check_labels(&[("s", "/x/t.toml"), ("s", "/x/u.toml"), ("t", "/y/v.toml")], &["t#1", "u", "t#2"]);
    }

    #[test]
    fn folder_names_are_one_safe_component() {
        assert_eq!(folder_name(&["l1".into(), "topk".into()]), "l1--topk");
        assert_eq!(folder_name(&["a#1".into(), "../b c".into()]), "a_1--_b_c");
        let long: Vec<String> = (0..5).map(|i| format!("{i}{}", "x".repeat(99))).collect();
        let n = folder_name(&long);
        assert!(n.len() <= 200 && !n.contains('/'), "{n}");
        assert_ne!(n, folder_name(&long[..4]));
    }

    /// `compare` writes one line per side into `list.txt`, or fails / writes nothing, by kind.
    struct Lister(&'static str);
    impl crate::stage::Stage for Lister {
        type Params = crate::config::tests::kinds::SinkParams;
        const KIND: &'static str = "lister";
        const VERSION: u32 = 1;
        const DOC: &'static str = "test";
        fn run(
            &self,
            _: &Self::Params,
            _: &mut crate::stage::StageContext,
        ) -> Result<(), crate::stage::StageError> {
            Ok(())
        }
        fn compare(
            &self,
            outputs: &[Compared],
            dest: &Path,
        ) -> Result<Vec<PathBuf>, crate::stage::StageError> {
            match self.0 {
                "fail" => Err(crate::stage::StageError::failed("no data to compare")),
                "nothing" => Ok(vec![]),
                _ => {
                    let text: String = outputs.iter().map(|o| format!("{} {}\n", o.label, o.stage)).collect();
                    fs::write(dest.join("list.txt"), text)?;
                    Ok(vec![dest.join("list.txt")])
                }
            }
        }
    }

    fn job(stage: &str, labels: &[&str]) -> FigureJob {
        FigureJob {
            stage: stage.into(),
            kind: "lister".into(),
            outputs: labels
                .iter()
                .map(|l| Compared {
                    label: l.to_string(),
                    stage: stage.into(),
                    dir: PathBuf::from("/nowhere"),
                })
                .collect(),
        }
    }

    fn write_with(mode: &'static str, folder: &Path) -> Figures {
        let mut r = Registry::new();
        r.register(Lister(mode));
        write_figures(&r, &[job("train", &["a", "b", "c"])], folder, &["a".into()]).unwrap()
    }

    #[test]
    fn figures_are_written_per_stage_and_replace_the_old_folder() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("diffs").join("a--b--c");
        let figs = write_with("list", &folder);
        assert_eq!(figs.stages.len(), 1);
        assert_eq!(figs.stages[0].files, ["train/list.txt"]);
        assert_eq!(fs::read_to_string(folder.join("train/list.txt")).unwrap(), "a train\nb train\nc train\n");
        fs::write(folder.join("stale.txt"), "old").unwrap();
        // A rerun replaces the folder; nothing else is left beside it.
        let figs = write_with("nothing", &folder);
        assert!(figs.stages.is_empty() && figs.warnings.is_empty());
        assert!(!folder.join("stale.txt").exists() && !folder.join("train").exists());
        let siblings: Vec<_> = fs::read_dir(folder.parent().unwrap()).unwrap().collect();
        assert_eq!(siblings.len(), 1);
    }

    #[test]
    fn a_failing_comparison_is_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let figs = write_with("fail", &dir.path().join("f"));
        assert_eq!(figs.warnings.len(), 1);
        assert_eq!((figs.warnings[0].stage.as_str(), figs.warnings[0].kind.as_str()), ("train", "lister"));
        assert!(figs.warnings[0].message.contains("no data"));
        assert!(!dir.path().join("f/train").exists());
    }

    #[test]
    fn only_diff_folders_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("figs");
        check_folder(&f).unwrap();
        fs::create_dir(&f).unwrap();
        check_folder(&f).unwrap();
        fs::write(f.join("notes.txt"), "mine").unwrap();
        let err = check_folder(&f).unwrap_err().to_string();
        assert!(err.contains("refusing to replace"), "{err}");
        fs::write(f.join(MARKER), "").unwrap();
        check_folder(&f).unwrap();
    }
}
