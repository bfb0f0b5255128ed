//! `pipelines/tiny/` holds the tiny model pair and corpora of `pipelines/tiny.toml`, committed so
//! that the pipeline runs from a fresh clone. This test regenerates them and fails when the
//! committed files differ from what the generator writes; `UPDATE_TINY=1 cargo test -p
//! pipe-stages --test tiny_assets` rewrites them.

use std::path::{Path, PathBuf};

use stages::models::tiny::{TinyModelSpec, write_tiny_pair};

const SEED: u64 = 42;

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn generate(root: &Path) {
    write_tiny_pair(&root.join("llama"), &TinyModelSpec::llama(), SEED).unwrap();
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for name in ["web.jsonl", "chat.jsonl"] {
        std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name), data.join(name))
            .unwrap();
    }
}

#[test]
fn committed_tiny_assets_match_the_generator() {
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/tiny");
    let fresh = tempfile::tempdir().unwrap();
    generate(fresh.path());
    if std::env::var_os("UPDATE_TINY").is_some() {
        let _ = std::fs::remove_dir_all(&committed);
        generate(&committed);
        return;
    }
    let want: Vec<PathBuf> =
        files(fresh.path()).iter().map(|p| p.strip_prefix(fresh.path()).unwrap().to_owned()).collect();
    let have: Vec<PathBuf> =
        files(&committed).iter().map(|p| p.strip_prefix(&committed).unwrap().to_owned()).collect();
    assert_eq!(
        have, want,
        "pipelines/tiny/ has other files than the generator writes; run with UPDATE_TINY=1"
    );
    for rel in &want {
        assert!(
            std::fs::read(fresh.path().join(rel)).unwrap() == std::fs::read(committed.join(rel)).unwrap(),
            "pipelines/tiny/{} differs from the generator's output; run with UPDATE_TINY=1",
            rel.display()
        );
    }
}
