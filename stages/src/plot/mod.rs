//! The `plot` stage: the paper's figures (DOMAIN.md §7) from latent tables and training logs, as
//! PNG and SVG drawn with plotters and the embedded DejaVu Sans, indexed by `figures.json`; and
//! the overlay figures `pipe diff` asks the `scale`, `collect` and `train` kinds for.

pub mod canvas;
pub mod data;
pub mod figures;
pub mod stage;
pub mod synthetic;

pub use stage::{FigureEntry, PlotParams, PlotStage, compare_latents, compare_training};

#[cfg(test)]
mod tests;
