//! Hugging Face cache references as path inputs: `org/name`, `org/name@revision`,
//! `org/name@<40-hex commit>` or `hf:org/name@revision`, resolved offline to a snapshot folder of
//! the local cache (<https://huggingface.co/docs/huggingface_hub/guides/manage-cache>). Never
//! touches the network: a reference that is not downloaded is an error that says how to get it.
//!
//! ```text
//! $HF_HUB_CACHE/models--{org}--{name}/refs/{revision}          the commit a revision points to
//! $HF_HUB_CACHE/models--{org}--{name}/snapshots/{commit}/…     symlinks into ../../blobs/
//! $HF_HUB_CACHE/datasets--{org}--{name}/…                      the same, for datasets
//! ```

use std::path::{Path, PathBuf};

use engine::stage::{ResolveCx, ResolveError};

/// The explicit form's prefix: the value is a reference even if a local path has its name.
const PREFIX: &str = "hf:";
const DEFAULT_REVISION: &str = "main";

/// A [`engine::stage::Resolver`] for model repositories (`models--org--name`).
pub fn model_ref(raw: &str, cx: &ResolveCx<'_>) -> Result<Option<PathBuf>, ResolveError> {
    resolve(RepoType::Model, raw, cx)
}

/// A [`engine::stage::Resolver`] for dataset repositories (`datasets--org--name`).
pub fn dataset_ref(raw: &str, cx: &ResolveCx<'_>) -> Result<Option<PathBuf>, ResolveError> {
    resolve(RepoType::Dataset, raw, cx)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RepoType {
    Model,
    Dataset,
}

impl RepoType {
    fn noun(self) -> &'static str {
        match self {
            RepoType::Model => "model",
            RepoType::Dataset => "dataset",
        }
    }
    fn folder_prefix(self) -> &'static str {
        match self {
            RepoType::Model => "models",
            RepoType::Dataset => "datasets",
        }
    }
    /// The `hf download` arguments for a repository of this type.
    fn download(self, id: &str, revision: Option<&str>) -> String {
        let kind = match self {
            RepoType::Model => "",
            RepoType::Dataset => " --repo-type dataset",
        };
        let rev = revision.map(|r| format!(" --revision {r}")).unwrap_or_default();
        format!("`hf download {id}{kind}{rev}` (or `huggingface-cli download {id}{kind}{rev}`)")
    }
}

/// A parsed reference: `org/name` and the revision as written, if any.
#[derive(Debug, PartialEq, Eq)]
struct Reference<'a> {
    org: &'a str,
    name: &'a str,
    revision: Option<&'a str>,
}

impl Reference<'_> {
    fn id(&self) -> String {
        format!("{}/{}", self.org, self.name)
    }
}

/// `org/name` or `org/name@revision`; `None` when `value` does not look like one.
fn parse(value: &str) -> Option<Reference<'_>> {
    let (id, revision) = match value.split_once('@') {
        Some((id, rev)) => (id, Some(rev)),
        None => (value, None),
    };
    let (org, name) = id.split_once('/')?;
    if !repo_part(org) || !repo_part(name) || !revision.is_none_or(valid_revision) {
        return None;
    }
    Some(Reference { org, name, revision })
}

/// One half of a repository id: HF's characters, not starting with `.` (so never `.` or `..`).
fn repo_part(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.len() <= 96
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A branch, tag or commit: it names a file under `refs/`, so `/` is allowed but no component
/// may be empty, `.` or `..`.
fn valid_revision(s: &str) -> bool {
    !s.is_empty()
        && s.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn resolve(ty: RepoType, raw: &str, cx: &ResolveCx<'_>) -> Result<Option<PathBuf>, ResolveError> {
    let (value, explicit) = match raw.strip_prefix(PREFIX) {
        Some(rest) => (rest, true),
        None => (raw, false),
    };
    let Some(r) = parse(value) else {
        if explicit {
            return Err(ResolveError::new(format!("`{raw}` is not a Hugging Face reference")).with_help(
                format!(
                    "write `{PREFIX}org/name`, `{PREFIX}org/name@revision` or `{PREFIX}org/name@<commit>`"
                ),
            ));
        }
        return Ok(None);
    };
    let id = r.id();
    let noun = ty.noun();
    // Say where the local path would have been, for a local path mistyped as a reference.
    let not_local = if explicit {
        String::new()
    } else {
        format!(" (nor a local path: no `{}`)", cx.dir().join(value).display())
    };
    let (root, from) = cache_root(cx)?;
    if !root.is_dir() {
        return Err(ResolveError::new(format!(
            "{noun} `{id}` is not in the Hugging Face cache{not_local}: no cache folder `{}` (from {from})",
            root.display()
        ))
        .with_help(format!(
            "download it with {}, or set `HF_HUB_CACHE` or `HF_HOME` to the cache you use",
            ty.download(&id, None)
        )));
    }
    let repo = root.join(format!("{}--{}--{}", ty.folder_prefix(), r.org, r.name));
    if !repo.is_dir() {
        return Err(ResolveError::new(format!(
            "{noun} `{id}` is not in the Hugging Face cache{not_local}: no folder `{}`",
            repo.display()
        ))
        .with_help(format!(
            "download it with {}; pipe never downloads (cache from {from})",
            ty.download(&id, r.revision)
        )));
    }
    let revision = r.revision.unwrap_or(DEFAULT_REVISION);
    let commit = if is_commit(revision) {
        revision.to_string()
    } else {
        let file = repo.join("refs").join(revision);
        match std::fs::read_to_string(&file) {
            Ok(text) if is_commit(text.trim()) => text.trim().to_string(),
            Ok(_) => {
                return Err(ResolveError::new(format!(
                    "revision `{revision}` of {noun} `{id}`: `{}` does not hold a commit hash",
                    file.display()
                ))
                .with_help(format!(
                    "the cache is damaged: download it again with {}",
                    ty.download(&id, Some(revision))
                )));
            }
            Err(_) => {
                let present = refs(&repo.join("refs"));
                let listed = if present.is_empty() {
                    "the cache has no refs for it".to_string()
                } else {
                    format!("refs present: {}", present.join(", "))
                };
                return Err(ResolveError::new(format!(
                    "revision `{revision}` of {noun} `{id}` is not in the Hugging Face cache: no `{}`",
                    file.display()
                ))
                .with_help(format!(
                    "{listed}; download it with {}, or write `{id}@<40-hex commit>`",
                    ty.download(&id, Some(revision))
                )));
            }
        }
    };
    let snapshot = repo.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        let via = if commit == revision { String::new() } else { format!(" (revision `{revision}`)") };
        let present = dir_names(&repo.join("snapshots"));
        let listed = if present.is_empty() {
            "the cache has no snapshots of it".to_string()
        } else {
            format!("snapshots present: {}", present.join(", "))
        };
        return Err(ResolveError::new(format!(
            "snapshot `{commit}`{via} of {noun} `{id}` is missing: no folder `{}`",
            snapshot.display()
        ))
        .with_help(format!("{listed}; download it with {}", ty.download(&id, Some(revision)))));
    }
    Ok(Some(snapshot))
}

/// The hub cache folder, and which setting named it, as huggingface_hub finds it: `HF_HUB_CACHE`
/// (or the older `HUGGINGFACE_HUB_CACHE`), else `$HF_HOME/hub`, else
/// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
fn cache_root(cx: &ResolveCx<'_>) -> Result<(PathBuf, String), ResolveError> {
    let set = |var: &str| cx.env(var).filter(|v| !v.is_empty());
    let home = set("HOME");
    let expand = |v: String| -> PathBuf {
        match (v.strip_prefix('~'), &home) {
            (Some(rest), Some(h)) if rest.is_empty() || rest.starts_with('/') => {
                PathBuf::from(format!("{h}{rest}"))
            }
            _ => PathBuf::from(v),
        }
    };
    for var in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"] {
        if let Some(v) = set(var) {
            return Ok((expand(v), format!("`${var}`")));
        }
    }
    if let Some(v) = set("HF_HOME") {
        return Ok((expand(v).join("hub"), "`$HF_HOME`/hub".to_string()));
    }
    if let Some(v) = set("XDG_CACHE_HOME") {
        return Ok((expand(v).join("huggingface/hub"), "`$XDG_CACHE_HOME`/huggingface/hub".to_string()));
    }
    match home {
        Some(h) => {
            Ok((Path::new(&h).join(".cache/huggingface/hub"), "`~/.cache/huggingface/hub`".to_string()))
        }
        None => Err(ResolveError::new(
            "cannot find the Hugging Face cache: none of `HF_HUB_CACHE`, `HUGGINGFACE_HUB_CACHE`, \
             `HF_HOME`, `XDG_CACHE_HOME`, `HOME` is set",
        )
        .with_help("set `HF_HUB_CACHE` to the hub cache folder, or write a local path")),
    }
}

/// The revisions under `refs/` (branches and tags, and `pr/N` and the like), sorted.
fn refs(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, prefix)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let full = format!("{prefix}{name}");
            if e.path().is_dir() {
                stack.push((e.path(), format!("{full}/")));
            } else {
                out.push(full);
            }
        }
    }
    out.sort();
    out
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    const MAIN: &str = "0123456789abcdef0123456789abcdef01234567";
    const V1: &str = "89abcdef0123456789abcdef0123456789abcdef";
    const ORPHAN: &str = "fedcba9876543210fedcba9876543210fedcba98";

    /// A hub cache like the real one: blobs, snapshots of symlinks into them, refs.
    struct Cache {
        dir: tempfile::TempDir,
    }

    impl Cache {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("temp dir");
            let hub = dir.path().join("hub");
            let repo = hub.join("models--org--model");
            std::fs::create_dir_all(repo.join("blobs")).expect("mkdir");
            std::fs::write(repo.join("blobs/aaaa"), "{\"model_type\": \"llama\"}").expect("write");
            std::fs::write(repo.join("blobs/bbbb"), "weights").expect("write");
            for commit in [MAIN, V1] {
                let snap = repo.join("snapshots").join(commit);
                std::fs::create_dir_all(&snap).expect("mkdir");
                symlink("../../blobs/aaaa", snap.join("config.json")).expect("symlink");
                symlink("../../blobs/bbbb", snap.join("model.safetensors")).expect("symlink");
            }
            std::fs::create_dir_all(repo.join("refs/pr")).expect("mkdir");
            std::fs::write(repo.join("refs/main"), MAIN).expect("write");
            std::fs::write(repo.join("refs/v1.0"), format!("{V1}\n")).expect("write");
            std::fs::write(repo.join("refs/pr/1"), ORPHAN).expect("write");
            std::fs::write(repo.join("refs/broken"), "not a hash").expect("write");
            let data = hub.join("datasets--org--data");
            std::fs::create_dir_all(data.join("snapshots").join(MAIN)).expect("mkdir");
            std::fs::create_dir_all(data.join("refs")).expect("mkdir");
            std::fs::write(data.join("refs/main"), MAIN).expect("write");
            std::fs::create_dir_all(hub.join("models--org--empty")).expect("mkdir");
            Self { dir }
        }

        fn root(&self) -> String {
            self.dir.path().display().to_string()
        }

        fn hub(&self) -> PathBuf {
            self.dir.path().join("hub")
        }

        /// Resolves with `vars` as the whole environment, from a pipeline folder `/p`.
        fn resolve(
            &self,
            ty: RepoType,
            raw: &str,
            vars: &[(&str, String)],
        ) -> Result<Option<PathBuf>, ResolveError> {
            let env = |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
            resolve(ty, raw, &ResolveCx::new(Path::new("/p"), &env))
        }

        fn model(&self, raw: &str) -> Result<Option<PathBuf>, ResolveError> {
            self.resolve(RepoType::Model, raw, &[("HF_HUB_CACHE", format!("{}/hub", self.root()))])
        }

        /// The error's message and help with the temp dir replaced by `[TMP]`.
        fn error(&self, raw: &str) -> String {
            let e = self.model(raw).expect_err(raw);
            let text = format!("{}\nhelp: {}", e.message, e.help.unwrap_or_default());
            text.replace(&self.root(), "[TMP]")
        }
    }

    fn check_parse(value: &str, expected: Option<(&str, &str, Option<&str>)>) {
        let got = parse(value).map(|r| (r.org, r.name, r.revision));
        assert_eq!(got, expected, "{value}");
    }

    #[test]
    fn hf_what_is_a_reference() {
        check_parse("google/gemma-2-2b", Some(("google", "gemma-2-2b", None)));
        check_parse("meta-llama/Llama-3.2-1B@main", Some(("meta-llama", "Llama-3.2-1B", Some("main"))));
        check_parse("a/b@refs/pr/1", Some(("a", "b", Some("refs/pr/1"))));
        check_parse("org/name.v2_x", Some(("org", "name.v2_x", None)));
        for no in [
            "name",
            "a/b/c",
            "/a/b",
            "./a",
            "../a",
            "a/..",
            ".a/b",
            "~/a",
            "~a/b",
            "a/",
            "/b",
            "a b/c",
            "a/b@",
            "a/b@x/../y",
            "a/b@/x",
            "a/b@x y",
            "a/b.jsonl@c@d",
            "data/web.jsonl/",
            "",
        ] {
            check_parse(no, None);
        }
    }

    #[test]
    fn hf_not_a_reference_is_none() {
        let c = Cache::new();
        for raw in ["/abs/model", "models/a/b", "./m", "plain", "a/b@x y"] {
            assert_eq!(c.model(raw), Ok(None), "{raw}");
        }
    }

    #[test]
    fn hf_main_by_default_and_named_revisions() {
        let c = Cache::new();
        let snap = |commit: &str| Some(c.hub().join("models--org--model/snapshots").join(commit));
        assert_eq!(c.model("org/model"), Ok(snap(MAIN)));
        assert_eq!(c.model("org/model@main"), Ok(snap(MAIN)));
        assert_eq!(c.model("org/model@v1.0"), Ok(snap(V1)));
        assert_eq!(c.model("hf:org/model@v1.0"), Ok(snap(V1)));
        // The snapshot's files are symlinks into blobs, as in a real cache.
        let p = c.model("org/model").expect("ok").expect("some");
        assert_eq!(std::fs::read_to_string(p.join("model.safetensors")).expect("read"), "weights");
    }

    #[test]
    fn hf_direct_commit() {
        let c = Cache::new();
        let want = Some(c.hub().join("models--org--model/snapshots").join(V1));
        assert_eq!(c.model(&format!("org/model@{V1}")), Ok(want));
    }

    #[test]
    fn hf_dataset() {
        let c = Cache::new();
        let vars = [("HF_HUB_CACHE", format!("{}/hub", c.root()))];
        let want = Some(c.hub().join("datasets--org--data/snapshots").join(MAIN));
        assert_eq!(c.resolve(RepoType::Dataset, "org/data", &vars), Ok(want));
        // A model of that name is not a dataset.
        let e = c.resolve(RepoType::Model, "org/data", &vars).expect_err("not a model");
        assert!(e.message.contains("models--org--data"), "{}", e.message);
        let e = c.resolve(RepoType::Dataset, "org/model", &vars).expect_err("not a dataset");
        assert!(
            e.message.starts_with("dataset `org/model` is not in the Hugging Face cache"),
            "{}",
            e.message
        );
        assert!(e.help.expect("help").contains("hf download org/model --repo-type dataset"));
    }

    #[test]
    fn hf_cache_root_from_the_environment() {
        let c = Cache::new();
        let snap = Some(c.hub().join("models--org--model/snapshots").join(MAIN));
        let root = c.root();
        let cases: [&[(&str, String)]; 5] = [
            &[("HF_HUB_CACHE", format!("{root}/hub")), ("HF_HOME", "/nope".into())],
            &[("HUGGINGFACE_HUB_CACHE", format!("{root}/hub")), ("HF_HOME", "/nope".into())],
            &[("HF_HOME", root.clone()), ("XDG_CACHE_HOME", "/nope".into())],
            &[("HF_HUB_CACHE", "~/hub".into()), ("HOME", root.clone())],
            &[("HF_HUB_CACHE", String::new()), ("HF_HOME", root.clone())],
        ];
        for vars in cases {
            assert_eq!(c.resolve(RepoType::Model, "org/model", vars), Ok(snap.clone()), "{vars:?}");
        }
        // XDG and HOME defaults append huggingface/hub.
        let xdg = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(xdg.path().join("huggingface")).expect("mkdir");
        symlink(c.hub(), xdg.path().join("huggingface/hub")).expect("symlink");
        let vars = [("XDG_CACHE_HOME", xdg.path().display().to_string())];
        assert!(c.resolve(RepoType::Model, "org/model", &vars).expect("xdg").is_some());
        let home = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(home.path().join(".cache/huggingface")).expect("mkdir");
        symlink(c.hub(), home.path().join(".cache/huggingface/hub")).expect("symlink");
        let vars = [("HOME", home.path().display().to_string())];
        assert!(c.resolve(RepoType::Model, "org/model", &vars).expect("home").is_some());
    }

    #[test]
    fn hf_errors_say_what_is_missing_and_where() {
        let c = Cache::new();
        let no_env = c.resolve(RepoType::Model, "org/model", &[]).expect_err("no cache");
        assert_eq!(
            no_env.message,
            "cannot find the Hugging Face cache: none of `HF_HUB_CACHE`, `HUGGINGFACE_HUB_CACHE`, `HF_HOME`, \
             `XDG_CACHE_HOME`, `HOME` is set"
        );
        let vars = [("HF_HOME", format!("{}/nope", c.root()))];
        let e = c.resolve(RepoType::Model, "org/model", &vars).expect_err("no folder");
        assert_eq!(
            e.message.replace(&c.root(), "[TMP]"),
            "model `org/model` is not in the Hugging Face cache (nor a local path: no `/p/org/model`): \
             no cache folder `[TMP]/nope/hub` (from `$HF_HOME`/hub)"
        );
        assert_eq!(
            c.error("org/other"),
            "model `org/other` is not in the Hugging Face cache (nor a local path: no `/p/org/other`): \
             no folder `[TMP]/hub/models--org--other`\nhelp: download it with `hf download org/other` \
             (or `huggingface-cli download org/other`); pipe never downloads (cache from `$HF_HUB_CACHE`)"
        );
        assert_eq!(
            c.error("org/model@v2"),
            "revision `v2` of model `org/model` is not in the Hugging Face cache: no \
             `[TMP]/hub/models--org--model/refs/v2`\nhelp: refs present: broken, main, pr/1, v1.0; download \
             it with `hf download org/model --revision v2` (or `huggingface-cli download org/model \
             --revision v2`), or write `org/model@<40-hex commit>`"
        );
        assert_eq!(
            c.error("hf:org/empty"),
            "revision `main` of model `org/empty` is not in the Hugging Face cache: no \
             `[TMP]/hub/models--org--empty/refs/main`\nhelp: the cache has no refs for it; download it with \
             `hf download org/empty --revision main` (or `huggingface-cli download org/empty --revision \
             main`), or write `org/empty@<40-hex commit>`"
        );
        assert_eq!(
            c.error("org/model@pr/1"),
            format!(
                "snapshot `{ORPHAN}` (revision `pr/1`) of model `org/model` is missing: no folder \
                 `[TMP]/hub/models--org--model/snapshots/{ORPHAN}`\nhelp: snapshots present: {MAIN}, {V1}; \
                 download it with `hf download org/model --revision pr/1` (or `huggingface-cli download \
                 org/model --revision pr/1`)"
            )
        );
        let e = c.error(&format!("org/model@{ORPHAN}"));
        assert!(e.starts_with(&format!("snapshot `{ORPHAN}` of model `org/model` is missing")), "{e}");
        let e = c.error("org/model@broken");
        assert!(e.contains("refs/broken` does not hold a commit hash"), "{e}");
        assert_eq!(
            c.error("hf:org"),
            "`hf:org` is not a Hugging Face reference\nhelp: write `hf:org/name`, `hf:org/name@revision` or \
             `hf:org/name@<commit>`"
        );
    }
}
