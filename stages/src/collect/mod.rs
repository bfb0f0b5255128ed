//! Per-latent statistics and activating examples on validation caches (DOMAIN.md §6): the
//! sparse activations ([`csr`]), the quantile activating examples ([`examples`]) and the
//! `collect` stage ([`stage`]).

pub mod csr;
pub mod examples;
pub mod stage;

pub use csr::Csr;
pub use examples::{ExampleParams, Examples, quantile_examples};
pub use stage::{CollectParams, CollectStage, Collected, collect};
