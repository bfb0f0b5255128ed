//! The `scale` stage through the real `pipe` binary on the tiny pipeline, whose chat model
//! carries a planted chat-only direction on chat-template tokens.

use std::collections::HashMap;

use crate::support::{Env, tiny_toml};

fn csv(path: &std::path::Path) -> Vec<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(str::to_string).collect();
    lines.map(|l| header.iter().cloned().zip(l.split(',').map(str::to_string)).collect()).collect()
}

#[test]
fn tiny_pipeline_finds_its_planted_chat_specific_latents() {
    let env = Env::pipe();
    env.write("p.toml", &tiny_toml());
    env.ok(&["run", "p.toml"]);
    let out = env.out("p.toml", "scale");
    let rows = csv(&out.join("latents.csv"));
    assert_eq!(rows.len(), 256);
    let chat_only: Vec<&HashMap<String, String>> =
        rows.iter().filter(|r| r["class"] == "Chat only").collect();
    assert!(!chat_only.is_empty(), "the planted direction gives chat-only latents");
    for r in &chat_only {
        let nu_e: f64 = r["nu_error"].parse().unwrap();
        let nu_r: f64 = r["nu_reconstruction"].parse().unwrap();
        assert!(nu_e.abs() < 0.2 && nu_r.abs() < 0.5, "planted latents are truly chat-specific: {r:?}");
        assert_eq!(r["chat_specific"], "true");
        // They fire on chat-template tokens: the joined collect statistics say so.
        let share: f64 = r["template_share"].parse().unwrap();
        assert!(share > 0.9, "{r:?}");
        assert_eq!(r["dead"], "false");
    }
    // Shared latents are reconstructed by both models alike.
    let shared: Vec<f64> = rows
        .iter()
        .filter(|r| r["class"] == "Shared" && r["count_active"] != "0")
        .map(|r| r["nu_reconstruction"].parse().unwrap())
        .collect();
    let mut sorted = shared.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    assert!((0.7..1.3).contains(&median), "median ν_r of shared latents {median}");
    assert!(out.join("latents.parquet").is_file() && out.join("betas.safetensors").is_file());
    let show = env.json(&["show", "p.toml", "scale"]);
    assert_eq!(show["metrics"]["chat_specific"].as_u64().unwrap(), chat_only.len() as u64, "{show}");
}
