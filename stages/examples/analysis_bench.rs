//! Speed of the analysis passes, Latent Scaling (`stages::scale::Accumulators`) and `collect`
//! (`stages::collect::collect`), on synthetic caches and a random crosscoder, for
//! bench/analysis.sh (which compares them with bench/analysis_numpy.py).
//!
//! ```text
//! cargo build --release -p pipe-stages --example analysis_bench
//! analysis_bench gen DIR TOKENS D [F] [K]   # DIR/web, DIR/chat (TOKENS pairs each, f32), DIR/crosscoder.safetensors
//! analysis_bench scale DIR                  # betas of all tokens of both caches -> DIR/pipe_betas.safetensors
//! analysis_bench collect DIR                # collect() over both caches -> DIR/pipe_collect.safetensors
//! ```
//!
//! `gen`: the tokens of train_bench's generator (every token a sparse combination of 16 of 1,024
//! random unit atoms over (2, d), plus noise), in documents of 20–400 tokens with random token ids
//! below 1,000. The crosscoder: `Crosscoder::init(d, F, norm_init_scale 1.0)` (F = 4096 unless
//! given), then the base decoder rows scaled per latent (10 % by 0.02: "chat-only", the rest by
//! U[0.3, 1.2)), the chat decoder rows by U[0.5, 1.5), a random decoder bias, zero encoder bias.
//! Sparsity: a BatchTopK inference threshold on the scaled codes (f = post · [post · c > θ]), θ
//! set so that on the first 4,096 tokens of `web` the K·4,096 largest scaled codes pass (K = 32
//! unless given). Saved in dictionary_learning names: `encoder.weight` (2, d, F), `encoder.bias`
//! (F), `decoder.weight` (2, F, d), `decoder.bias` (2, d), `threshold` (f32 scalar),
//! `code_normalization_id` (1 = CROSSCODER), `k`.
//!
//! `scale`, `collect`: batches of 4,096 tokens, as the stages read them (`scale`: one
//! `PairedDataset` over both caches, `batch_into`; `collect`: each cache in turn, templates none).
//! Prints one JSON line: tokens, seconds (the pass, from the opened caches to the betas /
//! `Collected`; loading the crosscoder and writing the result file excluded), tokens/s, VmHWM.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use stages::cache::format::{CacheBuilder, StoreDtype};
use stages::cache::{ActivationCache, PairedDataset};
use stages::collect::{CollectParams, collect};
use stages::rng::SplitMix64;
use stages::scale::Accumulators;
use stages::train::crosscoder::{CodeNormalization, Crosscoder};

const ATOMS: usize = 1024;
const ACTIVE: usize = 16;
const BATCH: usize = 4096;

fn generate(dir: &Path, tokens: usize, d: usize, seed: u64) {
    let mut rng = SplitMix64::new(seed);
    let unit = |rng: &mut SplitMix64, n: usize| -> Vec<f32> {
        let v: Vec<f64> = (0..n).map(|_| rng.next_f64() * 2.0 - 1.0).collect();
        let s = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter().map(|x| (x / s) as f32).collect()
    };
    let mut arng = SplitMix64::new(7);
    let atoms: Vec<Vec<f32>> = (0..ATOMS)
        .map(|i| match i * 10 / ATOMS {
            0 => std::iter::repeat_n(0.0, d).chain(unit(&mut arng, d)).collect(),
            1 => unit(&mut arng, d).into_iter().chain(std::iter::repeat_n(0.0, d)).collect(),
            _ => unit(&mut arng, 2 * d),
        })
        .collect();
    let mut b = CacheBuilder::new(dir, d, StoreDtype::F32, 100_000).unwrap();
    let mut left = tokens;
    while left > 0 {
        let n = (20 + rng.below(381) as usize).min(left);
        let mut acts = vec![0f32; n * 2 * d];
        for row in acts.chunks_exact_mut(2 * d) {
            for x in row.iter_mut() {
                *x = 0.02 * (rng.next_f64() as f32 - 0.5);
            }
            for _ in 0..ACTIVE {
                let a = &atoms[rng.below(ATOMS as u64) as usize];
                let m = 0.5 + rng.next_f64() as f32;
                row.iter_mut().zip(a).for_each(|(x, a)| *x += m * a);
            }
        }
        let toks: Vec<u32> = (0..n).map(|_| rng.below(1000) as u32).collect();
        b.push_doc(&acts, &toks).unwrap();
        left -= n;
    }
    b.finish("analysis_bench synthetic").unwrap();
}

fn make_crosscoder(dir: &Path, d: usize, f: usize, k: usize) {
    let cpu = Device::Cpu;
    let cc = Crosscoder::init(d, f, Some(1.0), CodeNormalization::Crosscoder, 11, &cpu).unwrap();
    let mut rng = SplitMix64::new(13);
    let mut dec: Vec<f32> = cc.w_dec.as_tensor().flatten_all().unwrap().to_vec1().unwrap(); // (2, F, d)
    for j in 0..f {
        let sb = if rng.below(10) == 0 { 0.02 } else { 0.3 + 0.9 * rng.next_f64() as f32 };
        let sc = 0.5 + rng.next_f64() as f32;
        dec[j * d..(j + 1) * d].iter_mut().for_each(|x| *x *= sb);
        dec[(f + j) * d..(f + j + 1) * d].iter_mut().for_each(|x| *x *= sc);
    }
    cc.w_dec.set(&Tensor::from_vec(dec, (2, f, d), &cpu).unwrap()).unwrap();
    let bias: Vec<f32> = (0..2 * d).map(|_| 0.1 * (rng.next_f64() as f32 - 0.5)).collect();
    cc.b_dec.set(&Tensor::from_vec(bias, (2, d), &cpu).unwrap()).unwrap();

    // θ: the (k·B)-th largest scaled code of the first B tokens of `web`.
    let web = ActivationCache::open(&dir.join("web")).unwrap();
    let n = (BATCH as u64).min(web.len());
    let mut host = vec![0f32; n as usize * 2 * d];
    web.range_into(0..n, &mut host);
    let x = Tensor::from_vec(host, (n as usize, 2, d), &cpu).unwrap();
    let scaled: Vec<f32> =
        cc.pre_relu(&x).and_then(|p| p.broadcast_mul(&cc.code_weights()?)?.flatten_all()?.to_vec1()).unwrap();
    let mut s = scaled;
    let want = (k * n as usize).min(s.len() - 1);
    s.select_nth_unstable_by(want, |a, b| b.total_cmp(a));
    let threshold = s[want];

    let mut map: HashMap<String, Tensor> = HashMap::new();
    for (name, v) in Crosscoder::NAMES.iter().zip(cc.vars()) {
        map.insert(name.to_string(), v.as_tensor().clone());
    }
    map.insert("threshold".into(), Tensor::new(threshold, &cpu).unwrap());
    map.insert(
        "code_normalization_id".into(),
        Tensor::new(CodeNormalization::Crosscoder.id(), &cpu).unwrap(),
    );
    map.insert("k".into(), Tensor::new(k as i64, &cpu).unwrap());
    candle_core::safetensors::save(&map, dir.join("crosscoder.safetensors")).unwrap();
    eprintln!("crosscoder d = {d}, F = {f}, threshold {threshold} (k = {k} on the first {n} tokens of web)");
}

fn load(dir: &Path) -> (Crosscoder, f32) {
    let cpu = Device::Cpu;
    let t = candle_core::safetensors::load(dir.join("crosscoder.safetensors"), &cpu).unwrap();
    let var = |n: &str| Var::from_tensor(&t[n]).unwrap();
    let (_, d, f) = t["encoder.weight"].dims3().unwrap();
    let cc = Crosscoder {
        w_enc: var("encoder.weight"),
        b_enc: var("encoder.bias"),
        w_dec: var("decoder.weight"),
        b_dec: var("decoder.bias"),
        norm: CodeNormalization::Crosscoder,
        d,
        f,
        matmul_dtype: DType::F32,
    };
    (cc, t["threshold"].to_scalar::<f32>().unwrap())
}

fn caches(dir: &Path) -> Vec<ActivationCache> {
    ["web", "chat"].iter().map(|c| ActivationCache::open(&dir.join(c)).unwrap()).collect()
}

fn vm_hwm() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn report(what: &str, tokens: u64, secs: f64, extra: serde_json::Value) {
    let mut out = serde_json::json!({
        "impl": "pipe", "what": what, "tokens": tokens, "seconds": secs,
        "tokens_per_s": tokens as f64 / secs, "vm_hwm": vm_hwm(),
        "threads": rayon::current_num_threads(),
    });
    out.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    println!("{out}");
}

fn scale(dir: &Path) {
    let (cc, threshold) = load(dir);
    let cpu = Device::Cpu;
    let t = Instant::now();
    let data = PairedDataset::new(caches(dir), &[None, None]).unwrap();
    let total = data.len();
    let mut acc = Accumulators::new(cc.f);
    let mut host = Vec::new();
    let mut start = 0u64;
    while start < total {
        let end = (start + BATCH as u64).min(total);
        let n = (end - start) as usize;
        host.resize(n * 2 * cc.d, 0.0);
        let idx: Vec<u64> = (start..end).collect();
        data.batch_into(&idx, &mut host);
        let x = Tensor::from_slice(&host, (n, 2, cc.d), &cpu).unwrap();
        acc.update(&cc, Some(threshold), &x).unwrap();
        start = end;
    }
    let betas = acc.betas(&cc).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for (name, v) in &betas.betas {
        map.insert(format!("betas_{name}"), Tensor::from_slice(v, cc.f, &cpu).unwrap());
    }
    let count: Vec<i64> = betas.count_active.iter().map(|c| *c as i64).collect();
    map.insert("count_active".into(), Tensor::from_vec(count, cc.f, &cpu).unwrap());
    candle_core::safetensors::save(&map, dir.join("pipe_betas.safetensors")).unwrap();
    let active: u64 = betas.count_active.iter().sum();
    report("scale", total, secs, serde_json::json!({ "nonzero": active }));
}

fn run_collect(dir: &Path) {
    let (cc, threshold) = load(dir);
    let cpu = Device::Cpu;
    let p: CollectParams = serde_json::from_value(serde_json::json!({ "batch_size": BATCH })).unwrap();
    let t = Instant::now();
    let cs = caches(dir);
    let total: u64 = cs.iter().map(|c| c.len()).sum();
    let out = collect(&cc, Some(threshold), None, &cs, &[None, None], &p, &cpu, &mut |_| Ok(())).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for (k, s) in out.datasets.iter().enumerate() {
        map.insert(format!("max_{k}"), Tensor::from_slice(&s.max, cc.f, &cpu).unwrap());
        let count: Vec<i64> = s.count.iter().map(|c| *c as i64).collect();
        map.insert(format!("count_{k}"), Tensor::from_vec(count, cc.f, &cpu).unwrap());
    }
    map.insert("sum".into(), Tensor::from_slice(&out.sum, cc.f, &cpu).unwrap());
    candle_core::safetensors::save(&map, dir.join("pipe_collect.safetensors")).unwrap();
    report(
        "collect",
        total,
        secs,
        serde_json::json!({ "nonzero": out.csr.values.len(), "sequences": out.csr.num_sequences() }),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("gen") if args.len() >= 4 => {
            let dir = Path::new(&args[1]);
            let (tokens, d): (usize, usize) = (args[2].parse().unwrap(), args[3].parse().unwrap());
            let f: usize = args.get(4).map_or(4096, |s| s.parse().unwrap());
            let k: usize = args.get(5).map_or(32, |s| s.parse().unwrap());
            let t = Instant::now();
            generate(&dir.join("web"), tokens, d, 1);
            generate(&dir.join("chat"), tokens, d, 2);
            make_crosscoder(dir, d, f, k);
            eprintln!("wrote 2 × {tokens} pairs of d = {d} (f32) in {:.1} s", t.elapsed().as_secs_f64());
        }
        Some("scale") if args.len() == 2 => scale(Path::new(&args[1])),
        Some("collect") if args.len() == 2 => run_collect(Path::new(&args[1])),
        _ => {
            eprintln!("usage: analysis_bench gen DIR TOKENS D [F] [K] | scale DIR | collect DIR");
            std::process::exit(2);
        }
    }
}
