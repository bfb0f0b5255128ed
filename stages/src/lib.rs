//! The stage kinds of `pipe`. Each kind lives in its own module and is registered in [`registry`].
//! The ML stages (cache, train, scale, collect, plot) arrive with their issues.

pub mod models;
pub mod text;

use engine::Registry;

/// Every stage kind this build of `pipe` knows.
pub fn registry() -> Registry {
    Registry::new()
}
