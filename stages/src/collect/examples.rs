//! Quantile activating examples (DOMAIN.md §6c): for every latent and activation bucket (a range
//! of fractions of the latent's max activation), up to `n` sequences drawn by reservoir sampling
//! from the [`Csr`], and `examples.db`, the SQLite file the original's tooling reads.
//!
//! Latent j's thresholds are `thr[q] = max_act[j]·Q[q]` (f32, as the original's einsum); a
//! sequence whose largest activation of j is m falls in bucket `searchsorted(thr, m, right=False)`,
//! the number of thresholds below m (so buckets run 0..=Q.len(); the last is empty when
//! `Q` ends at 1). Sequences are read in CSR order and one whose exact tokens came earlier is
//! skipped. Each (latent, bucket) keeps the first `n` sequences, then replaces a uniformly random
//! slot with probability n/count; finally each list is sorted by m, descending (stable).
//!
//! Where it departs from the original, on purpose:
//! - It is seeded. Latent j draws from `SplitMix64::stream(seed, &[j])`, so the examples depend on
//!   the seed only, not on how latents are spread over threads (the original draws from Python's
//!   unseeded `random`, one stream over sequences then latents).
//! - `sequence_idx` is the sequence's index in `activations.safetensors` (duplicates included),
//!   not its index among distinct sequences, and `sequences` holds only the sequences an example
//!   refers to.
//! - Two more tables: `token_strings` (every token id of the stored sequences, decoded alone with
//!   the caches' tokenizer, special tokens kept; a token holding part of a multi-byte character
//!   decodes alone to U+FFFD) and `meta` (`quantiles`, `n`, `seed`).

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use rusqlite::{Connection, params};

use super::csr::Csr;
use crate::rng::SplitMix64;
use crate::text::{TextError, TextTokenizer};

/// The paper's buckets: fractions of a latent's max activation.
pub const PAPER_QUANTILES: [f64; 5] = [0.25, 0.5, 0.75, 0.95, 1.0];

/// The original's tables, with its keys, plus `meta`; `token_strings` when there is a tokenizer.
const TOKEN_STRINGS: &str = "CREATE TABLE token_strings (token_id INTEGER PRIMARY KEY, text TEXT)";
const SCHEMA: &str = "
CREATE TABLE sequences (
    sequence_idx INTEGER PRIMARY KEY,
    token_ids BLOB
);
CREATE TABLE quantile_examples (
    feature_idx INTEGER,
    quantile_idx INTEGER,
    activation REAL,
    sequence_idx INTEGER,
    PRIMARY KEY (feature_idx, sequence_idx),
    FOREIGN KEY (sequence_idx) REFERENCES sequences(sequence_idx)
);
CREATE TABLE activation_details (
    feature_idx INTEGER,
    sequence_idx INTEGER,
    positions BLOB,
    activation_values BLOB,
    PRIMARY KEY (feature_idx, sequence_idx),
    FOREIGN KEY (sequence_idx) REFERENCES sequences(sequence_idx),
    FOREIGN KEY (feature_idx, sequence_idx) REFERENCES quantile_examples(feature_idx, sequence_idx)
);
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT
);
";

#[derive(Clone, Debug, PartialEq)]
pub struct ExampleParams {
    /// Examples kept per (latent, bucket).
    pub n: usize,
    /// Bucket boundaries as fractions of the max activation, strictly increasing.
    pub quantiles: Vec<f64>,
    pub seed: u64,
}

impl Default for ExampleParams {
    fn default() -> Self {
        ExampleParams { n: 100, quantiles: PAPER_QUANTILES.to_vec(), seed: 42 }
    }
}

/// Why `quantiles` cannot be bucket boundaries, if so.
pub fn check_quantiles(quantiles: &[f64]) -> Result<(), &'static str> {
    if quantiles.is_empty() {
        return Err("must hold at least one fraction (the paper: [0.25, 0.5, 0.75, 0.95, 1.0])");
    }
    if !quantiles.iter().all(|q| q.is_finite() && *q > 0.0) {
        return Err("must be finite numbers > 0");
    }
    if quantiles.windows(2).any(|w| w[0] >= w[1]) {
        return Err("must be strictly increasing");
    }
    Ok(())
}

/// One kept sequence of a (latent, bucket): the latent's largest activation in it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Example {
    pub activation: f32,
    pub sequence: u32,
}

/// What [`quantile_examples`] keeps; see the module docs.
#[derive(Clone, Debug, PartialEq)]
pub struct Examples {
    pub params: ExampleParams,
    pub num_latents: usize,
    /// `lists[j * buckets + b]`: latent j's examples in bucket b, by activation, descending.
    lists: Vec<Vec<Example>>,
    /// `seen[j * buckets + b]`: the distinct sequences that fell there (the reservoir's count).
    seen: Vec<u64>,
}

/// Latent thresholds `max_act·Q[q]`, rounded to f32 as the original's f32 einsum.
pub fn thresholds(max_act: f32, quantiles: &[f64]) -> Vec<f32> {
    quantiles.iter().map(|q| max_act * *q as f32).collect()
}

/// `searchsorted(thr, m, right=False)`: how many thresholds lie below `m`.
pub fn bucket(thr: &[f32], m: f32) -> usize {
    thr.partition_point(|t| *t < m)
}

/// Whether each sequence is the first with its exact tokens.
fn first_occurrences(csr: &Csr) -> Vec<bool> {
    let mut seen = HashSet::with_capacity(csr.num_sequences());
    (0..csr.num_sequences()).map(|s| seen.insert(csr.sequence_tokens(s))).collect()
}

/// The examples of every latent, from the CSR (indexed by latent: [`Csr::index_by_latent`])
/// and each latent's max activation over all tokens (`max_act`, length `num_latents`).
pub fn quantile_examples(csr: &Csr, max_act: &[f32], params: &ExampleParams) -> Examples {
    let f = csr.num_latents;
    assert_eq!(csr.latent_offsets.len(), f + 1, "index the CSR by latent first");
    assert_eq!(max_act.len(), f, "one max activation per latent");
    let buckets = params.quantiles.len() + 1;
    let distinct = first_occurrences(csr);
    let per_latent: Vec<(Vec<Vec<Example>>, Vec<u64>)> = (0..f)
        .into_par_iter()
        .map(|j| {
            let thr = thresholds(max_act[j], &params.quantiles);
            let mut rng = SplitMix64::stream(params.seed, &[j as u64]);
            let mut lists = vec![Vec::new(); buckets];
            let mut seen = vec![0u64; buckets];
            // Latent j's entries are sorted by (sequence, position): one run per sequence.
            let entries = csr.latent_entries(j);
            let mut i = 0;
            while i < entries.len() {
                let s = csr.ids[entries[i] as usize][0];
                let mut m = 0f32;
                while i < entries.len() && csr.ids[entries[i] as usize][0] == s {
                    m = m.max(csr.values[entries[i] as usize]);
                    i += 1;
                }
                if !distinct[s as usize] {
                    continue;
                }
                let b = bucket(&thr, m);
                seen[b] += 1;
                let example = Example { activation: m, sequence: s };
                let list: &mut Vec<Example> = &mut lists[b];
                if list.len() < params.n {
                    list.push(example);
                } else if rng.next_f64() < params.n as f64 / seen[b] as f64 {
                    list[rng.below(params.n as u64) as usize] = example;
                }
            }
            for list in &mut lists {
                list.sort_by(|a, b| b.activation.total_cmp(&a.activation));
            }
            (lists, seen)
        })
        .collect();
    let mut out = Examples {
        params: params.clone(),
        num_latents: f,
        lists: Vec::with_capacity(f * buckets),
        seen: Vec::with_capacity(f * buckets),
    };
    for (lists, seen) in per_latent {
        out.lists.extend(lists);
        out.seen.extend(seen);
    }
    out
}

/// Positions and values of latent `j`'s activations in sequence `s` (the CSR indexed by latent).
pub fn activation_details(csr: &Csr, j: usize, s: u32) -> (Vec<u32>, Vec<f32>) {
    let entries = csr.latent_entries(j);
    let seq = |e: &u64| csr.ids[*e as usize][0];
    let lo = entries.partition_point(|e| seq(e) < s);
    let hi = entries.partition_point(|e| seq(e) <= s);
    entries[lo..hi].iter().map(|e| (csr.ids[*e as usize][1], csr.values[*e as usize])).unzip()
}

#[derive(Debug, thiserror::Error)]
pub enum ExamplesError {
    #[error("cannot write {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("decoding token strings: {0}")]
    Text(#[from] TextError),
}

fn i32_blob(values: impl IntoIterator<Item = i32>) -> Vec<u8> {
    values.into_iter().flat_map(i32::to_le_bytes).collect()
}

impl Examples {
    pub fn num_buckets(&self) -> usize {
        self.params.quantiles.len() + 1
    }

    /// Latent `j`'s examples in bucket `b`, by activation, descending.
    pub fn get(&self, j: usize, b: usize) -> &[Example] {
        &self.lists[j * self.num_buckets() + b]
    }

    /// How many distinct sequences of latent `j` fell in bucket `b`.
    pub fn seen(&self, j: usize, b: usize) -> u64 {
        self.seen[j * self.num_buckets() + b]
    }

    /// Examples kept, over all latents and buckets (rows of `quantile_examples`).
    pub fn len(&self) -> usize {
        self.lists.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The sequences some example refers to, ascending.
    pub fn sequences(&self) -> Vec<u32> {
        let set: BTreeSet<u32> = self.lists.iter().flatten().map(|e| e.sequence).collect();
        set.into_iter().collect()
    }

    /// (latent, bucket, example) in the original's order: bucket, then latent, then activation.
    fn rows(&self) -> impl Iterator<Item = (usize, usize, &Example)> + '_ {
        let buckets = self.num_buckets();
        (0..buckets).flat_map(move |b| {
            (0..self.num_latents).flat_map(move |j| self.get(j, b).iter().map(move |e| (j, b, e)))
        })
    }

    /// Writes `examples.db` (see the module docs) through a temporary file renamed into place,
    /// in one transaction. Inserts come in a fixed order, so the same examples give the same
    /// bytes. Without a tokenizer the `token_strings` table is left out.
    pub fn write_sqlite(
        &self,
        path: &Path,
        csr: &Csr,
        tokenizer: Option<&TextTokenizer>,
    ) -> Result<(), ExamplesError> {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".tmp");
        let tmp = path.with_file_name(name);
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| ExamplesError::Io { path, source }
        };
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&tmp)(e)),
            _ => {}
        }
        let written = self.write_db(&tmp, csr, tokenizer);
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        std::fs::rename(&tmp, path).map_err(io(path))
    }

    fn write_db(
        &self,
        path: &Path,
        csr: &Csr,
        tokenizer: Option<&TextTokenizer>,
    ) -> Result<(), ExamplesError> {
        let sql = |source| ExamplesError::Sqlite { path: path.to_owned(), source };
        let mut conn = Connection::open(path).map_err(sql)?;
        let tx = conn.transaction().map_err(sql)?;
        tx.execute_batch(SCHEMA).map_err(sql)?;
        let sequences = self.sequences();
        {
            let mut insert = tx.prepare("INSERT INTO sequences VALUES (?1, ?2)").map_err(sql)?;
            for &s in &sequences {
                let tokens = i32_blob(csr.sequence_tokens(s as usize).iter().map(|t| *t as i32));
                insert.execute(params![s, tokens]).map_err(sql)?;
            }
            let mut insert =
                tx.prepare("INSERT INTO quantile_examples VALUES (?1, ?2, ?3, ?4)").map_err(sql)?;
            for (j, b, e) in self.rows() {
                insert.execute(params![j as i64, b as i64, e.activation as f64, e.sequence]).map_err(sql)?;
            }
            let mut insert =
                tx.prepare("INSERT INTO activation_details VALUES (?1, ?2, ?3, ?4)").map_err(sql)?;
            for (j, _, e) in self.rows() {
                let (positions, values) = activation_details(csr, j, e.sequence);
                // The original stores float32 values as their bits, viewed as int32.
                let positions = i32_blob(positions.iter().map(|p| *p as i32));
                let values = i32_blob(values.iter().map(|v| v.to_bits() as i32));
                insert.execute(params![j as i64, e.sequence, positions, values]).map_err(sql)?;
            }
            if let Some(tok) = tokenizer {
                let ids: BTreeSet<u32> =
                    sequences.iter().flat_map(|s| csr.sequence_tokens(*s as usize)).copied().collect();
                tx.execute_batch(TOKEN_STRINGS).map_err(sql)?;
                let mut insert = tx.prepare("INSERT INTO token_strings VALUES (?1, ?2)").map_err(sql)?;
                for id in ids {
                    insert.execute(params![id, tok.decode(&[id])?]).map_err(sql)?;
                }
            }
            let quantiles: Vec<String> = self.params.quantiles.iter().map(|q| format!("{q:?}")).collect();
            let meta = [
                ("quantiles", format!("[{}]", quantiles.join(", "))),
                ("n", self.params.n.to_string()),
                ("seed", self.params.seed.to_string()),
            ];
            let mut insert = tx.prepare("INSERT INTO meta VALUES (?1, ?2)").map_err(sql)?;
            for (key, value) in meta {
                insert.execute(params![key, value]).map_err(sql)?;
            }
        }
        tx.commit().map_err(sql)?;
        conn.close().map_err(|(_, e)| sql(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CSR of `seqs` sequences (token sets drawn from a few, so some repeat) over `f` latents.
    fn random_csr(seqs: usize, f: usize, seed: u64) -> Csr {
        let mut rng = SplitMix64::new(seed);
        let mut csr = Csr::new(f);
        for _ in 0..seqs {
            let len = 1 + rng.below(6) as usize;
            let variant = rng.below(40) as u32;
            let tokens: Vec<u32> = (0..len as u32).map(|p| (variant * 7 + p) % 50).collect();
            let mut entries = Vec::new();
            for pos in 0..len as u32 {
                for j in 0..f as u32 {
                    if rng.next_f64() < 0.3 {
                        entries.push((pos, j, (rng.next_f64() * (1.0 + j as f64)) as f32 + 1e-3));
                    }
                }
            }
            csr.push_sequence(&tokens, &entries);
        }
        csr.end_dataset();
        csr.index_by_latent();
        csr
    }

    fn max_act(csr: &Csr) -> Vec<f32> {
        (0..csr.num_latents)
            .map(|j| csr.latent_entries(j).iter().map(|e| csr.values[*e as usize]).fold(0f32, f32::max))
            .collect()
    }

    fn check_bucket(max: f32, m: f32, expected: usize) {
        let thr = thresholds(max, &PAPER_QUANTILES);
        assert_eq!(bucket(&thr, m), expected, "max {max}, m {m}, thresholds {thr:?}");
    }

    #[test]
    fn buckets_are_searchsorted_left() {
        // A value equal to a threshold belongs to the bucket below it (right=False).
        check_bucket(4.0, 1.0, 0);
        check_bucket(4.0, 0.5, 0);
        check_bucket(4.0, f32::from_bits(1.0f32.to_bits() + 1), 1);
        check_bucket(4.0, 2.0, 1);
        check_bucket(4.0, 3.0, 2);
        check_bucket(4.0, 3.5, 3);
        check_bucket(4.0, 3.8, 3);
        check_bucket(4.0, 3.9, 4);
        check_bucket(4.0, 4.0, 4);
        check_bucket(4.0, 4.5, 5);
        // 0.95 rounds in f32 as in torch: thr = f32(3.0 * f32(0.95)).
        let t = 3.0f32 * 0.95f64 as f32;
        check_bucket(3.0, t, 3);
        check_bucket(3.0, f32::from_bits(t.to_bits() + 1), 4);
    }

    #[test]
    fn quantiles_are_checked() {
        assert!(check_quantiles(&PAPER_QUANTILES).is_ok());
        assert!(check_quantiles(&[]).is_err());
        assert!(check_quantiles(&[0.5, 0.5]).is_err());
        assert!(check_quantiles(&[0.5, 0.25]).is_err());
        assert!(check_quantiles(&[0.0, 1.0]).is_err());
        assert!(check_quantiles(&[0.5, f64::NAN]).is_err());
    }

    /// One latent whose m in sequence s is `ms[s]` (`tokens[s]` the sequence's single token).
    fn one_latent(ms: &[f32], tokens: &[u32]) -> Csr {
        let mut csr = Csr::new(1);
        for (m, t) in ms.iter().zip(tokens) {
            csr.push_sequence(&[*t, 0], &[(0, 0, *m * 0.5), (1, 0, *m)]);
        }
        csr.end_dataset();
        csr.index_by_latent();
        csr
    }

    #[test]
    fn reservoir_keeps_n_sorted_and_is_seeded() {
        let ms: Vec<f32> = (0..500).map(|i| 0.96 + (i % 17) as f32 * 0.001).collect();
        let tokens: Vec<u32> = (0..500).collect();
        let csr = one_latent(&ms, &tokens);
        let p = ExampleParams { n: 10, ..ExampleParams::default() };
        let a = quantile_examples(&csr, &[1.0], &p);
        assert_eq!(a.seen(0, 4), 500);
        assert_eq!(a.get(0, 4).len(), 10);
        assert_eq!(a.len(), 10);
        assert!(a.get(0, 4).windows(2).all(|w| w[0].activation >= w[1].activation));
        assert!(a.get(0, 4).iter().all(|e| e.activation == ms[e.sequence as usize]));
        assert_eq!(a, quantile_examples(&csr, &[1.0], &p));
        let csr6 = random_csr(100, 6, 3);
        let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        assert_eq!(
            one_thread.install(|| quantile_examples(&csr6, &max_act(&csr6), &p)),
            quantile_examples(&csr6, &max_act(&csr6), &p),
            "the examples depend on the thread count"
        );
        let b = quantile_examples(&csr, &[1.0], &ExampleParams { seed: 43, ..p.clone() });
        assert_ne!(a.get(0, 4), b.get(0, 4));
        // Late sequences get in (it is a reservoir, not the first n).
        assert!(a.get(0, 4).iter().any(|e| e.sequence >= 10));
    }

    #[test]
    fn reservoir_is_uniform() {
        // Each of 40 sequences ends up kept with probability n/40 = 1/4.
        let tokens: Vec<u32> = (0..40).collect();
        let csr = one_latent(&[1.0; 40], &tokens);
        let mut kept = [0u32; 40];
        for seed in 0..2000 {
            let p = ExampleParams { n: 10, seed, ..ExampleParams::default() };
            for e in quantile_examples(&csr, &[1.0], &p).get(0, 4) {
                kept[e.sequence as usize] += 1;
            }
        }
        assert!(kept.iter().all(|k| (400..600).contains(k)), "{kept:?}");
    }

    #[test]
    fn duplicate_sequences_are_skipped() {
        // Sequences 1 and 3 repeat 0's tokens: not counted, not kept, even with a larger m.
        let csr = one_latent(&[0.3, 1.0, 0.6, 0.9, 0.2], &[7, 7, 8, 7, 9]);
        let e = quantile_examples(&csr, &[1.0], &ExampleParams::default());
        let all: Vec<(usize, u32)> =
            (0..e.num_buckets()).flat_map(|b| e.get(0, b).iter().map(move |x| (b, x.sequence))).collect();
        assert_eq!(all, [(0, 4), (1, 0), (2, 2)]);
        assert_eq!((0..6).map(|b| e.seen(0, b)).sum::<u64>(), 3);
        assert_eq!(e.sequences(), [0, 2, 4]);
    }

    fn tiny_tokenizer() -> TextTokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/tiny/llama/base");
        TextTokenizer::from_dir(&dir).unwrap()
    }

    fn blob_i32(b: &[u8]) -> Vec<i32> {
        b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    /// (feature, quantile, activation, sequence, token_ids, positions, activation_values).
    type Row = (i64, i64, f64, u32, Vec<u8>, Vec<u8>, Vec<u8>);

    #[test]
    fn db_agrees_with_the_csr() {
        let csr = random_csr(300, 6, 5);
        let max = max_act(&csr);
        let p = ExampleParams { n: 7, ..ExampleParams::default() };
        let examples = quantile_examples(&csr, &max, &p);
        assert!(examples.len() > 6 * 7, "{}", examples.len());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("examples.db");
        let tok = tiny_tokenizer();
        examples.write_sqlite(&path, &csr, Some(&tok)).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "temporary files left behind");

        let db = Connection::open(&path).unwrap();
        let tables: Vec<String> = db
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(tables, ["activation_details", "meta", "quantile_examples", "sequences", "token_strings"]);

        let mut rows = db
            .prepare(
                "SELECT q.feature_idx, q.quantile_idx, q.activation, q.sequence_idx, s.token_ids, \
                 d.positions, d.activation_values FROM quantile_examples q \
                 JOIN sequences s USING (sequence_idx) \
                 JOIN activation_details d USING (feature_idx, sequence_idx) \
                 ORDER BY q.rowid",
            )
            .unwrap();
        let rows: Vec<Row> = rows
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows.len(), examples.len());
        let mut seen_pairs = HashSet::new();
        for (j, b, activation, s, tokens, positions, values) in &rows {
            let (j, b) = (&(*j as usize), &(*b as usize));
            assert!(seen_pairs.insert((*j, *s)));
            let want: Vec<i32> = csr.sequence_tokens(*s as usize).iter().map(|t| *t as i32).collect();
            assert_eq!(blob_i32(tokens), want);
            // The stored activation is the latent's max in the sequence, from the CSR.
            let entries: Vec<(u32, f32)> = csr
                .sequence_entries(*s as usize)
                .filter(|e| csr.ids[*e][2] as usize == *j)
                .map(|e| (csr.ids[e][1], csr.values[e]))
                .collect();
            let m = entries.iter().map(|e| e.1).fold(0f32, f32::max);
            assert_eq!(*activation, m as f64, "latent {j} sequence {s}");
            // Its bucket: above the threshold below it, at most the one it names.
            let thr = thresholds(max[*j], &p.quantiles);
            assert!(*b == 0 || thr[b - 1] < m);
            assert!(*b == thr.len() || m <= thr[*b]);
            assert!(*b < thr.len(), "m never exceeds the max activation");
            let got_positions: Vec<u32> = blob_i32(positions).iter().map(|p| *p as u32).collect();
            let got_values: Vec<f32> = blob_i32(values).iter().map(|v| f32::from_bits(*v as u32)).collect();
            assert_eq!(got_positions, entries.iter().map(|e| e.0).collect::<Vec<_>>());
            assert_eq!(got_values, entries.iter().map(|e| e.1).collect::<Vec<_>>());
        }
        // Buckets are listed in order, latents in order within, activations descending within.
        for w in rows.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            assert!((a.1, a.0) < (b.1, b.0) || ((a.1, a.0) == (b.1, b.0) && a.2 >= b.2));
        }
        let referenced: BTreeSet<u32> = rows.iter().map(|r| r.3).collect();
        let stored: i64 = db.query_row("SELECT count(*) FROM sequences", [], |r| r.get(0)).unwrap();
        assert_eq!(stored as usize, referenced.len(), "only referenced sequences are stored");
        let tokens: BTreeSet<u32> =
            referenced.iter().flat_map(|s| csr.sequence_tokens(*s as usize)).copied().collect();
        let strings: Vec<(u32, String)> = db
            .prepare("SELECT token_id, text FROM token_strings ORDER BY token_id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(strings.iter().map(|s| s.0).collect::<BTreeSet<_>>(), tokens);
        for (id, text) in &strings {
            assert_eq!(*text, tok.decode(&[*id]).unwrap());
        }
        let meta: Vec<(String, String)> = db
            .prepare("SELECT key, value FROM meta ORDER BY key")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let meta: Vec<(&str, &str)> = meta.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(meta, [("n", "7"), ("quantiles", "[0.25, 0.5, 0.75, 0.95, 1.0]"), ("seed", "42")]);
    }

    #[test]
    fn db_bytes_are_reproducible_and_tokenizer_is_optional() {
        let csr = random_csr(200, 5, 9);
        let max = max_act(&csr);
        let dir = tempfile::tempdir().unwrap();
        let tok = tiny_tokenizer();
        let write = |name: &str, tok: Option<&TextTokenizer>| {
            let path = dir.path().join(name);
            quantile_examples(&csr, &max, &ExampleParams::default()).write_sqlite(&path, &csr, tok).unwrap();
            std::fs::read(path).unwrap()
        };
        let a = write("a.db", Some(&tok));
        assert!(a == write("b.db", Some(&tok)), "examples.db differs between two runs");
        // Rewriting in place replaces the file.
        assert!(a == write("a.db", Some(&tok)));
        write("c.db", None);
        let db = Connection::open(dir.path().join("c.db")).unwrap();
        let n: i64 = db
            .query_row("SELECT count(*) FROM sqlite_master WHERE name = 'token_strings'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
    }
}
