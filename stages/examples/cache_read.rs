//! Read throughput of activation caches, as the `train` stage consumes them: batches of 2048
//! (2, d) pairs in the paper's locally shuffled order, decoded to f32.
//!
//! `cargo run --release -p pipe-stages --example cache_read -- DIR [TOKENS] [D] [DTYPE]` writes a
//! synthetic cache of TOKENS pairs of width D (default 262144 × 2304, bf16) in DIR (two caches,
//! "web" and "chat", of TOKENS/2 each), then reads it and prints pairs/s and GB/s.

use std::path::Path;
use std::time::Instant;

use stages::cache::format::{CacheBuilder, StoreDtype};
use stages::cache::{ActivationCache, LocalShuffle, PairedDataset};

fn write_cache(dir: &Path, tokens: u64, d: usize, dtype: StoreDtype, shard_tokens: u64, seed: u32) {
    let doc = 512u64;
    let mut b = CacheBuilder::new(dir, d, dtype, shard_tokens).unwrap();
    let mut x = seed;
    let mut left = tokens;
    while left > 0 {
        let rows = doc.min(left) as usize;
        let acts: Vec<f32> = (0..rows * 2 * d)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x % 2000) as f32 / 1000.0 - 1.0
            })
            .collect();
        b.push_doc(&acts, &vec![7u32; rows]).unwrap();
        left -= rows as u64;
    }
    b.finish("synthetic").unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let root = Path::new(args.get(1).map(String::as_str).unwrap_or("cache-read-bench")).to_owned();
    let tokens: u64 = args.get(2).map_or(262_144, |s| s.parse().unwrap());
    let d: usize = args.get(3).map_or(2304, |s| s.parse().unwrap());
    let dtype = match args.get(4).map_or("bf16", String::as_str) {
        "f32" => StoreDtype::F32,
        "f16" => StoreDtype::F16,
        _ => StoreDtype::Bf16,
    };
    let half = tokens / 2;
    for (i, name) in ["web", "chat"].iter().enumerate() {
        if !root.join(name).join("cache.json").exists() {
            let t = Instant::now();
            write_cache(&root.join(name), half, d, dtype, 65_536, i as u32 + 1);
            eprintln!("wrote {name}: {half} × (2, {d}) {dtype} in {:.1}s", t.elapsed().as_secs_f64());
        }
    }
    let caches = ["web", "chat"].iter().map(|n| ActivationCache::open(&root.join(n)).unwrap()).collect();
    let data = PairedDataset::new(caches, &[None, None]).unwrap();
    let shuffle = LocalShuffle::new(data.part_ranges(), 65_536, 42);
    let batch = 2048;
    let pair_bytes = 2 * d * dtype.size();
    let mut out = vec![0f32; batch * 2 * d];
    println!("| read | batches | pairs/s | GB/s (stored bytes) |");
    println!("|---|---|---|---|");
    for (label, threads) in [("local shuffle, 1 thread", 1), ("local shuffle, all threads", 0)] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        // Two passes: the first warms the page cache, the second is measured.
        for pass in 0..2 {
            let mut order = shuffle.iter_from(0);
            let batches = (data.len() as usize / batch).max(1);
            let t = Instant::now();
            for _ in 0..batches {
                let idx: Vec<u64> = order.by_ref().take(batch).collect();
                pool.install(|| data.batch_into(&idx, &mut out));
            }
            let secs = t.elapsed().as_secs_f64();
            let pairs = (batches * batch) as f64;
            if pass == 1 {
                println!(
                    "| {label} | {batches} | {:.0} | {:.2} |",
                    pairs / secs,
                    pairs * pair_bytes as f64 / secs / 1e9
                );
            }
        }
    }
    std::hint::black_box(&out);
}
