//! A latent's quantile activating examples, read from a `collect` object's `examples.db`
//! (the tables of `stages::collect::examples`), with each token's text and activation.

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;

use crate::error::ApiError;

/// One bucket of examples: sequences whose max activation of the latent falls in
/// `(lower, upper]` × the latent's max activation.
#[derive(Debug, Serialize)]
pub struct Bucket {
    pub quantile_idx: i64,
    /// Fractions of the latent's max activation; `upper` is `None` for the bucket above the
    /// last boundary.
    pub lower: f64,
    pub upper: Option<f64>,
    /// Examples in the database for this bucket (the page shows at most `per_bucket`).
    pub count: usize,
    pub examples: Vec<Example>,
}

#[derive(Debug, Serialize)]
pub struct Example {
    pub sequence_idx: i64,
    /// The sequence's max activation of the latent.
    pub activation: f64,
    /// Each token's text (as decoded alone, special tokens kept).
    pub tokens: Vec<String>,
    /// The latent's activation at each token (0 where it does not fire).
    pub activations: Vec<f32>,
}

fn blob_i32(b: &[u8]) -> impl Iterator<Item = i32> + '_ {
    b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

fn sql(path: &Path) -> impl Fn(rusqlite::Error) -> ApiError + '_ {
    move |e| ApiError::internal(format!("{}: {e}", path.display()))
}

/// Latent `latent`'s examples, highest bucket first, at most `per_bucket` per bucket (by
/// activation, descending).
pub fn examples(path: &Path, latent: i64, per_bucket: usize) -> Result<Vec<Bucket>, ApiError> {
    let err = sql(path);
    let db =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(&err)?;
    let quantiles: Vec<f64> = db
        .query_row("SELECT value FROM meta WHERE key = 'quantiles'", [], |r| r.get::<_, String>(0))
        .optional()
        .map_err(&err)?
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let mut stmt = db
        .prepare(
            "SELECT q.quantile_idx, q.activation, q.sequence_idx, s.token_ids, d.positions, d.activation_values
             FROM quantile_examples q
             JOIN sequences s ON s.sequence_idx = q.sequence_idx
             LEFT JOIN activation_details d ON d.feature_idx = q.feature_idx AND d.sequence_idx = q.sequence_idx
             WHERE q.feature_idx = ?1
             ORDER BY q.quantile_idx DESC, q.activation DESC, q.sequence_idx",
        )
        .map_err(&err)?;
    let rows = stmt
        .query_map(params![latent], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, f64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Vec<u8>>(3)?,
                r.get::<_, Option<Vec<u8>>>(4)?,
                r.get::<_, Option<Vec<u8>>>(5)?,
            ))
        })
        .map_err(&err)?;
    let has_strings: bool = db
        .query_row("SELECT count(*) FROM sqlite_master WHERE name = 'token_strings'", [], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(&err)?
        > 0;
    let mut text_of = if has_strings {
        Some(db.prepare("SELECT text FROM token_strings WHERE token_id = ?1").map_err(&err)?)
    } else {
        None
    };
    let mut strings: HashMap<i32, String> = HashMap::new();
    let mut buckets: Vec<Bucket> = Vec::new();
    for row in rows {
        let (q, activation, sequence_idx, token_ids, positions, values) = row.map_err(&err)?;
        if buckets.last().is_none_or(|b| b.quantile_idx != q) {
            let at = |i: i64| usize::try_from(i).ok().and_then(|i| quantiles.get(i).copied());
            buckets.push(Bucket {
                quantile_idx: q,
                lower: if q == 0 { 0.0 } else { at(q - 1).unwrap_or(f64::NAN) },
                upper: at(q),
                count: 0,
                examples: Vec::new(),
            });
        }
        let bucket = buckets.last_mut().expect("pushed");
        bucket.count += 1;
        if bucket.examples.len() >= per_bucket {
            continue;
        }
        let ids: Vec<i32> = blob_i32(&token_ids).collect();
        let mut tokens = Vec::with_capacity(ids.len());
        for id in &ids {
            if !strings.contains_key(id) {
                let text = match text_of.as_mut() {
                    Some(stmt) => stmt
                        .query_row(params![id], |r| r.get::<_, String>(0))
                        .optional()
                        .map_err(&err)?
                        .unwrap_or_else(|| format!("<{id}>")),
                    None => format!("<{id}>"),
                };
                strings.insert(*id, text);
            }
            tokens.push(strings[id].clone());
        }
        let mut activations = vec![0f32; ids.len()];
        if let (Some(p), Some(v)) = (positions, values) {
            for (pos, bits) in blob_i32(&p).zip(blob_i32(&v)) {
                if let Some(a) = usize::try_from(pos).ok().and_then(|p| activations.get_mut(p)) {
                    *a = f32::from_bits(bits as u32);
                }
            }
        }
        bucket.examples.push(Example { sequence_idx, activation, tokens, activations });
    }
    Ok(buckets)
}
