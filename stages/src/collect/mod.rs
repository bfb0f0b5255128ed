//! Per-latent statistics and activating examples on validation caches (DOMAIN.md §6): the
//! sparse activations ([`csr`]).

pub mod csr;
