//! Per-latent statistics and activating examples on validation caches (DOMAIN.md §6): the
//! sparse activations ([`csr`]) and the `collect` stage ([`stage`]).

pub mod csr;
pub mod stage;

pub use csr::Csr;
pub use stage::{CollectParams, CollectStage, Collected, collect};
