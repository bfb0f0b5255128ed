//! The chat-only latent sets of the intervention experiment (DOMAIN.md §8): from a `scale`
//! stage's latent table, the latents of class "Chat only" whose νʳ and νᵋ are numbers inside
//! `nu_range` (the original: −0.1 ≤ ν ≤ 2), ranked two ways, each split into its best and worst
//! `fraction`:
//!
//! - by `dec_norm_diff` ascending (0 = the chat decoder alone: most chat-only first);
//! - by rank(νʳ) + rank(νᵋ) ascending (pandas' average ranks over the candidates; small ν = the
//!   base model explains the latent least: most chat-specific first).
//!
//! Ties keep latent order. Each set has round(fraction · candidates) latents.

use std::collections::BTreeMap;

use crate::latents::{Class, Column, LatentTable};

/// One of the four sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LatentSet {
    DecNormDiffBest,
    DecNormDiffWorst,
    RankSumBest,
    RankSumWorst,
}

impl LatentSet {
    pub const ALL: [LatentSet; 4] = [
        LatentSet::DecNormDiffBest,
        LatentSet::DecNormDiffWorst,
        LatentSet::RankSumBest,
        LatentSet::RankSumWorst,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LatentSet::DecNormDiffBest => "dec_norm_diff-best",
            LatentSet::DecNormDiffWorst => "dec_norm_diff-worst",
            LatentSet::RankSumBest => "rank_sum-best",
            LatentSet::RankSumWorst => "rank_sum-worst",
        }
    }
}

/// The candidates and the four sets (latent ids, in rank order).
#[derive(Clone, Debug, PartialEq)]
pub struct ChatOnlySets {
    /// Chat-only latents with both ν in range, by latent id.
    pub candidates: Vec<u32>,
    pub sets: BTreeMap<LatentSet, Vec<u32>>,
}

/// The columns the selection reads.
pub const COLUMNS: [&str; 5] = ["latent", "class", "dec_norm_diff", "nu_reconstruction", "nu_error"];

/// Selects the sets from `table`. An error names the missing or mistyped column.
pub fn chat_only_sets(
    table: &LatentTable,
    fraction: f64,
    nu_range: [f64; 2],
) -> Result<ChatOnlySets, String> {
    for name in COLUMNS {
        if table.get(name).is_none() {
            return Err(format!(
                "the latent table has no column `{name}` (it needs {}): give `latents` a `scale` \
                 stage, which computes the ν columns",
                COLUMNS.map(|c| format!("`{c}`")).join(", ")
            ));
        }
    }
    let num = |name: &str| {
        table.f64s(name).ok_or_else(|| format!("column `{name}` of the latent table is not numeric"))
    };
    let latent = num("latent")?;
    let (dnd, nu_r, nu_e) = (num("dec_norm_diff")?, num("nu_reconstruction")?, num("nu_error")?);
    let Some(Column::Str(class)) = table.get("class") else {
        return Err("column `class` of the latent table is not a string column".into());
    };
    let [lo, hi] = nu_range;
    let in_range = |v: f64| v.is_finite() && lo <= v && v <= hi;
    let rows: Vec<usize> = (0..table.rows())
        .filter(|&i| class[i] == Class::ChatOnly.name() && in_range(nu_r[i]) && in_range(nu_e[i]))
        .collect();
    let id = |i: usize| latent[i] as u32;
    let n = rows.len();
    let k = ((n as f64) * fraction).round() as usize;
    let split = |order: Vec<usize>| -> (Vec<u32>, Vec<u32>) {
        (order[..k].iter().map(|&i| id(i)).collect(), order[n - k..].iter().map(|&i| id(i)).collect())
    };
    let mut by_dnd = rows.clone();
    by_dnd.sort_by(|&a, &b| dnd[a].total_cmp(&dnd[b]));
    let ranks_r = average_ranks(&rows.iter().map(|&i| nu_r[i]).collect::<Vec<_>>());
    let ranks_e = average_ranks(&rows.iter().map(|&i| nu_e[i]).collect::<Vec<_>>());
    let mut by_rank: Vec<usize> = (0..n).collect();
    by_rank.sort_by(|&a, &b| (ranks_r[a] + ranks_e[a]).total_cmp(&(ranks_r[b] + ranks_e[b])));
    let by_rank: Vec<usize> = by_rank.into_iter().map(|j| rows[j]).collect();
    let (dnd_best, dnd_worst) = split(by_dnd);
    let (rank_best, rank_worst) = split(by_rank);
    let sets = BTreeMap::from([
        (LatentSet::DecNormDiffBest, dnd_best),
        (LatentSet::DecNormDiffWorst, dnd_worst),
        (LatentSet::RankSumBest, rank_best),
        (LatentSet::RankSumWorst, rank_worst),
    ]);
    Ok(ChatOnlySets { candidates: rows.into_iter().map(id).collect(), sets })
}

/// 1-based ranks, ties given their average (pandas' `rank()` default).
pub fn average_ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut ranks = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &o in &order[i..=j] {
            ranks[o] = r;
        }
        i = j + 1;
    }
    ranks
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAN: f64 = f64::NAN;

    /// (class, dec_norm_diff, νʳ, νᵋ) per latent.
    fn table(rows: &[(&str, f64, f64, f64)]) -> LatentTable {
        let mut t = LatentTable::default();
        t.push("latent", Column::I64((0..rows.len() as i64).collect())).unwrap();
        t.push("class", Column::Str(rows.iter().map(|r| r.0.to_string()).collect())).unwrap();
        t.push("dec_norm_diff", Column::F64(rows.iter().map(|r| r.1).collect())).unwrap();
        t.push("nu_reconstruction", Column::F64(rows.iter().map(|r| r.2).collect())).unwrap();
        t.push("nu_error", Column::F64(rows.iter().map(|r| r.3).collect())).unwrap();
        t
    }

    fn check(rows: &[(&str, f64, f64, f64)], fraction: f64, candidates: &[u32], sets: [&[u32]; 4]) {
        let got = chat_only_sets(&table(rows), fraction, [-0.1, 2.0]).unwrap();
        assert_eq!(got.candidates, candidates);
        for (set, want) in LatentSet::ALL.iter().zip(sets) {
            assert_eq!(got.sets[set], want, "{}", set.name());
        }
    }

    const C: &str = "Chat only";

    #[test]
    fn filters_ranks_and_splits() {
        let rows = [
            (C, 0.05, 0.1, 0.3),       // 0
            ("Shared", 0.5, 0.0, 0.0), // 1: not chat-only
            (C, 0.01, 1.5, 1.9),       // 2
            (C, 0.02, NAN, 0.1),       // 3: νʳ NaN
            (C, 0.03, 0.0, -0.2),      // 4: νᵋ below −0.1
            (C, 0.08, -0.1, 2.0),      // 5: both bounds inclusive
            (C, 0.04, 0.4, 0.2),       // 6
            (C, 0.09, 2.5, 0.0),       // 7: νʳ above 2
        ];
        // Candidates 0, 2, 5, 6. dec_norm_diff ascending: 2, 6, 0, 5.
        // rank(νʳ): 5→1, 0→2, 6→3, 2→4; rank(νᵋ): 6→1, 0→2, 2→3, 5→4; sums: 0→4, 6→4, 5→5, 2→7.
        check(&rows, 0.5, &[0, 2, 5, 6], [&[2, 6], &[0, 5], &[0, 6], &[5, 2]]);
        // A quarter of 4 is 1; all of them is every candidate, in rank order both ways.
        check(&rows, 0.25, &[0, 2, 5, 6], [&[2], &[5], &[0], &[2]]);
        check(&rows, 1.0, &[0, 2, 5, 6], [&[2, 6, 0, 5], &[2, 6, 0, 5], &[0, 6, 5, 2], &[0, 6, 5, 2]]);
    }

    #[test]
    fn no_candidates_gives_empty_sets() {
        check(&[("Shared", 0.5, 0.0, 0.0), (C, 0.0, NAN, NAN)], 0.5, &[], [&[], &[], &[], &[]]);
    }

    #[test]
    fn average_ranks_like_pandas() {
        assert_eq!(average_ranks(&[3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0]);
        assert_eq!(average_ranks(&[]), Vec::<f64>::new());
    }

    #[test]
    fn a_table_without_nu_is_refused_with_the_column_named() {
        let mut t = table(&[(C, 0.0, 0.0, 0.0)]);
        t.columns.retain(|(n, _)| n != "nu_error");
        let err = chat_only_sets(&t, 0.5, [-0.1, 2.0]).unwrap_err();
        assert!(err.contains("no column `nu_error`") && err.contains("`scale` stage"), "{err}");
    }
}
