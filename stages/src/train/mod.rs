//! Crosscoder training (DOMAIN.md §2–§4): the model and its losses ([`crosscoder`]), Adam with
//! torch semantics ([`adam`]), the CPU step with hand-written gradients ([`cpu`]), the sparse
//! BatchTopK step for GPUs ([`sparse`]), the CUDA kernels (`cuda`, with the `cuda` feature; their
//! launch geometry in `launch`, and a CPU simulator for the tests in `kernel_sim`), and the
//! `train` stage ([`stage`]).

pub mod adam;
pub mod cpu;
pub mod crosscoder;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod import;
#[cfg(test)]
mod kernel_sim;
#[cfg(any(feature = "cuda", test))]
mod launch;
pub mod sparse;
pub mod stage;

pub use import::{CrosscoderImport, ImportParams};
pub use stage::{
    LossKind, StepPath, TrainEnv, TrainParams, TrainStage, load_crosscoder, load_normalizer, train,
};

/// The `crosscoder` input of the stages that analyse a crosscoder (`collect`, `scale`, `eval`).
pub const fn crosscoder_input() -> engine::InputSpec {
    engine::InputSpec::stage_of(
        "crosscoder",
        &["train", "crosscoder"],
        engine::Arity::One,
        "The crosscoder: a `train` stage or an imported `crosscoder`.",
    )
}
