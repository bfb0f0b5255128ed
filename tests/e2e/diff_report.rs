//! `pipe diff` over several pipelines (tables, JSON, the figure folder the stage kinds write) and
//! `pipe report` (one self-contained HTML page).

use std::fs;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::support::{DIAMOND, Env};

/// Three variants of the diamond: `b.seed` = 2, 3, 4; the third also salts `c`. The first two
/// share the pipeline name, so their labels are their file stems.
fn sweep(env: &Env) {
    env.write("k2.toml", &DIAMOND.replace("name = \"diamond\"", "name = \"sweep\""));
    env.write(
        "k3.toml",
        &DIAMOND.replace("name = \"diamond\"", "name = \"sweep\"").replace("seed = 2", "seed = 3"),
    );
    env.write(
        "k4.toml",
        &DIAMOND
            .replace("name = \"diamond\"", "name = \"other\"")
            .replace("seed = 2", "seed = 4")
            .replace("parts = [\"a\"]", "parts = [\"a\"]\nsalt = \"x\""),
    );
    for f in ["k2.toml", "k3.toml", "k4.toml"] {
        env.ok(&["run", f]);
    }
}

fn filters(env: &Env) -> Vec<(String, String)> {
    let tmp = fs::canonicalize(env.dir.path()).unwrap();
    let mut f = vec![(regex_escape(&tmp.display().to_string()), "[TMP]".to_string())];
    if tmp != env.dir.path() {
        f.push((regex_escape(&env.dir.path().display().to_string()), "[TMP]".to_string()));
    }
    f.push((r"\b[0-9a-f]{64}\b".into(), "[key]".into()));
    f.push((r"\b[0-9a-f]{12}\b".into(), "[key-------]".into()));
    f.push((r"\b[0-9a-f]{8}\b".into(), "[key---]".into()));
    f
}

fn regex_escape(s: &str) -> String {
    s.chars().fold(String::new(), |mut o, c| {
        if "\\.+*?()|[]{}^$".contains(c) {
            o.push('\\');
        }
        o.push(c);
        o
    })
}

fn folder(env: &Env) -> PathBuf {
    env.ds().join("diffs").join("k2--k3--other")
}

#[test]
fn diff_of_three_pipelines_as_tables() {
    let env = Env::new();
    sweep(&env);
    let text = env.ok(&["diff", "k2.toml", "k3.toml", "k4.toml"]);
    let filters = filters(&env);
    insta::with_settings!({filters => filters.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect::<Vec<_>>()}, {
        insta::assert_snapshot!(text);
    });
    // The emit stage `b` differs in all three and its kind compares: one row per label.
    let tsv = fs::read_to_string(folder(&env).join("b/sizes.tsv")).unwrap();
    assert_eq!(tsv, "label\tstage\tbytes\nk2\tb\t4096\nk3\tb\t4096\nother\tb\t4096\n");
    // `a` is shared by all three (nothing to compare); `c` and `d` are of a kind that compares nothing.
    let mut entries: Vec<String> = fs::read_dir(folder(&env))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    entries.sort();
    assert_eq!(entries, [".pipe-diff", "b"]);
}

#[test]
fn diff_of_three_pipelines_as_json() {
    let env = Env::new();
    sweep(&env);
    let out = env.ok(&["diff", "k2.toml", "k3.toml", "k4.toml", "--json"]);
    let filters = filters(&env);
    insta::with_settings!({filters => filters.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect::<Vec<_>>()}, {
        insta::assert_snapshot!(out);
    });
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["figures"]["files"][0]["files"], serde_json::json!(["b/sizes.tsv"]));
    assert!(v["metrics"].as_array().unwrap().iter().all(|m| m.get("delta").is_none()));
}

#[test]
fn the_figure_folder_is_replaced_whole() {
    let env = Env::new();
    sweep(&env);
    let args = ["diff", "k2.toml", "k3.toml", "k4.toml"];
    env.ok(&args);
    let f = folder(&env);
    fs::write(f.join("b/stale.txt"), "from an older diff").unwrap();
    fs::write(f.join("old.txt"), "from an older diff").unwrap();
    let text = env.ok(&args);
    assert!(text.contains(&format!("figures: {}", f.display())), "{text}");
    assert!(f.join("b/sizes.tsv").is_file());
    assert!(!f.join("b/stale.txt").exists() && !f.join("old.txt").exists());
    // No temporary or old folder is left beside it.
    let siblings: Vec<String> = fs::read_dir(f.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    assert_eq!(siblings, ["k2--k3--other"]);
}

#[test]
fn no_figures_and_custom_folders() {
    let env = Env::new();
    sweep(&env);
    let v = env.json(&["diff", "k2.toml", "k3.toml", "k4.toml", "--no-figures"]);
    assert_eq!(v["figures"]["folder"], serde_json::Value::Null);
    let text = env.ok(&["diff", "k2.toml", "k3.toml", "--no-figures"]);
    assert!(!text.contains("figures:"), "{text}");
    assert!(!env.ds().join("diffs").exists());

    env.ok(&["diff", "k2.toml", "k3.toml", "--out", "figs/ab"]);
    assert_eq!(
        fs::read_to_string(env.path("figs/ab/b/sizes.tsv")).unwrap(),
        "label\tstage\tbytes\nk2\tb\t4096\nk3\tb\t4096\n"
    );
    // A folder that no diff wrote is never replaced.
    let err = env.stderr(&["diff", "k2.toml", "k3.toml", "--out", "."], 2);
    assert!(err.contains("refusing to replace"), "{err}");
    assert!(env.path("k2.toml").is_file());
}

#[test]
fn a_failing_comparison_is_a_warning() {
    let env = Env::new();
    let parts = "[pipeline]\nname = \"NAME\"\n[stages.src]\nkind = \"emit\"\nfiles = 2\nseed = SEED\n";
    env.write("x.toml", &parts.replace("NAME", "x").replace("SEED", "1"));
    env.write("y.toml", &parts.replace("NAME", "y").replace("SEED", "2"));
    env.ok(&["run", "x.toml"]);
    env.ok(&["run", "y.toml"]);
    let text = env.ok(&["diff", "x.toml", "y.toml"]);
    assert!(text.contains("warning: comparing stage `src` (kind `emit`) failed: x: "), "{text}");
    assert!(!env.ds().join("diffs/x--y/src").exists());
}

#[test]
fn a_missing_pipeline_file_is_named() {
    let env = Env::new();
    sweep(&env);
    let err = env.stderr(&["diff", "k2.toml", "k3.toml", "nope.toml"], 2);
    assert!(err.contains("nope.toml"), "{err}");
    let err = env.stderr(&["diff", "k2.toml"], 2);
    assert!(err.contains("FILE"), "{err}");
}

const REPORT: &str = r#"
[pipeline]
name = "figs"
description = "Figures & <friends>"

[stages.src]
kind = "emit"

[stages.plot]
kind = "figure"
title = "Delta <norm>"
caption = "relative & absolute"

[stages.bare]
kind = "figure"

[stages.later]
kind = "combine"
parts = ["src"]
"#;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn png_uri(path: &Path) -> String {
    format!("data:image/png;base64,{}", b64(&fs::read(path).unwrap()))
}

#[test]
fn report_embeds_figures_and_fetches_nothing() {
    let env = Env::new();
    env.write("r.toml", REPORT);
    env.ok(&["run", "r.toml", "--only", "plot", "--only", "bare", "--only", "src"]);
    let out = env.ok(&["report", "r.toml"]);
    let path = env.ds().join("reports/figs.html");
    assert_eq!(out.trim(), path.display().to_string());
    let html = fs::read_to_string(&path).unwrap();
    assert!(!html.contains("http://") && !html.contains("https://"));
    assert!(!html.contains("<script"));
    assert!(html.contains("<h1>figs</h1>") && html.contains("Figures &amp; &lt;friends&gt;"), "{html}");

    // `plot` lists plot.png in figures.json: embedded with its title and caption, unlisted.png not.
    let plot = env.out("r.toml", "plot");
    let uri = png_uri(&plot.join("plot.png"));
    assert!(fs::read(plot.join("plot.png")).unwrap().starts_with(b"\x89PNG"));
    assert!(html.contains(&format!("<img src=\"{uri}\" alt=\"Delta &lt;norm&gt;\">")), "{html}");
    assert!(html.contains("<figcaption><strong>Delta &lt;norm&gt;</strong> relative &amp; absolute"));
    let section = |name: &str| {
        let start = html.find(&format!("<section id=\"stage-{name}\">")).unwrap();
        html[start..start + html[start..].find("</section>").unwrap()].to_string()
    };
    assert!(!section("plot").contains(&png_uri(&plot.join("unlisted.png"))));
    // `bare` has no figures.json: every top-level PNG, by name.
    let bare = section("bare");
    let (p, u) = (bare.find("alt=\"plot.png\"").unwrap(), bare.find("alt=\"unlisted.png\"").unwrap());
    assert!(p < u, "{bare}");
    // Metrics, parameters and a stage not run yet.
    assert!(
        section("plot").contains("<tr><th>ratio</th><td class=\"num\">0.6667</td></tr>"),
        "{}",
        section("plot")
    );
    assert!(section("src").contains("<tr><th><code>chunks</code></th><td><code>4</code></td></tr>"));
    assert!(section("later").contains("not run yet (run <code>pipe run "));

    // -o writes elsewhere, and the same page.
    let out = env.ok(&["report", "r.toml", "-o", "page/r.html"]);
    assert_eq!(out.trim(), "page/r.html");
    assert!(fs::read_to_string(env.path("page/r.html")).unwrap().contains(&uri));
}
