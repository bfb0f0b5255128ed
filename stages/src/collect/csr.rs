//! The sparse latent activations of a set of sequences (DOMAIN.md §6a), in the original's CSR
//! layout plus an index by latent, stored as one safetensors file (`activations.safetensors`):
//!
//! | tensor          | dtype | shape     |                                                           |
//! |-----------------|-------|-----------|-----------------------------------------------------------|
//! | `values`        | F32   | (N,)      | scaled activations f·c > 0                                |
//! | `ids`           | U32   | (N, 3)    | (sequence, position in sequence, latent), sorted that way |
//! | `seq_offsets`   | I64   | (S + 1,)  | entries of sequence s: `seq_offsets[s]..seq_offsets[s+1]` |
//! | `tokens`        | U32   | (T,)      | every sequence's tokens, concatenated                     |
//! | `token_offsets` | I64   | (S + 1,)  | tokens of sequence s                                      |
//! | `by_latent`     | U32/I64 | (N,)    | entry indices sorted by (latent, sequence, position)      |
//! | `latent_offsets`| I64   | (F + 1,)  | `by_latent[latent_offsets[j]..latent_offsets[j+1]]` are latent j's entries |
//! | `dataset_seqs`  | I64   | (D + 1,)  | sequences of input cache k: `dataset_seqs[k]..dataset_seqs[k+1]` |

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::cache::CacheError;

/// Sparse activations of sequences; see the module docs. Entries are appended sequence by
/// sequence with [`Csr::push_sequence`]; [`Csr::index_by_latent`] builds the latent index.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Csr {
    pub num_latents: usize,
    pub values: Vec<f32>,
    /// (sequence, position, latent).
    pub ids: Vec<[u32; 3]>,
    pub seq_offsets: Vec<u64>,
    pub tokens: Vec<u32>,
    pub token_offsets: Vec<u64>,
    pub by_latent: Vec<u64>,
    pub latent_offsets: Vec<u64>,
    pub dataset_seqs: Vec<u64>,
}

impl Csr {
    pub fn new(num_latents: usize) -> Csr {
        Csr {
            num_latents,
            seq_offsets: vec![0],
            token_offsets: vec![0],
            dataset_seqs: vec![0],
            ..Csr::default()
        }
    }

    pub fn num_sequences(&self) -> usize {
        self.seq_offsets.len() - 1
    }

    /// Appends a sequence: its tokens and its nonzero entries as (position, latent, value),
    /// sorted by (position, latent).
    pub fn push_sequence(&mut self, tokens: &[u32], entries: &[(u32, u32, f32)]) {
        let s = self.num_sequences() as u32;
        for &(pos, latent, value) in entries {
            self.ids.push([s, pos, latent]);
            self.values.push(value);
        }
        self.seq_offsets.push(self.values.len() as u64);
        self.tokens.extend_from_slice(tokens);
        self.token_offsets.push(self.tokens.len() as u64);
    }

    /// Marks the end of one input dataset's sequences.
    pub fn end_dataset(&mut self) {
        self.dataset_seqs.push(self.num_sequences() as u64);
    }

    pub fn sequence_tokens(&self, s: usize) -> &[u32] {
        &self.tokens[self.token_offsets[s] as usize..self.token_offsets[s + 1] as usize]
    }

    /// Entry indices of sequence `s`.
    pub fn sequence_entries(&self, s: usize) -> std::ops::Range<usize> {
        self.seq_offsets[s] as usize..self.seq_offsets[s + 1] as usize
    }

    /// Builds `by_latent` / `latent_offsets` (a stable counting sort by latent).
    pub fn index_by_latent(&mut self) {
        let mut counts = vec![0u64; self.num_latents + 1];
        for id in &self.ids {
            counts[id[2] as usize + 1] += 1;
        }
        for j in 0..self.num_latents {
            counts[j + 1] += counts[j];
        }
        self.latent_offsets = counts.clone();
        let mut next = counts;
        self.by_latent = vec![0; self.ids.len()];
        for (i, id) in self.ids.iter().enumerate() {
            let slot = &mut next[id[2] as usize];
            self.by_latent[*slot as usize] = i as u64;
            *slot += 1;
        }
    }

    /// Entry indices of latent `j` (after [`Csr::index_by_latent`]).
    pub fn latent_entries(&self, j: usize) -> &[u64] {
        &self.by_latent[self.latent_offsets[j] as usize..self.latent_offsets[j + 1] as usize]
    }

    pub fn write(&self, path: &Path) -> Result<(), CacheError> {
        let err = |e: candle_core::Error| CacheError::corrupt(path, e.to_string());
        let cpu = Device::Cpu;
        let i64s = |v: &[u64]| v.iter().map(|x| *x as i64).collect::<Vec<i64>>();
        let n = self.values.len();
        let flat_ids: Vec<u32> = self.ids.iter().flatten().copied().collect();
        let tensors: HashMap<String, Tensor> = [
            ("values", Tensor::from_slice(&self.values, n, &cpu)),
            ("ids", Tensor::from_vec(flat_ids, (n, 3), &cpu)),
            ("seq_offsets", Tensor::from_vec(i64s(&self.seq_offsets), self.seq_offsets.len(), &cpu)),
            ("tokens", Tensor::from_slice(&self.tokens, self.tokens.len(), &cpu)),
            ("token_offsets", Tensor::from_vec(i64s(&self.token_offsets), self.token_offsets.len(), &cpu)),
            ("by_latent", Tensor::from_vec(i64s(&self.by_latent), n, &cpu)),
            ("latent_offsets", Tensor::from_vec(i64s(&self.latent_offsets), self.latent_offsets.len(), &cpu)),
            ("dataset_seqs", Tensor::from_vec(i64s(&self.dataset_seqs), self.dataset_seqs.len(), &cpu)),
        ]
        .into_iter()
        .map(|(k, t)| t.map(|t| (k.to_string(), t)))
        .collect::<candle_core::Result<_>>()
        .map_err(err)?;
        candle_core::safetensors::save(&tensors, path).map_err(err)
    }

    pub fn read(path: &Path) -> Result<Csr, CacheError> {
        let err = |m: String| CacheError::corrupt(path, m);
        let t = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| err(e.to_string()))?;
        let get = |name: &str| t.get(name).ok_or_else(|| err(format!("no tensor `{name}`")));
        let u64s = |name: &str| -> Result<Vec<u64>, CacheError> {
            let v: Vec<i64> = get(name)?.to_vec1().map_err(|e| err(e.to_string()))?;
            Ok(v.into_iter().map(|x| x as u64).collect())
        };
        let flat: Vec<u32> =
            get("ids")?.flatten_all().and_then(|t| t.to_vec1()).map_err(|e| err(e.to_string()))?;
        let latent_offsets = u64s("latent_offsets")?;
        Ok(Csr {
            num_latents: latent_offsets.len().saturating_sub(1),
            values: get("values")?.to_vec1().map_err(|e| err(e.to_string()))?,
            ids: flat.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect(),
            seq_offsets: u64s("seq_offsets")?,
            tokens: get("tokens")?.to_vec1().map_err(|e| err(e.to_string()))?,
            token_offsets: u64s("token_offsets")?,
            by_latent: u64s("by_latent")?,
            latent_offsets,
            dataset_seqs: u64s("dataset_seqs")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latent_index_and_round_trip() {
        let mut c = Csr::new(3);
        c.push_sequence(&[5, 6, 7], &[(0, 2, 1.0), (1, 0, 0.5), (1, 2, 2.0)]);
        c.push_sequence(&[8], &[]);
        c.end_dataset();
        c.push_sequence(&[9, 9], &[(1, 2, 3.0)]);
        c.end_dataset();
        c.index_by_latent();
        assert_eq!(c.latent_entries(2), [0, 2, 3]);
        assert_eq!(c.latent_entries(0), [1]);
        assert!(c.latent_entries(1).is_empty());
        assert_eq!(c.sequence_tokens(2), [9, 9]);
        assert_eq!(c.ids[3], [2, 1, 2]);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        c.write(&p).unwrap();
        assert_eq!(Csr::read(&p).unwrap(), c);
    }
}
