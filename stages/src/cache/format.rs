//! The on-disk format of an activation cache: `cache.json` (what was cached, and the shard list)
//! and shards, each a valid safetensors file holding whole documents:
//!
//! | tensor        | dtype            | shape          |                                            |
//! |---------------|------------------|----------------|--------------------------------------------|
//! | `activations` | F32 / BF16 / F16 | (n, 2, d)      | row i = (base, chat) residual of token i   |
//! | `doc_offsets` | I64              | (docs + 1,)    | document j = rows `doc_offsets[j]..[j+1]`  |
//! | `tokens`      | U32              | (n,)           | the token ids (before any base token map)  |
//!
//! The header is padded to [`HEADER_BYTES`] so that the activations start page-aligned and a
//! shard can be written in one pass: rows are appended as they come and the header, whose shape
//! is only known at the end, is written last into the reserved space. Any safetensors reader
//! (Python's `safetensors.numpy.load_file`, candle) opens a shard.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use candle_core::DType;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::CacheError;

/// `format` in `cache.json`; bump on any incompatible change.
pub const FORMAT: &str = "pipe-activation-cache/1";
/// Bytes before the first activation: the 8-byte length and the space-padded JSON header.
pub const HEADER_BYTES: usize = 4096;
/// Model index 0 and 1 of every (2, d) pair.
pub const MODELS: [&str; 2] = ["base", "chat"];

/// The element type of stored activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StoreDtype {
    F32,
    Bf16,
    F16,
}

impl StoreDtype {
    pub fn size(self) -> usize {
        match self {
            StoreDtype::F32 => 4,
            StoreDtype::Bf16 | StoreDtype::F16 => 2,
        }
    }

    /// The safetensors dtype name.
    pub fn safetensors(self) -> &'static str {
        match self {
            StoreDtype::F32 => "F32",
            StoreDtype::Bf16 => "BF16",
            StoreDtype::F16 => "F16",
        }
    }

    pub fn from_candle(dtype: DType) -> Option<StoreDtype> {
        match dtype {
            DType::F32 => Some(StoreDtype::F32),
            DType::BF16 => Some(StoreDtype::Bf16),
            DType::F16 => Some(StoreDtype::F16),
            _ => None,
        }
    }

    /// Appends `values` encoded little-endian in this dtype (round to nearest even).
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(values.len() * self.size());
        match self {
            StoreDtype::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            StoreDtype::Bf16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes())),
            StoreDtype::F16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_bits().to_le_bytes())),
        }
    }

    /// Decodes little-endian `bytes` of this dtype into `out` (same number of elements).
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) {
        debug_assert_eq!(bytes.len(), out.len() * self.size());
        match self {
            StoreDtype::F32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            StoreDtype::Bf16 => {
                // bf16 is the top half of an f32: widening is exact.
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
                }
            }
            StoreDtype::F16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
        }
    }
}

impl std::fmt::Display for StoreDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreDtype::F32 => "f32",
            StoreDtype::Bf16 => "bf16",
            StoreDtype::F16 => "f16",
        })
    }
}

/// One shard in `cache.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// Relative to the cache folder.
    pub file: String,
    /// Rows (tokens) in the shard.
    pub tokens: u64,
    /// Index of the shard's first document in the dataset order.
    pub first_doc: u64,
    /// Documents in the shard (including documents that stored no token).
    pub docs: u64,
}

/// One model of the pair in `cache.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub model_type: String,
    pub num_layers: usize,
    pub hidden_size: usize,
}

/// Where the documents came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetInfo {
    /// The files read, in order.
    pub files: Vec<PathBuf>,
    pub split: Option<String>,
    pub column: String,
    /// `text` or `messages`.
    pub column_type: String,
}

/// `cache.json`: everything a reader needs, and what produced it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheMeta {
    pub format: String,
    pub d_model: usize,
    /// Decoder block whose output is cached (0-based).
    pub layer: usize,
    pub dtype: StoreDtype,
    /// The dtype the models ran in.
    pub compute_dtype: String,
    pub tokens: u64,
    pub docs: u64,
    pub shards: Vec<ShardInfo>,
    /// `base` then `chat`.
    pub models: Vec<ModelInfo>,
    /// Folder whose tokenizer encoded the documents.
    pub tokenizer: PathBuf,
    pub context_len: usize,
    pub ignore_first_n: usize,
    /// Token ids replaced in the base model's input (the stored tokens are before replacement).
    pub base_token_map: Vec<(u32, u32)>,
    pub bos_id: Option<u32>,
    pub dataset: DatasetInfo,
    /// Per model (base, chat) per dimension, over every stored token: in `stats.safetensors`.
    pub stats: String,
}

impl CacheMeta {
    pub fn read(dir: &Path) -> Result<CacheMeta, CacheError> {
        let path = dir.join("cache.json");
        let text =
            std::fs::read_to_string(&path).map_err(|source| CacheError::Io { path: path.clone(), source })?;
        let meta: CacheMeta = serde_json::from_str(&text)
            .map_err(|e| CacheError::corrupt(&path, format!("invalid JSON: {e}")))?;
        if meta.format != FORMAT {
            return Err(CacheError::corrupt(
                &path,
                format!("format {:?}, this pipe reads {FORMAT:?}; rerun the cache stage", meta.format),
            ));
        }
        Ok(meta)
    }
}

/// A shard being written. Rows must be appended in token order; [`ShardWriter::finish`] writes
/// the document offsets, the tokens and the header, and syncs. A shard that is not finished is
/// not a valid safetensors file (its header is zeros), so it is never mistaken for a whole one.
pub struct ShardWriter {
    path: PathBuf,
    file: BufWriter<File>,
    d_model: usize,
    dtype: StoreDtype,
    rows: u64,
    tokens: Vec<u32>,
    doc_offsets: Vec<i64>,
    encoded: Vec<u8>,
}

impl ShardWriter {
    pub fn create(path: &Path, d_model: usize, dtype: StoreDtype) -> Result<ShardWriter, CacheError> {
        let io = |source| CacheError::Io { path: path.to_owned(), source };
        let mut file = BufWriter::with_capacity(1 << 22, File::create(path).map_err(io)?);
        file.write_all(&[0u8; HEADER_BYTES]).map_err(io)?;
        Ok(ShardWriter {
            path: path.to_owned(),
            file,
            d_model,
            dtype,
            rows: 0,
            tokens: Vec::new(),
            doc_offsets: vec![0],
            encoded: Vec::new(),
        })
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    pub fn docs(&self) -> u64 {
        self.doc_offsets.len() as u64 - 1
    }

    /// Appends whole documents: `acts` is (n, 2, d) row-major f32, `tokens` their n ids,
    /// `doc_lengths` the rows of each document (summing to n; zeros allowed).
    pub fn append(&mut self, acts: &[f32], tokens: &[u32], doc_lengths: &[usize]) -> Result<(), CacheError> {
        let n = tokens.len();
        assert_eq!(acts.len(), n * 2 * self.d_model, "activations do not match the token count");
        assert_eq!(doc_lengths.iter().sum::<usize>(), n, "document lengths do not match the token count");
        self.encoded.clear();
        self.dtype.encode(acts, &mut self.encoded);
        self.file
            .write_all(&self.encoded)
            .map_err(|source| CacheError::Io { path: self.path.clone(), source })?;
        self.tokens.extend_from_slice(tokens);
        let mut at = *self.doc_offsets.last().expect("starts with 0");
        for len in doc_lengths {
            at += *len as i64;
            self.doc_offsets.push(at);
        }
        self.rows += n as u64;
        Ok(())
    }

    /// Completes the file and returns (rows, documents).
    pub fn finish(mut self) -> Result<(u64, u64), CacheError> {
        let io = |source| CacheError::Io { path: self.path.clone(), source };
        let acts_bytes = self.rows * 2 * self.d_model as u64 * self.dtype.size() as u64;
        let offsets_bytes = self.doc_offsets.len() as u64 * 8;
        let tokens_bytes = self.rows * 4;
        let mut tail = Vec::with_capacity((offsets_bytes + tokens_bytes) as usize);
        self.doc_offsets.iter().for_each(|o| tail.extend_from_slice(&o.to_le_bytes()));
        self.tokens.iter().for_each(|t| tail.extend_from_slice(&t.to_le_bytes()));
        self.file.write_all(&tail).map_err(io)?;
        let header = header_json(
            self.dtype,
            self.rows,
            self.d_model,
            self.doc_offsets.len() as u64,
            [acts_bytes, offsets_bytes, tokens_bytes],
        );
        let mut file = self.file.into_inner().map_err(|e| io(e.into_error()))?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(&header).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok((self.rows, self.doc_offsets.len() as u64 - 1))
    }
}

/// The 8-byte length and the JSON header, space-padded to [`HEADER_BYTES`].
fn header_json(dtype: StoreDtype, rows: u64, d_model: usize, offsets: u64, sizes: [u64; 3]) -> Vec<u8> {
    let [a, o, t] = sizes;
    let json = serde_json::json!({
        "__metadata__": { "format": FORMAT, "models": MODELS.join(",") },
        "activations": { "dtype": dtype.safetensors(), "shape": [rows, 2, d_model], "data_offsets": [0, a] },
        "doc_offsets": { "dtype": "I64", "shape": [offsets], "data_offsets": [a, a + o] },
        "tokens": { "dtype": "U32", "shape": [rows], "data_offsets": [a + o, a + o + t] },
    })
    .to_string();
    let n = HEADER_BYTES - 8;
    assert!(json.len() <= n, "shard header too long");
    let mut out = Vec::with_capacity(HEADER_BYTES);
    out.extend_from_slice(&(n as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    out.resize(HEADER_BYTES, b' ');
    out
}

/// A finished shard, memory-mapped.
pub struct Shard {
    path: PathBuf,
    map: memmap2::Mmap,
    rows: u64,
    d_model: usize,
    dtype: StoreDtype,
    offsets_at: usize,
    docs: u64,
    tokens_at: usize,
}

impl Shard {
    /// Maps `path` and checks its header against what `cache.json` says.
    pub fn open(
        path: &Path,
        d_model: usize,
        dtype: StoreDtype,
        rows: u64,
        docs: u64,
    ) -> Result<Shard, CacheError> {
        let file = File::open(path).map_err(|source| CacheError::Io { path: path.to_owned(), source })?;
        // Safety: published objects are never written again (the store's invariant); a file
        // truncated behind our back would fault, as with any mmap reader.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|source| CacheError::Io { path: path.to_owned(), source })?;
        let expected = header_json(
            dtype,
            rows,
            d_model,
            docs + 1,
            [rows * 2 * d_model as u64 * dtype.size() as u64, (docs + 1) * 8, rows * 4],
        );
        if map.len() < HEADER_BYTES || map[..HEADER_BYTES] != expected[..] {
            return Err(CacheError::corrupt(
                path,
                format!("header does not describe {rows} rows × (2, {d_model}) {dtype} and {docs} documents"),
            ));
        }
        let acts = rows as usize * 2 * d_model * dtype.size();
        let offsets_at = HEADER_BYTES + acts;
        let tokens_at = offsets_at + (docs as usize + 1) * 8;
        if map.len() != tokens_at + rows as usize * 4 {
            return Err(CacheError::corrupt(
                path,
                format!("{} bytes, expected {}", map.len(), tokens_at + rows as usize * 4),
            ));
        }
        #[cfg(unix)]
        let _ = map.advise(memmap2::Advice::Random);
        Ok(Shard { path: path.to_owned(), map, rows, d_model, dtype, offsets_at, docs, tokens_at })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    pub fn docs(&self) -> u64 {
        self.docs
    }

    /// The raw bytes of row `i`: (2, d) in the stored dtype.
    pub fn row_bytes(&self, i: u64) -> &[u8] {
        let len = 2 * self.d_model * self.dtype.size();
        let at = HEADER_BYTES + i as usize * len;
        &self.map[at..at + len]
    }

    /// Rows `range` as raw bytes (contiguous).
    pub fn rows_bytes(&self, range: std::ops::Range<u64>) -> &[u8] {
        let len = 2 * self.d_model * self.dtype.size();
        &self.map[HEADER_BYTES + range.start as usize * len..HEADER_BYTES + range.end as usize * len]
    }

    pub fn token(&self, i: u64) -> u32 {
        let at = self.tokens_at + i as usize * 4;
        u32::from_le_bytes(self.map[at..at + 4].try_into().expect("4 bytes"))
    }

    pub fn tokens(&self) -> Vec<u32> {
        self.map[self.tokens_at..self.tokens_at + self.rows as usize * 4]
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    /// `docs + 1` offsets: document j is rows `offsets[j]..offsets[j + 1]`.
    pub fn doc_offsets(&self) -> Vec<u64> {
        self.map[self.offsets_at..self.tokens_at]
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as u64)
            .collect()
    }
}

/// Writes a complete cache folder from documents given in memory: for activations that do not
/// come from the `cache` stage (synthetic data in tests and benchmarks, imports).
pub struct CacheBuilder {
    dir: PathBuf,
    d_model: usize,
    dtype: StoreDtype,
    shard_tokens: u64,
    current: Option<(ShardWriter, String, u64)>,
    shards: Vec<ShardInfo>,
    docs: u64,
    tokens: u64,
    welford: Welford,
}

impl CacheBuilder {
    pub fn new(
        dir: &Path,
        d_model: usize,
        dtype: StoreDtype,
        shard_tokens: u64,
    ) -> Result<CacheBuilder, CacheError> {
        let shards = dir.join("shards");
        std::fs::create_dir_all(&shards).map_err(|source| CacheError::Io { path: shards, source })?;
        Ok(CacheBuilder {
            dir: dir.to_owned(),
            d_model,
            dtype,
            shard_tokens,
            current: None,
            shards: Vec::new(),
            docs: 0,
            tokens: 0,
            welford: Welford::new(2 * d_model),
        })
    }

    /// Appends one document: `acts` (n, 2, d) row-major, `tokens` its n ids.
    pub fn push_doc(&mut self, acts: &[f32], tokens: &[u32]) -> Result<(), CacheError> {
        if self.current.is_none() {
            let file = format!("shards/{:05}.safetensors", self.shards.len());
            let w = ShardWriter::create(&self.dir.join(&file), self.d_model, self.dtype)?;
            self.current = Some((w, file, self.docs));
        }
        let (w, _, _) = self.current.as_mut().expect("just created");
        w.append(acts, tokens, &[tokens.len()])?;
        self.welford.update(acts);
        self.docs += 1;
        self.tokens += tokens.len() as u64;
        if w.rows() >= self.shard_tokens {
            self.close_shard()?;
        }
        Ok(())
    }

    fn close_shard(&mut self) -> Result<(), CacheError> {
        if let Some((w, file, first_doc)) = self.current.take() {
            let (tokens, docs) = w.finish()?;
            self.shards.push(ShardInfo { file, tokens, first_doc, docs });
        }
        Ok(())
    }

    /// Finishes the last shard and writes `stats.safetensors` and `cache.json` (with `layer` 0,
    /// no models and no dataset files: `origin` says where the activations came from).
    pub fn finish(mut self, origin: &str) -> Result<CacheMeta, CacheError> {
        self.close_shard()?;
        let d = self.d_model;
        let stats = self.dir.join("stats.safetensors");
        let cpu = candle_core::Device::Cpu;
        let to32 = |v: &[f64]| v.iter().map(|x| *x as f32).collect::<Vec<f32>>();
        let tensor = |v: Vec<f32>| candle_core::Tensor::from_vec(v, (2, d), &cpu);
        let map: std::collections::HashMap<String, candle_core::Tensor> = [
            ("mean", tensor(to32(&self.welford.mean))),
            ("std", tensor(to32(&self.welford.std()))),
            ("count", candle_core::Tensor::from_vec(vec![self.welford.count as f64], 1, &cpu)),
            ("m2", candle_core::Tensor::from_vec(self.welford.m2.clone(), (2, d), &cpu)),
        ]
        .into_iter()
        .map(|(k, v)| v.map(|v| (k.to_string(), v)))
        .collect::<candle_core::Result<_>>()
        .map_err(|e| CacheError::corrupt(&stats, e.to_string()))?;
        candle_core::safetensors::save(&map, &stats)
            .map_err(|e| CacheError::corrupt(&stats, e.to_string()))?;
        let meta = CacheMeta {
            format: FORMAT.into(),
            d_model: d,
            layer: 0,
            dtype: self.dtype,
            compute_dtype: "f32".into(),
            tokens: self.tokens,
            docs: self.docs,
            shards: self.shards,
            models: Vec::new(),
            tokenizer: PathBuf::new(),
            context_len: 0,
            ignore_first_n: 0,
            base_token_map: Vec::new(),
            bos_id: None,
            dataset: DatasetInfo {
                files: Vec::new(),
                split: None,
                column: origin.into(),
                column_type: "synthetic".into(),
            },
            stats: "stats.safetensors".into(),
        };
        let path = self.dir.join("cache.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&meta).expect("serializable"))
            .map_err(|source| CacheError::Io { path, source })?;
        Ok(meta)
    }
}

/// Welford / Chan running mean and M2 per dimension, in f64, for `width` dimensions. Serialized
/// as exact bit patterns, so a resumed run continues with the very same state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welford {
    pub count: u64,
    #[serde(with = "f64_bits")]
    pub mean: Vec<f64>,
    #[serde(with = "f64_bits")]
    pub m2: Vec<f64>,
}

mod f64_bits {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
        v.iter().map(|x| x.to_bits()).collect::<Vec<u64>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Ok(Vec::<u64>::deserialize(d)?.into_iter().map(f64::from_bits).collect())
    }
}

impl Welford {
    pub fn new(width: usize) -> Welford {
        Welford { count: 0, mean: vec![0.0; width], m2: vec![0.0; width] }
    }

    /// Adds the rows of `data` (row-major, `width` columns) with Chan's parallel update: exact
    /// batch statistics, then merged.
    pub fn update(&mut self, data: &[f32]) {
        self.merge(&Batch::of(data, self.mean.len()));
    }

    /// Chan's merge of one batch's exact statistics into the running ones. The result depends
    /// on the order of the merges, so a cache computed in parts replays its windows' batches in
    /// dataset order to get the bits of a whole run.
    pub fn merge(&mut self, b: &Batch) {
        if b.count == 0 {
            return;
        }
        let width = self.mean.len();
        assert_eq!(b.mean.len(), width, "batch statistics of another width");
        let (na, nb) = (self.count as f64, b.count as f64);
        let total = na + nb;
        for i in 0..width {
            let delta = b.mean[i] - self.mean[i];
            self.mean[i] += delta * nb / total;
            self.m2[i] += b.m2[i] + delta * delta * na * nb / total;
        }
        self.count += b.count;
    }

    /// Unbiased standard deviation per dimension (NaN with fewer than two rows).
    pub fn std(&self) -> Vec<f64> {
        self.m2.iter().map(|m2| (m2 / (self.count as f64 - 1.0)).sqrt()).collect()
    }
}

/// The exact statistics of one batch of rows (mean and M2 per dimension, in f64), before they
/// are merged into a [`Welford`]. Kept by the parts of a split cache, one per window, to be
/// merged in dataset order when the parts are assembled.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub count: u64,
    pub mean: Vec<f64>,
    pub m2: Vec<f64>,
}

impl Batch {
    /// The statistics of the rows of `data` (row-major, `width` columns); two passes.
    pub fn of(data: &[f32], width: usize) -> Batch {
        let n = data.len() / width;
        let mut mean = vec![0.0f64; width];
        let mut m2 = vec![0.0f64; width];
        if n == 0 {
            return Batch { count: 0, mean, m2 };
        }
        for row in data.chunks_exact(width) {
            mean.iter_mut().zip(row).for_each(|(m, x)| *m += *x as f64);
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);
        for row in data.chunks_exact(width) {
            for ((s, x), m) in m2.iter_mut().zip(row).zip(&mean) {
                let d = *x as f64 - m;
                *s += d * d;
            }
        }
        Batch { count: n as u64, mean, m2 }
    }

    /// Bytes per batch of `width` dimensions in [`Batch::encode`]'s layout.
    fn encoded_len(width: usize) -> usize {
        8 * (1 + 2 * width)
    }

    /// Appends the batch, little-endian: `count` (u64), then `mean` and `m2` (f64 × width each),
    /// exact bit patterns.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(Batch::encoded_len(self.mean.len()));
        out.extend_from_slice(&self.count.to_le_bytes());
        for x in self.mean.iter().chain(&self.m2) {
            out.extend_from_slice(&x.to_bits().to_le_bytes());
        }
    }

    /// The batches of `width` dimensions that [`Batch::encode`] wrote one after the other into
    /// the file at `path`.
    pub fn read_all(path: &Path, width: usize) -> Result<Vec<Batch>, CacheError> {
        let bytes = std::fs::read(path).map_err(|source| CacheError::Io { path: path.to_owned(), source })?;
        let len = Batch::encoded_len(width);
        if bytes.len() % len != 0 {
            return Err(CacheError::corrupt(
                path,
                format!("{} bytes, not a whole number of {len}-byte batch statistics", bytes.len()),
            ));
        }
        let word = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        Ok(bytes
            .chunks_exact(len)
            .map(|b| {
                let mut values = b[8..].chunks_exact(8).map(|x| f64::from_bits(word(x)));
                let mean = values.by_ref().take(width).collect();
                Batch { count: word(&b[..8]), mean, m2: values.collect() }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, d: usize, seed: u32) -> Vec<f32> {
        (0..n * 2 * d)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 100.0 - 5.0)
            .collect()
    }

    #[test]
    fn shard_roundtrip_and_safetensors_compatibility() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.safetensors");
        let d = 6;
        for dtype in [StoreDtype::F32, StoreDtype::Bf16, StoreDtype::F16] {
            let mut w = ShardWriter::create(&path, d, dtype).unwrap();
            let a = rows(5, d, 1);
            let b = rows(3, d, 2);
            w.append(&a, &[1, 2, 3, 4, 5], &[2, 0, 3]).unwrap();
            w.append(&b, &[6, 7, 8], &[3]).unwrap();
            assert_eq!(w.finish().unwrap(), (8, 4));

            let s = Shard::open(&path, d, dtype, 8, 4).unwrap();
            assert_eq!(s.tokens(), [1, 2, 3, 4, 5, 6, 7, 8]);
            assert_eq!(s.doc_offsets(), [0, 2, 2, 5, 8]);
            let all: Vec<f32> = a.iter().chain(&b).copied().collect();
            let mut got = vec![0.0; 2 * d];
            for i in 0..8 {
                dtype.decode(s.row_bytes(i), &mut got);
                let want = &all[i as usize * 2 * d..][..2 * d];
                for (g, w) in got.iter().zip(want) {
                    let tol = if dtype == StoreDtype::F32 { 0.0 } else { 0.01 * w.abs().max(1.0) };
                    assert!((g - w).abs() <= tol, "{dtype}: {g} vs {w}");
                }
            }

            // A standard safetensors reader agrees on every tensor.
            let bytes = std::fs::read(&path).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let acts = st.tensor("activations").unwrap();
            assert_eq!(acts.shape(), [8, 2, d]);
            assert_eq!(acts.data(), s.rows_bytes(0..8));
            assert_eq!(st.tensor("tokens").unwrap().shape(), [8]);
            assert_eq!(st.tensor("doc_offsets").unwrap().dtype(), safetensors::Dtype::I64);
        }
    }

    #[test]
    fn unfinished_or_mismatched_shards_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.safetensors");
        let mut w = ShardWriter::create(&path, 4, StoreDtype::F32).unwrap();
        w.append(&rows(2, 4, 0), &[1, 2], &[2]).unwrap();
        drop(w); // killed before finish
        let e = Shard::open(&path, 4, StoreDtype::F32, 2, 1).err().unwrap().to_string();
        assert!(e.contains("s.safetensors") && e.contains("header"), "{e}");

        let mut w = ShardWriter::create(&path, 4, StoreDtype::F32).unwrap();
        w.append(&rows(2, 4, 0), &[1, 2], &[2]).unwrap();
        w.finish().unwrap();
        assert!(Shard::open(&path, 4, StoreDtype::Bf16, 2, 1).is_err(), "wrong dtype");
        assert!(Shard::open(&path, 4, StoreDtype::F32, 3, 1).is_err(), "wrong rows");
        let f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.set_len(f.metadata().unwrap().len() - 1).unwrap();
        let e = Shard::open(&path, 4, StoreDtype::F32, 2, 1).err().unwrap().to_string();
        assert!(e.contains("bytes, expected"), "{e}");
    }

    /// A full disk fails the write with the shard's path in the message; nothing panics.
    #[cfg(target_os = "linux")]
    #[test]
    fn disk_full_names_the_shard() {
        let full = Path::new("/dev/full");
        if !full.exists() {
            return;
        }
        let mut w = ShardWriter::create(full, 64, StoreDtype::F32).unwrap();
        let rows = rows(20_000, 64, 0);
        let e = w
            .append(&rows, &vec![1; 20_000], &[20_000])
            .and_then(|_| w.finish().map(|_| ()))
            .expect_err("/dev/full accepts nothing");
        let msg = e.to_string();
        assert!(msg.contains("/dev/full") && msg.contains("No space left"), "{msg}");
    }

    #[test]
    fn welford_matches_two_pass_statistics() {
        let width = 3;
        let data: Vec<f32> =
            (0..300).map(|i| ((i * 37 % 101) as f32).sin() * 10.0 + i as f32 * 0.01).collect();
        let mut w = Welford::new(width);
        for chunk in data.chunks(width * 7) {
            w.update(chunk);
        }
        let n = data.len() / width;
        assert_eq!(w.count, n as u64);
        for c in 0..width {
            let col: Vec<f64> = data.iter().skip(c).step_by(width).map(|x| *x as f64).collect();
            let mean = col.iter().sum::<f64>() / n as f64;
            let var = col.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n as f64 - 1.0);
            assert!((w.mean[c] - mean).abs() < 1e-12, "{} vs {mean}", w.mean[c]);
            assert!((w.std()[c] - var.sqrt()).abs() < 1e-10);
        }
    }

    /// Batches written to a file and merged back in order give the bits of `update`.
    #[test]
    fn replayed_batches_equal_updates() {
        let width = 4;
        let data = rows(40, width / 2, 7);
        let mut direct = Welford::new(width);
        let mut bytes = Vec::new();
        for chunk in data.chunks(width * 9) {
            direct.update(chunk);
            Batch::of(chunk, width).encode(&mut bytes);
        }
        direct.update(&[]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.bin");
        std::fs::write(&path, &bytes).unwrap();
        let mut replayed = Welford::new(width);
        for b in Batch::read_all(&path, width).unwrap() {
            replayed.merge(&b);
        }
        replayed.merge(&Batch::of(&[], width));
        assert_eq!(serde_json::to_string(&replayed).unwrap(), serde_json::to_string(&direct).unwrap());

        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let e = Batch::read_all(&path, width).unwrap_err().to_string();
        assert!(e.contains("b.bin") && e.contains("batch statistics"), "{e}");
    }
}
