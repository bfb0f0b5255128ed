//! The `eval` stage through the real `pipe` binary on the tiny pipeline: `kl.json`, `kl.csv` and
//! the figure exist; the identity intervention has KL exactly 0 and feeding the base residual to
//! the chat layers does not; a rerun skips; without `latents` only the set-free interventions
//! run, and one that needs them fails naming the input; a bad parameter is refused before
//! anything runs, with the parameter named.

use std::fs;
use std::path::{Path, PathBuf};

use crate::support::{Env, tiny_toml};

fn kl_json(out: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(out.join("kl.json")).unwrap()).unwrap()
}

/// The result row of (intervention, subset).
fn row<'a>(v: &'a serde_json::Value, intervention: &str, subset: &str) -> &'a serde_json::Value {
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["intervention"] == intervention && r["subset"] == subset)
        .unwrap_or_else(|| panic!("no row {intervention}/{subset} in {v}"))
}

#[test]
fn tiny_eval_measures_the_interventions() {
    let env = Env::pipe();
    env.write("p.toml", &tiny_toml());
    env.ok(&["run", "p.toml"]);
    let out = env.out("p.toml", "eval");
    let v = kl_json(&out);
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 9 * 3, "{v}");

    let all = |i: &str| row(&v, i, "all");
    let tokens = all("vanilla_chat")["tokens"].as_u64().unwrap();
    let k_first = row(&v, "vanilla_chat", "k_first")["tokens"].as_u64().unwrap();
    let post = row(&v, "vanilla_chat", "post_k_first")["tokens"].as_u64().unwrap();
    assert!(tokens > 100 && k_first > 0 && post > 0, "{v}");
    assert_eq!(k_first + post, tokens);
    // 10 k_first tokens per assistant turn of the first 12 conversations (every answer is longer).
    let data =
        fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("pipelines/tiny/data/chat.jsonl"))
            .unwrap();
    let turns: u64 = data.lines().take(12).map(|l| l.matches("\"role\": \"assistant\"").count() as u64).sum();
    assert_eq!((turns, k_first), (14, 10 * turns));

    // The identity is exactly the chat model; the base residual in the chat layers is not.
    for subset in ["all", "k_first", "post_k_first"] {
        assert_eq!(row(&v, "vanilla_chat", subset)["kl_mean"], 0.0, "{subset}");
        assert_eq!(row(&v, "vanilla_chat", subset)["kl_stderr"], 0.0, "{subset}");
        assert!(row(&v, "vanilla_base2chat", subset)["kl_mean"].as_f64().unwrap() > 0.0, "{subset}");
    }
    let kl = |i: &str| all(i)["kl_mean"].as_f64().unwrap();
    assert!(kl("vanilla_base") > 0.0 && all("vanilla_base")["kl_base_mean"] == 0.0);
    assert!(all("vanilla_base2chat")["kl_stderr"].as_f64().unwrap() > 0.0);
    for r in results {
        assert!(r["kl_mean"].as_f64().unwrap() >= 0.0 && r["nll_mean"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(
            r["tokens"].as_u64(),
            row(&v, "vanilla_chat", r["subset"].as_str().unwrap())["tokens"].as_u64()
        );
    }
    // The chat-only sets come from the scale stage's table: halves of the same candidates.
    let sets = &v["latent_sets"];
    let candidates = sets["candidates"].as_u64().unwrap();
    assert!(candidates > 0, "the tiny crosscoder has eligible chat-only latents: {sets}");
    for name in ["dec_norm_diff-best", "dec_norm_diff-worst", "rank_sum-best", "rank_sum-worst"] {
        let size = sets[name]["size"].as_u64().unwrap();
        assert_eq!(size, (candidates as f64 * 0.5).round() as u64, "{name}");
        assert_eq!(sets[name]["latents"].as_array().unwrap().len() as u64, size);
    }

    let csv = fs::read_to_string(out.join("kl.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "intervention,subset,tokens,kl_mean,kl_stderr,nll_mean,kl_base_mean");
    assert_eq!(lines.len(), 1 + 27);
    assert!(lines.iter().any(|l| l.starts_with(&format!("vanilla_chat,all,{tokens},0,0,"))), "{csv}");

    let decoder = png::Decoder::new(fs::File::open(out.join("kl.png")).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (1600, 1000));
    let px = &buf[..info.buffer_size()];
    let ch = info.color_type.samples();
    let ink = px.chunks(ch).filter(|p| p[..3] != [255, 255, 255]).count() as f64 / (px.len() / ch) as f64;
    assert!((0.01..0.6).contains(&ink), "{ink}");
    let index: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("figures.json")).unwrap()).unwrap();
    assert_eq!(
        (index[0]["file"].as_str(), index[0]["svg"].as_str()),
        (Some("kl.png"), Some("kl.svg")),
        "{index}"
    );
    assert!(index[0]["caption"].as_str().unwrap().contains("12 conversations"), "{index}");
    let svg = fs::read_to_string(out.join("kl.svg")).unwrap();
    assert!(svg.contains("patch_rank_sum-best_cchat") && svg.contains("vanilla_base2chat"));

    let show = env.json(&["show", "p.toml", "eval"]);
    let metrics = &show["metrics"];
    assert_eq!(metrics["kl/all/vanilla_chat"], 0.0, "{show}");
    assert_eq!(metrics["tokens/all"], tokens);

    // A rerun computes nothing.
    assert!(env.actions("p.toml", &[]).iter().all(|(_, a)| a == "skip"));
    env.ok(&["run", "p.toml"]);
    assert_eq!(env.out("p.toml", "eval"), out);

    // Without `latents`, the set-free interventions only; nothing upstream reruns.
    env.write("q.toml", &tiny_toml().replace("latents = \"scale\"\nlayer = 2", "layer = 2"));
    let actions = env.actions("q.toml", &[]);
    let runs: Vec<&str> = actions.iter().filter(|(_, a)| a != "skip").map(|(s, _)| s.as_str()).collect();
    assert_eq!(runs, ["eval"]);
    env.ok(&["run", "q.toml"]);
    let w = kl_json(&env.out("q.toml", "eval"));
    assert_eq!(w["results"].as_array().unwrap().len(), 5 * 3);
    assert!(w["latent_sets"].is_null());
    assert_eq!(row(&w, "vanilla_base2chat", "all"), row(&v, "vanilla_base2chat", "all"));

    // A set-based intervention without `latents` fails the stage, naming the input.
    env.write(
        "r.toml",
        &tiny_toml().replace(
            "latents = \"scale\"\nlayer = 2",
            "layer = 2\ninterventions = [\"vanilla_chat\", \"patch_rank_sum-best_cchat\"]",
        ),
    );
    let err = env.stderr(&["run", "r.toml"], 1);
    assert!(err.contains("patch_rank_sum-best_cchat") && err.contains("`latents`"), "{err}");
}

#[test]
fn bad_parameters_are_refused_before_running() {
    let env = Env::pipe();
    for (extra, needle) in
        [("fraction = 1.5", "fraction"), ("interventions = [\"vanilla_mystery\"]", "interventions")]
    {
        env.write("p.toml", &tiny_toml().replace("max_docs = 12", &format!("max_docs = 12\n{extra}")));
        let err = env.stderr(&["run", "p.toml"], 2);
        assert!(err.contains(needle) && err.contains("p.toml:"), "{extra}: {err}");
        assert!(!env.ds().join("objects").exists(), "nothing ran");
    }
}
