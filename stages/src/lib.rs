//! The stage kinds of `pipe`. Each kind lives in its own module and is registered in [`registry`].

pub mod cache;
pub mod collect;
pub mod device;
pub mod eval;
pub mod hf;
pub mod latents;
pub mod models;
pub mod plot;
pub mod rng;
pub mod scale;
pub mod text;
pub mod train;

use engine::Registry;

/// Every stage kind this build of `pipe` knows.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(cache::CacheStage)
        .register(train::TrainStage)
        .register(train::import::CrosscoderImport)
        .register(scale::ScaleStage)
        .register(collect::stage::CollectStage)
        .register(plot::PlotStage)
        .register(eval::EvalStage);
    r
}
