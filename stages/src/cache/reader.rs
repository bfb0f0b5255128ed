//! Reading activation caches: random access to (2, d) pairs by global index across one or more
//! caches, and the paper's locally shuffled order (DOMAIN.md §4).

use std::ops::Range;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::CacheError;
use super::format::{CacheMeta, Shard, StoreDtype};
use crate::rng::SplitMix64;

/// One published cache, memory-mapped. Cheap to open: nothing is read but the headers.
pub struct ActivationCache {
    dir: PathBuf,
    meta: CacheMeta,
    shards: Vec<Shard>,
    /// `starts[s]` is the global index of shard `s`'s first row; the last entry is the length.
    starts: Vec<u64>,
    doc_starts: Vec<u64>,
}

impl ActivationCache {
    /// Opens the cache in `dir` (a `cache` stage's output folder).
    pub fn open(dir: &Path) -> Result<ActivationCache, CacheError> {
        let meta = CacheMeta::read(dir)?;
        let mut shards = Vec::with_capacity(meta.shards.len());
        let mut starts = vec![0u64];
        let mut doc_starts = vec![0u64];
        for info in &meta.shards {
            let shard = Shard::open(&dir.join(&info.file), meta.d_model, meta.dtype, info.tokens, info.docs)?;
            starts.push(starts.last().unwrap() + info.tokens);
            doc_starts.push(doc_starts.last().unwrap() + info.docs);
            shards.push(shard);
        }
        if *starts.last().unwrap() != meta.tokens || *doc_starts.last().unwrap() != meta.docs {
            return Err(CacheError::corrupt(
                &dir.join("cache.json"),
                format!("its shards hold {} tokens, it claims {}", starts.last().unwrap(), meta.tokens),
            ));
        }
        Ok(ActivationCache { dir: dir.to_owned(), meta, shards, starts, doc_starts })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn meta(&self) -> &CacheMeta {
        &self.meta
    }

    /// Tokens (pairs) in the cache.
    pub fn len(&self) -> u64 {
        self.meta.tokens
    }

    pub fn is_empty(&self) -> bool {
        self.meta.tokens == 0
    }

    pub fn d_model(&self) -> usize {
        self.meta.d_model
    }

    pub fn dtype(&self) -> StoreDtype {
        self.meta.dtype
    }

    /// (shard, row in shard) of global row `i`.
    fn locate(&self, i: u64) -> (usize, u64) {
        assert!(i < self.len(), "index {i} out of range for a cache of {} tokens", self.len());
        let s = self.starts.partition_point(|&start| start <= i) - 1;
        (s, i - self.starts[s])
    }

    /// Row `i` as stored: (2, d) in the cache's dtype, little-endian.
    pub fn pair_bytes(&self, i: u64) -> &[u8] {
        let (s, r) = self.locate(i);
        self.shards[s].row_bytes(r)
    }

    /// Row `i` as f32 into `out` (length 2·d: base then chat).
    pub fn pair_into(&self, i: u64, out: &mut [f32]) {
        self.meta.dtype.decode(self.pair_bytes(i), out);
    }

    /// Rows `range` as f32 into `out` (length `range.len()`·2·d), reading each shard's part as
    /// one contiguous slice.
    pub fn range_into(&self, range: Range<u64>, out: &mut [f32]) {
        let width = 2 * self.d_model();
        assert_eq!(out.len() as u64, (range.end - range.start) * width as u64);
        let mut at = range.start;
        let mut written = 0usize;
        while at < range.end {
            let (s, r) = self.locate(at);
            let take = (self.shards[s].rows() - r).min(range.end - at);
            let bytes = self.shards[s].rows_bytes(r..r + take);
            self.meta.dtype.decode(bytes, &mut out[written..written + take as usize * width]);
            written += take as usize * width;
            at += take;
        }
    }

    /// The token id stored with row `i`.
    pub fn token(&self, i: u64) -> u32 {
        let (s, r) = self.locate(i);
        self.shards[s].token(r)
    }

    /// All token ids, in row order.
    pub fn tokens(&self) -> Vec<u32> {
        self.shards.iter().flat_map(|s| s.tokens()).collect()
    }

    /// Documents in the cache (including those that stored no token).
    pub fn num_docs(&self) -> u64 {
        self.meta.docs
    }

    /// `num_docs + 1` global row offsets: document j is rows `offsets[j]..offsets[j + 1]`.
    pub fn doc_offsets(&self) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.meta.docs as usize + 1);
        out.push(0);
        for (s, shard) in self.shards.iter().enumerate() {
            out.extend(shard.doc_offsets().iter().skip(1).map(|o| o + self.starts[s]));
        }
        out
    }

    /// The rows of document `j`.
    pub fn doc_range(&self, j: u64) -> Range<u64> {
        assert!(j < self.meta.docs, "document {j} out of range");
        let s = self.doc_starts.partition_point(|&start| start <= j) - 1;
        let offsets = self.shards[s].doc_offsets();
        let local = (j - self.doc_starts[s]) as usize;
        self.starts[s] + offsets[local]..self.starts[s] + offsets[local + 1]
    }

    /// Welford's state from `stats.safetensors`: (count, mean (2·d), m2 (2·d)), for merging the
    /// statistics of several caches exactly.
    pub fn stats_raw(&self) -> Result<(f64, Vec<f64>, Vec<f64>), CacheError> {
        let path = self.dir.join(&self.meta.stats);
        let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
            .map_err(|e| CacheError::corrupt(&path, e.to_string()))?;
        let get = |name: &str| -> Result<Vec<f64>, CacheError> {
            let t =
                tensors.get(name).ok_or_else(|| CacheError::corrupt(&path, format!("no tensor `{name}`")))?;
            t.flatten_all()
                .and_then(|t| t.to_dtype(candle_core::DType::F64))
                .and_then(|t| t.to_vec1::<f64>())
                .map_err(|e| CacheError::corrupt(&path, e.to_string()))
        };
        Ok((get("count")?[0], get("mean")?, get("m2")?))
    }

    /// Per-dimension mean and unbiased std of every stored token, each (2, d) flattened (base then
    /// chat), from `stats.safetensors`.
    pub fn stats(&self) -> Result<(Vec<f32>, Vec<f32>), CacheError> {
        let path = self.dir.join(&self.meta.stats);
        let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
            .map_err(|e| CacheError::corrupt(&path, e.to_string()))?;
        let get = |name: &str| -> Result<Vec<f32>, CacheError> {
            let t =
                tensors.get(name).ok_or_else(|| CacheError::corrupt(&path, format!("no tensor `{name}`")))?;
            t.flatten_all()
                .and_then(|t| t.to_dtype(candle_core::DType::F32))
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| CacheError::corrupt(&path, e.to_string()))
        };
        Ok((get("mean")?, get("std")?))
    }
}

/// Several caches as one index space, in the given order (the paper's `ConcatDataset` of web and
/// chat caches), each optionally cut to its first `limit` tokens.
pub struct PairedDataset {
    caches: Vec<ActivationCache>,
    /// Global start of each cache's part; the last entry is the length.
    starts: Vec<u64>,
}

impl PairedDataset {
    /// `limits[i]` keeps the first `limits[i]` tokens of cache `i` (`None`: all of them).
    pub fn new(caches: Vec<ActivationCache>, limits: &[Option<u64>]) -> Result<PairedDataset, CacheError> {
        let Some(first) = caches.first() else {
            return Err(CacheError::Invalid("no activation cache to read".into()));
        };
        let d = first.d_model();
        let mut starts = vec![0u64];
        for (i, c) in caches.iter().enumerate() {
            if c.d_model() != d {
                return Err(CacheError::Invalid(format!(
                    "caches have different widths: {} has d = {}, {} has d = {d}",
                    c.dir().display(),
                    c.d_model(),
                    first.dir().display()
                )));
            }
            let len = match limits.get(i).copied().flatten() {
                Some(limit) if limit > c.len() => {
                    return Err(CacheError::Invalid(format!(
                        "{} tokens wanted from {}, which holds {}",
                        limit,
                        c.dir().display(),
                        c.len()
                    )));
                }
                Some(limit) => limit,
                None => c.len(),
            };
            starts.push(starts.last().unwrap() + len);
        }
        Ok(PairedDataset { caches, starts })
    }

    pub fn len(&self) -> u64 {
        *self.starts.last().unwrap()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn d_model(&self) -> usize {
        self.caches[0].d_model()
    }

    pub fn caches(&self) -> &[ActivationCache] {
        &self.caches
    }

    /// The global index range of each cache's part.
    pub fn part_ranges(&self) -> Vec<Range<u64>> {
        self.starts.windows(2).map(|w| w[0]..w[1]).collect()
    }

    fn locate(&self, i: u64) -> (usize, u64) {
        assert!(i < self.len(), "index {i} out of range for {} pairs", self.len());
        let c = self.starts.partition_point(|&s| s <= i) - 1;
        (c, i - self.starts[c])
    }

    /// Pair `i` as f32 into `out` (2·d).
    pub fn pair_into(&self, i: u64, out: &mut [f32]) {
        let (c, r) = self.locate(i);
        self.caches[c].pair_into(r, out);
    }

    /// Pairs `indices` into `out` (`indices.len()`·2·d, row-major (B, 2, d)), in parallel.
    pub fn batch_into(&self, indices: &[u64], out: &mut [f32]) {
        let width = 2 * self.d_model();
        assert_eq!(out.len(), indices.len() * width);
        out.par_chunks_mut(width).zip(indices.par_iter()).for_each(|(o, &i)| self.pair_into(i, o));
    }

    /// Token ids of pairs `indices`.
    pub fn tokens_of(&self, indices: &[u64]) -> Vec<u32> {
        indices
            .iter()
            .map(|&i| {
                let (c, r) = self.locate(i);
                self.caches[c].token(r)
            })
            .collect()
    }
}

/// The paper's local shuffling (DOMAIN.md §4): the index space is cut into parts (one per cache,
/// e.g. web then chat); each part is cut into windows of `window` indices; for every window
/// position, each part's window is permuted and the parts are interleaved one index at a time
/// (`web₀, chat₀, web₁, chat₁, …`). Epochs use fresh permutations. Permutations come from
/// `seed`, the epoch, the window and the part only, so any position can be resumed exactly.
#[derive(Clone, Debug)]
pub struct LocalShuffle {
    parts: Vec<Range<u64>>,
    window: u64,
    seed: u64,
}

impl LocalShuffle {
    pub fn new(parts: Vec<Range<u64>>, window: u64, seed: u64) -> LocalShuffle {
        assert!(window > 0, "window must be positive");
        LocalShuffle { parts, window, seed }
    }

    /// Indices per epoch.
    pub fn epoch_len(&self) -> u64 {
        self.parts.iter().map(|p| p.end - p.start).sum()
    }

    fn windows(&self) -> u64 {
        self.parts.iter().map(|p| (p.end - p.start).div_ceil(self.window)).max().unwrap_or(0)
    }

    /// The size of window `w` summed over parts.
    fn window_len(&self, w: u64) -> u64 {
        self.parts.iter().map(|p| self.part_window(p, w).count() as u64).sum()
    }

    fn part_window(&self, p: &Range<u64>, w: u64) -> Range<u64> {
        let start = (p.start + w * self.window).min(p.end);
        start..(start + self.window).min(p.end)
    }

    /// The interleaved, permuted indices of window `w` of `epoch`.
    pub fn window_order(&self, epoch: u64, w: u64) -> Vec<u64> {
        let perms: Vec<Vec<u64>> = self
            .parts
            .iter()
            .enumerate()
            .map(|(c, p)| {
                let mut v: Vec<u64> = self.part_window(p, w).collect();
                SplitMix64::stream(self.seed, &[epoch, w, c as u64]).shuffle(&mut v);
                v
            })
            .collect();
        let longest = perms.iter().map(Vec::len).max().unwrap_or(0);
        let mut out = Vec::with_capacity(perms.iter().map(Vec::len).sum());
        for j in 0..longest {
            for perm in &perms {
                if let Some(&i) = perm.get(j) {
                    out.push(i);
                }
            }
        }
        out
    }

    /// An endless stream of indices (epoch after epoch) starting at `position` (counted from the
    /// start of epoch 0): resuming at a position continues exactly where a run stopped.
    pub fn iter_from(&self, position: u64) -> LocalShuffleIter<'_> {
        let epoch_len = self.epoch_len();
        assert!(epoch_len > 0, "nothing to shuffle");
        let epoch = position / epoch_len;
        let mut rest = position % epoch_len;
        let mut w = 0;
        while rest >= self.window_len(w) {
            rest -= self.window_len(w);
            w += 1;
        }
        let order = self.window_order(epoch, w);
        LocalShuffleIter { shuffle: self, epoch, window: w, order, at: rest as usize }
    }
}

/// See [`LocalShuffle::iter_from`].
pub struct LocalShuffleIter<'a> {
    shuffle: &'a LocalShuffle,
    epoch: u64,
    window: u64,
    order: Vec<u64>,
    at: usize,
}

impl Iterator for LocalShuffleIter<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        while self.at >= self.order.len() {
            self.window += 1;
            if self.window >= self.shuffle.windows() {
                self.window = 0;
                self.epoch += 1;
            }
            self.order = self.shuffle.window_order(self.epoch, self.window);
            self.at = 0;
        }
        self.at += 1;
        Some(self.order[self.at - 1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_shuffle_interleaves_permuted_windows() {
        let s = LocalShuffle::new(vec![0..10, 10..20], 4, 42);
        let epoch: Vec<u64> = s.iter_from(0).take(20).collect();
        // Window 0: {0..4} and {10..14} interleaved, then {4..8} / {14..18}, then {8,9} / {18,19}.
        for (w, (a, b)) in [(0..4, 10..14), (4..8, 14..18), (8..10, 18..20)].into_iter().enumerate() {
            let at = w * 8;
            let chunk = &epoch[at..at + 2 * (a.end - a.start) as usize];
            let mut web: Vec<u64> = chunk.iter().step_by(2).copied().collect();
            let mut chat: Vec<u64> = chunk.iter().skip(1).step_by(2).copied().collect();
            web.sort();
            chat.sort();
            assert_eq!(web, a.collect::<Vec<_>>());
            assert_eq!(chat, b.collect::<Vec<_>>());
        }
        let mut sorted = epoch.clone();
        sorted.sort();
        assert_eq!(sorted, (0..20).collect::<Vec<_>>());
        // The next epoch is a fresh permutation of the same windows.
        let next: Vec<u64> = s.iter_from(20).take(20).collect();
        assert_ne!(next, epoch);
        assert_eq!(s.iter_from(0).skip(20).take(20).collect::<Vec<_>>(), next);
    }

    #[test]
    fn resuming_at_any_position_continues_the_same_stream() {
        let s = LocalShuffle::new(vec![0..7, 7..12, 12..25], 3, 1);
        let full: Vec<u64> = s.iter_from(0).take(80).collect();
        for p in 0..60 {
            let resumed: Vec<u64> = s.iter_from(p).take(20).collect();
            assert_eq!(resumed, full[p as usize..p as usize + 20], "position {p}");
        }
        let other: Vec<u64> =
            LocalShuffle::new(vec![0..7, 7..12, 12..25], 3, 2).iter_from(0).take(25).collect();
        assert_ne!(other, full[..25], "the seed matters");
    }
}
