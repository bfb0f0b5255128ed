//! The `plot` stage, `pipe diff` and `pipe report` through the real `pipe` binary on the tiny
//! pipeline and a variant of it with k = 3: the figures exist, decode and are not blank; the diff
//! of the two configs (text and JSON) is snapshotted with the machine-dependent parts (paths,
//! keys, metric values) masked; the report embeds the figures.

use std::fs;
use std::path::Path;

use crate::support::{Env, tiny_toml};

/// The tiny pipeline as `tiny.toml` and its k = 3 variant `tiny-k3.toml`, both run.
fn two_tiny_configs(env: &Env) {
    let a = tiny_toml();
    assert!(a.contains("\nk = 4\n") && a.contains("name = \"tiny\""));
    let b = a
        .replace("\nk = 4\n", "\nk = 3\n")
        .replace("name = \"tiny\"", "name = \"tiny-k3\"")
        .replace("k = 4\"", "k = 3\"");
    env.write("tiny.toml", &a);
    env.write("tiny-k3.toml", &b);
    env.ok(&["run", "tiny.toml"]);
    env.ok(&["run", "tiny-k3.toml"]);
}

const FIGURES: [&str; 8] = [
    "delta_norm",
    "decoder_cosine",
    "nu_scatter",
    "nu_histograms",
    "latents_below_threshold",
    "frequency_vs_nu",
    "nu_template",
    "training",
];

/// Decodes a PNG; returns (width, height, share of pixels that are not white, distinct colours).
fn png_ink(path: &Path) -> (u32, u32, f64, usize) {
    let decoder = png::Decoder::new(fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let ch = info.color_type.samples();
    let px: Vec<&[u8]> = buf[..info.buffer_size()].chunks(ch).collect();
    let ink = px.iter().filter(|p| p[..3] != [255, 255, 255]).count() as f64 / px.len() as f64;
    let colours: std::collections::HashSet<[u8; 3]> = px.iter().map(|p| [p[0], p[1], p[2]]).collect();
    (info.width, info.height, ink, colours.len())
}

fn check_figures(out: &Path) {
    let index: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("figures.json")).unwrap()).unwrap();
    let listed: Vec<&str> = index.as_array().unwrap().iter().map(|f| f["file"].as_str().unwrap()).collect();
    assert_eq!(listed, FIGURES.map(|f| format!("{f}.png")), "{index}");
    for entry in index.as_array().unwrap() {
        assert!(
            !entry["title"].as_str().unwrap().is_empty() && !entry["caption"].as_str().unwrap().is_empty()
        );
    }
    for stem in FIGURES {
        let (w, h, ink, colours) = png_ink(&out.join(format!("{stem}.png")));
        assert!(w >= 1600 && h >= 1000, "{stem}.png is {w}×{h}");
        assert!((0.01..0.6).contains(&ink) && colours > 8, "{stem}.png: {ink:.3} inked, {colours} colours");
        let svg = fs::read_to_string(out.join(format!("{stem}.svg"))).unwrap();
        let doc = roxmltree::Document::parse(&svg).unwrap_or_else(|e| panic!("{stem}.svg: {e}"));
        let texts = doc.descendants().filter(|n| n.has_tag_name("text")).count();
        let marks = doc
            .descendants()
            .filter(|n| n.has_tag_name("rect") || n.has_tag_name("circle") || n.has_tag_name("polyline"))
            .count();
        assert!(texts > 10 && marks > 5, "{stem}.svg: {texts} texts, {marks} marks");
    }
}

/// Metrics whose values follow from the data and parameters alone (token and step counts), the
/// same on every machine; the others depend on floating-point rounding (CPU kernels differ) or on
/// time, and are masked.
const EXACT_METRICS: [&str; 10] = [
    "d_model",
    "docs",
    "shards",
    "tokens",
    "dict_size",
    "steps",
    "train/step",
    "val/step",
    "sequences",
    "figures",
];

/// Masks what differs between machines and runs: the temporary folder, keys, and the values of
/// metrics not in [`EXACT_METRICS`]. Columns are re-spaced so the masked table does not depend on
/// the widths of the numbers.
fn mask_text(text: &str, tmp: &Path) -> String {
    let mut out = String::new();
    let mut in_metrics = false;
    for line in text.replace(&tmp.display().to_string(), "[TMP]").lines() {
        if line.starts_with("metrics") {
            in_metrics = true;
        } else if line.trim().is_empty() {
            in_metrics = false;
        }
        let exact = line.split_whitespace().nth(1).is_some_and(|m| EXACT_METRICS.contains(&m));
        let words: Vec<String> = line
            .split_whitespace()
            .map(|w| {
                let hex = w.len() >= 12
                    && w.chars().all(|c| c.is_ascii_hexdigit())
                    && w.chars().any(|c| c.is_ascii_digit());
                if hex {
                    "[key]".to_string()
                } else if in_metrics && !exact && w.parse::<f64>().is_ok() {
                    "#".to_string()
                } else {
                    w.to_string()
                }
            })
            .collect();
        let indent = line.len() - line.trim_start().len();
        out.push_str(&" ".repeat(indent));
        out.push_str(&words.join(" "));
        out.push('\n');
    }
    out
}

fn mask_json(v: &mut serde_json::Value, tmp: &str) {
    use serde_json::Value;
    match v {
        Value::String(s) => {
            *s = s.replace(tmp, "[TMP]");
            if s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()) {
                *s = "[key]".into();
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| mask_json(x, tmp)),
        Value::Object(o) => o.values_mut().for_each(|x| mask_json(x, tmp)),
        _ => {}
    }
}

#[test]
fn tiny_figures_diff_and_report() {
    let env = Env::pipe();
    two_tiny_configs(&env);
    let tmp = fs::canonicalize(env.dir.path()).unwrap();

    // The plot stage's figures, and the results link to them.
    let out = env.out("tiny.toml", "plot");
    check_figures(&out);
    let linked = env.ds().join("results/tiny/plot");
    assert_eq!(fs::canonicalize(&linked).unwrap(), fs::canonicalize(&out).unwrap());
    let show = env.json(&["show", "tiny.toml", "plot"]);
    assert_eq!(show["metrics"]["figures"], 8, "{show}");

    // `pipe diff` of the two configs, as text.
    let text = env.ok(&["diff", "tiny.toml", "tiny-k3.toml"]);
    let masked = mask_text(&text, &tmp).replace(&env.dir.path().display().to_string(), "[TMP]");
    insta::assert_snapshot!("tiny_diff_text", masked);
    // The overlay figures the kinds wrote.
    let folder = env.ds().join("diffs/tiny--tiny-k3");
    for f in ["train/training", "scale/delta_norm", "scale/latents_below_threshold", "collect/delta_norm"] {
        let (w, _, ink, colours) = png_ink(&folder.join(format!("{f}.png")));
        assert!(w >= 1600 && ink > 0.01 && colours > 8, "{f}.png");
        assert!(folder.join(format!("{f}.svg")).is_file());
    }

    // As JSON: the same comparison, values masked.
    let mut v = env.json(&["diff", "tiny.toml", "tiny-k3.toml"]);
    let k =
        v["params"].as_array().unwrap().iter().find(|p| p["stage"] == "train" && p["path"] == "k").cloned();
    assert_eq!(k.map(|p| p["values"].clone()), Some(serde_json::json!([4, 3])), "{v}");
    // The latent class and chat-specific counts of both configs, side by side: the planted
    // chat-only direction is found by both.
    for (stage, metric) in [("collect", "latents/chat_only"), ("scale", "chat_specific")] {
        let m =
            v["metrics"].as_array().unwrap().iter().find(|m| m["stage"] == stage && m["metric"] == metric);
        let values = m.map(|m| m["values"].clone()).unwrap_or_default();
        assert!(
            values.as_array().is_some_and(|a| a.len() == 2 && a.iter().all(|x| x.as_u64() >= Some(1))),
            "{stage} {metric}: {values}"
        );
    }
    for m in v["metrics"].as_array_mut().unwrap() {
        if EXACT_METRICS.contains(&m["metric"].as_str().unwrap()) {
            continue;
        }
        for field in ["values", "delta"] {
            if let Some(x) = m.get_mut(field) {
                match x {
                    serde_json::Value::Array(a) => {
                        a.iter_mut().filter(|x| x.is_number()).for_each(|x| *x = "#".into())
                    }
                    x if x.is_number() => *x = "#".into(),
                    _ => {}
                }
            }
        }
    }
    mask_json(&mut v, &tmp.display().to_string());
    mask_json(&mut v, &env.dir.path().display().to_string());
    insta::assert_json_snapshot!("tiny_diff_json", v);

    // `pipe report`: one page, every figure inline, nothing fetched.
    let page = env.ok(&["report", "tiny.toml"]);
    let html = fs::read_to_string(page.trim()).unwrap();
    assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("<script"));
    assert_eq!(
        html.matches("<img src=\"data:image/png;base64,").count(),
        FIGURES.len() + 1,
        "one image per figure, and the eval stage's kl.png"
    );
    assert!(html.contains("KL to the chat model after patching layer 2"));
    assert!(html.contains("Relative decoder norm difference"));

    // Several tables: the first is drawn alone under the stage's label, the others join the
    // threshold curves by stage name (a collect table has no ν: it is left out of them).
    let both = tiny_toml().replace("[stages.plot]", "[stages.plot2]\nkind = \"plot\"\nlatents = [\"scale\", \"collect\"]\nlabel = \"both\"\n\n[stages.plot]");
    env.write("both.toml", &both);
    env.ok(&["run", "both.toml"]);
    let out2 = env.out("both.toml", "plot2");
    let svg = fs::read_to_string(out2.join("delta_norm.svg")).unwrap();
    assert!(svg.contains("Relative decoder norm difference (both)"), "the first table is labelled");
    let index = fs::read_to_string(out2.join("figures.json")).unwrap();
    assert!(!index.contains("training"), "no training input, no training figure: {index}");
    assert!(fs::read_to_string(out2.join("latents_below_threshold.svg")).unwrap().contains("both ("));

    // Bad parameters are refused before anything runs; class bands that disagree with the
    // table's are refused when the stage runs, naming both stages, and nothing is published.
    let bad = tiny_toml().replace("label = \"tiny Llama, BatchTopK k = 4\"", "label = \"x\"\nwidth = 10");
    env.write("p.toml", &bad);
    let err = env.stderr(&["plan", "p.toml"], 2);
    assert!(err.contains("width") && err.contains("between 400 and 8000"), "{err}");
    let bad =
        tiny_toml().replace("label = \"tiny Llama, BatchTopK k = 4\"", "classes = { chat_only = 0.95 }");
    env.write("q.toml", &bad);
    let err = env.stderr(&["run", "q.toml"], 1);
    assert!(err.contains("plot") && err.contains("`scale`") && err.contains("classes"), "{err}");
    let status = env.json(&["status", "q.toml"]);
    let plot = status["stages"].as_array().unwrap().iter().find(|s| s["name"] == "plot").unwrap().clone();
    assert_ne!(plot["state"], "cached", "{status}");
    // What the datastore held is untouched: the good figures are still the pipeline's results.
    assert_eq!(fs::canonicalize(&linked).unwrap(), fs::canonicalize(&out).unwrap());
    check_figures(&out);
}
