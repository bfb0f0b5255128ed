//! The `eval` stage (DOMAIN.md §8, the paper's intervention check): how much of the chat model's
//! behaviour a set of crosscoder latents carries. Both models run to the crosscoder's layer L on
//! chat conversations; the chat model's layer-L residual is replaced by a patched one (the base
//! residual with some latents' base decoders swapped for their chat decoders, …) and the CHAT
//! model continues from it. Per predicted assistant token: KL(p_chat ‖ p_patched), the NLL of the
//! true next token under p_patched, and KL(p_base ‖ p_patched).
//!
//! - [`tokens`]: which positions are assistant tokens (prefix renders of the chat template mapped
//!   through the tokenizer's byte offsets), and the `k_first` / `post_k_first` split.
//! - [`sets`]: the chat-only latent sets (best / worst fraction by `dec_norm_diff` and by the ν
//!   rank sum) from a `scale` stage's latent table.
//! - [`kl`]: the patches, KL and NLL per token row, and the per (intervention, subset) sums.
//! - [`figure`]: `kl.png` / `kl.svg`, mean KL per intervention and subset with error bars.
//! - [`stage`]: the stage kind.

pub mod figure;
pub mod kl;
pub mod sets;
pub mod stage;
pub mod tokens;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use stage::{EvalParams, EvalStage};

/// A replacement of the chat model's layer-L residual (DOMAIN.md §8; the names are the
/// original's, `setup_to_eval.py`, with `best`/`worst` for its `pareto`/`antipareto` and the
/// fraction a parameter). f = the crosscoder's codes of (x_base, x_chat), d^l = its decoders.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Intervention {
    /// x_chat unchanged: the chat model itself (KL 0 by construction; a check of the harness).
    #[serde(rename = "vanilla_chat")]
    VanillaChat,
    /// The base model end to end, no chat layers: how far apart the two models are.
    #[serde(rename = "vanilla_base")]
    VanillaBase,
    /// x_base fed into the chat model's layers after L.
    #[serde(rename = "vanilla_base2chat")]
    VanillaBase2Chat,
    /// x_base + Σ_all f_j (d_j^chat − d_j^base): the base error kept, every latent's
    /// reconstruction swapped to the chat one (decoder biases not swapped).
    #[serde(rename = "patch_base-error_cchat")]
    BaseErrorChatLatents,
    /// x_chat + Σ_all f_j (d_j^base − d_j^chat): the chat error kept, the base reconstruction.
    #[serde(rename = "patch_chat-error_cchat")]
    ChatErrorBaseLatents,
    /// x_base + Σ_{j∈S} f_j (d_j^chat − d_j^base), S = the most chat-only `fraction` of the
    /// filtered chat-only latents by `dec_norm_diff` (the original's
    /// `patch_all_dec_norm_diff-pareto-50pct-cchat`). Needs `latents`.
    #[serde(rename = "patch_dec_norm_diff-best_cchat")]
    DecNormDiffBest,
    /// As `patch_dec_norm_diff-best_cchat`, the least chat-only `fraction` (`…-antipareto-…`).
    #[serde(rename = "patch_dec_norm_diff-worst_cchat")]
    DecNormDiffWorst,
    /// As `patch_dec_norm_diff-best_cchat`, ranked by rank(νʳ) + rank(νᵋ) ascending, the most
    /// chat-specific (`patch_all_rank_sum-pareto-50pct-cchat`). Needs `latents`.
    #[serde(rename = "patch_rank_sum-best_cchat")]
    RankSumBest,
    /// As `patch_rank_sum-best_cchat`, the least chat-specific `fraction`.
    #[serde(rename = "patch_rank_sum-worst_cchat")]
    RankSumWorst,
}

impl Intervention {
    pub const ALL: [Intervention; 9] = [
        Intervention::VanillaChat,
        Intervention::VanillaBase,
        Intervention::VanillaBase2Chat,
        Intervention::BaseErrorChatLatents,
        Intervention::ChatErrorBaseLatents,
        Intervention::DecNormDiffBest,
        Intervention::DecNormDiffWorst,
        Intervention::RankSumBest,
        Intervention::RankSumWorst,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Intervention::VanillaChat => "vanilla_chat",
            Intervention::VanillaBase => "vanilla_base",
            Intervention::VanillaBase2Chat => "vanilla_base2chat",
            Intervention::BaseErrorChatLatents => "patch_base-error_cchat",
            Intervention::ChatErrorBaseLatents => "patch_chat-error_cchat",
            Intervention::DecNormDiffBest => "patch_dec_norm_diff-best_cchat",
            Intervention::DecNormDiffWorst => "patch_dec_norm_diff-worst_cchat",
            Intervention::RankSumBest => "patch_rank_sum-best_cchat",
            Intervention::RankSumWorst => "patch_rank_sum-worst_cchat",
        }
    }

    /// The chat-only latent set it patches, if it patches a set (these need `latents`).
    pub fn set(self) -> Option<sets::LatentSet> {
        use sets::LatentSet;
        match self {
            Intervention::DecNormDiffBest => Some(LatentSet::DecNormDiffBest),
            Intervention::DecNormDiffWorst => Some(LatentSet::DecNormDiffWorst),
            Intervention::RankSumBest => Some(LatentSet::RankSumBest),
            Intervention::RankSumWorst => Some(LatentSet::RankSumWorst),
            _ => None,
        }
    }

    /// Whether it needs the crosscoder's codes.
    pub fn uses_latents(self) -> bool {
        self.set().is_some()
            || matches!(self, Intervention::BaseErrorChatLatents | Intervention::ChatErrorBaseLatents)
    }
}

/// Which predicted assistant tokens a mean is over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Subset {
    /// Every predicted assistant token.
    All,
    /// The first `k_first` of each assistant turn, special (control) tokens skipped.
    KFirst,
    /// The other assistant tokens.
    PostKFirst,
}

impl Subset {
    pub const ALL: [Subset; 3] = [Subset::All, Subset::KFirst, Subset::PostKFirst];

    pub fn name(self) -> &'static str {
        match self {
            Subset::All => "all",
            Subset::KFirst => "k_first",
            Subset::PostKFirst => "post_k_first",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_serde_names() {
        for i in Intervention::ALL {
            assert_eq!(serde_json::to_value(i).unwrap(), i.name());
            let back: Intervention = serde_json::from_value(i.name().into()).unwrap();
            assert_eq!(back, i);
        }
        assert_eq!(Intervention::ALL.iter().filter(|i| i.set().is_some()).count(), 4);
        assert!(!Intervention::VanillaBase2Chat.uses_latents());
        assert!(Intervention::ChatErrorBaseLatents.uses_latents());
    }
}
