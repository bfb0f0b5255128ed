//! The `collect` stage through the real `pipe` binary, on the tiny pipeline's crosscoder and
//! caches: the sparse activations answer "where does latent j fire" consistently with the
//! statistics, and the planted chat-template difference shows up in the template share.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use stages::cache::ActivationCache;
use stages::collect::Csr;
use stages::collect::stage::template_token_ids;

use crate::support::{Env, tiny_toml};

fn f32s(t: &HashMap<String, Tensor>, name: &str) -> Vec<f32> {
    t[name].to_vec1().unwrap()
}

#[test]
fn collect_on_the_tiny_pipeline_agrees_with_its_csr() {
    let env = Env::pipe();
    env.write("p.toml", &tiny_toml());
    env.ok(&["run", "p.toml"]);
    let out = env.out("p.toml", "collect");
    let csr = Csr::read(&out.join("activations.safetensors")).unwrap();
    let stats = candle_core::safetensors::load(out.join("stats.safetensors"), &Device::Cpu).unwrap();
    assert!(out.join("latents.parquet").is_file() && !out.join("latents.csv").exists());

    // Sequences are the caches' documents, web then chat, with their tokens.
    let caches: Vec<ActivationCache> = ["cache_web", "cache_chat"]
        .iter()
        .map(|s| ActivationCache::open(&env.out("p.toml", s)).unwrap())
        .collect();
    let docs: Vec<u64> = caches.iter().map(|c| c.num_docs()).collect();
    assert_eq!(csr.dataset_seqs, [0, docs[0], docs[0] + docs[1]]);
    let tokens: u64 = caches.iter().map(|c| c.len()).sum();
    assert_eq!(stats["total_tokens"].to_scalar::<i64>().unwrap() as u64, tokens);
    assert_eq!(csr.tokens.len() as u64, tokens);
    let chat = &caches[1];
    let doc = chat.num_docs() / 2;
    let range = chat.doc_range(doc);
    assert_eq!(
        csr.sequence_tokens((docs[0] + doc) as usize),
        range.map(|r| chat.token(r)).collect::<Vec<_>>()
    );

    // Where latent j fires: its entries' max and count are the statistics.
    let max = f32s(&stats, "max_activation");
    let freq = f32s(&stats, "frequency");
    let share = f32s(&stats, "template_share");
    let f = max.len();
    assert_eq!(csr.num_latents, f);
    let template =
        template_token_ids(&chat.meta().tokenizer).unwrap().expect("the tiny tokenizer has a template");
    assert!(!template.is_empty());
    let mut firing = 0;
    for j in 0..f {
        let entries = csr.latent_entries(j);
        let values: Vec<f32> = entries.iter().map(|e| csr.values[*e as usize]).collect();
        assert_eq!(values.iter().copied().fold(0f32, f32::max), max[j], "latent {j}");
        let count = (freq[j] as f64 * tokens as f64).round() as usize;
        assert_eq!(values.len(), count, "latent {j}");
        for e in entries {
            let [s, pos, latent] = csr.ids[*e as usize];
            assert_eq!(latent as usize, j);
            assert!((pos as usize) < csr.sequence_tokens(s as usize).len());
        }
        if values.is_empty() {
            assert!(share[j].is_nan());
            continue;
        }
        firing += 1;
        // The template share from the CSR's tokens.
        let on_template: f64 = entries
            .iter()
            .filter(|e| {
                let [s, pos, _] = csr.ids[**e as usize];
                template.contains(&csr.sequence_tokens(s as usize)[pos as usize])
            })
            .map(|e| csr.values[*e as usize] as f64)
            .sum();
        let total: f64 = values.iter().map(|v| *v as f64).sum();
        assert!(
            (share[j] as f64 - on_template / total).abs() < 1e-4,
            "latent {j}: {} vs {}",
            share[j],
            on_template / total
        );
    }
    assert!(firing > f / 4, "only {firing} of {f} latents fire");

    // The planted difference lives on template tokens: some latents fire almost only there.
    let template_latents: Vec<usize> =
        (0..f).filter(|j| share[*j] > 0.9 && freq[*j] as f64 * tokens as f64 >= 10.0).collect();
    assert!(!template_latents.is_empty(), "no latent fires mostly on template tokens: {share:?}");

    let show = env.json(&["show", "p.toml", "collect"]).to_string();
    for metric in ["mean_l0", "dead_fraction", "latents/chat_only", "entries"] {
        assert!(show.contains(metric), "{metric} missing: {show}");
    }
    // Rerunning changes nothing; the batch size is not in the key.
    let acts = env.actions("p.toml", &["--set", "stages.collect.batch_size=100"]);
    assert!(acts.iter().all(|(_, a)| a == "skip"), "{acts:?}");
}

#[test]
fn collect_options_and_errors() {
    let env = Env::pipe();
    let text = tiny_toml();
    env.write("p.toml", &text);
    env.ok(&[
        "run",
        "p.toml",
        "--set",
        "stages.collect.csv=true",
        "--set",
        "stages.collect.max_tokens_per_cache=500",
        "--set",
        "stages.collect.min_activation=0.5",
    ]);
    let out = env.out_with(
        "p.toml",
        "collect",
        &[
            "--set",
            "stages.collect.csv=true",
            "--set",
            "stages.collect.max_tokens_per_cache=500",
            "--set",
            "stages.collect.min_activation=0.5",
        ],
    );
    let csv = std::fs::read_to_string(out.join("latents.csv")).unwrap();
    let header = csv.lines().next().unwrap();
    assert!(header.contains("max_act_ds0_val,freq_ds0_val,max_act_ds1_val"), "{header}");
    assert!(header.ends_with("template_share,dead") && header.starts_with("latent,"), "{header}");
    let csr = Csr::read(&out.join("activations.safetensors")).unwrap();
    assert_eq!(csr.tokens.len(), 1000);
    assert!(csr.values.iter().all(|v| *v > 0.5));

    let o = env.run(&["plan", "p.toml", "--set", "stages.collect.batch_size=0"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("batch_size") && e.contains("at least 1"), "{e}");
}

#[test]
fn collect_writes_quantile_examples_that_decode() {
    let env = Env::pipe();
    env.write("p.toml", &tiny_toml());
    env.ok(&["run", "p.toml", "--set", "stages.collect.examples=5"]);
    let out = env.out_with("p.toml", "collect", &["--set", "stages.collect.examples=5"]);
    let csr = Csr::read(&out.join("activations.safetensors")).unwrap();
    let stats = candle_core::safetensors::load(out.join("stats.safetensors"), &Device::Cpu).unwrap();
    let max = f32s(&stats, "max_activation");
    let db = rusqlite::Connection::open(out.join("examples.db")).unwrap();
    let tables: Vec<String> = db
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(tables, ["activation_details", "meta", "quantile_examples", "sequences", "token_strings"]);
    let n: String = db.query_row("SELECT value FROM meta WHERE key = 'n'", [], |r| r.get(0)).unwrap();
    assert_eq!(n, "5");

    // The latent with the most top-bucket examples: at most 5, above 0.95 of its max, descending,
    // and each decodes, token by token, to the text of its sequence.
    let (j, count): (u32, i64) = db
        .query_row(
            "SELECT feature_idx, count(*) AS c FROM quantile_examples WHERE quantile_idx = 4 \
             GROUP BY feature_idx ORDER BY c DESC, feature_idx LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!((1..=5).contains(&count), "{count}");
    let top: Vec<(f64, u32, Vec<u8>)> = db
        .prepare(
            "SELECT activation, sequence_idx, token_ids FROM quantile_examples JOIN sequences \
             USING (sequence_idx) WHERE feature_idx = ?1 AND quantile_idx = 4 ORDER BY activation DESC",
        )
        .unwrap()
        .query_map([j], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let tokenizer_dir =
        ActivationCache::open(&env.out("p.toml", "cache_web")).unwrap().meta().tokenizer.clone();
    let tokenizer = stages::text::TextTokenizer::from_dir(&tokenizer_dir).unwrap();
    let mut lookup = db.prepare("SELECT text FROM token_strings WHERE token_id = ?1").unwrap();
    for (activation, s, blob) in &top {
        let m = *activation as f32;
        assert!(m > 0.95 * max[j as usize] && m <= max[j as usize], "latent {j}: {m} vs {}", max[j as usize]);
        let tokens: Vec<u32> =
            blob.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32).collect();
        assert_eq!(tokens, csr.sequence_tokens(*s as usize));
        let text: String =
            tokens.iter().map(|t| lookup.query_row([t], |r| r.get::<_, String>(0)).unwrap()).collect();
        // Tokens holding part of a multi-byte character decode alone to U+FFFD.
        let ascii = |t: &str| t.chars().filter(char::is_ascii).collect::<String>();
        assert!(!text.is_empty());
        assert_eq!(ascii(&text), ascii(&tokenizer.decode(&tokens).unwrap()), "sequence {s}");
    }

    let show = env.json(&["show", "p.toml", "collect", "--set", "stages.collect.examples=5"]).to_string();
    assert!(show.contains("\"examples\""), "metric missing: {show}");
}
