//! End-to-end tests: the real CLI (`pipe-testkit`, i.e. `pipe` with the test stage kinds of
//! `tests/testkit`) on temporary datastores. Run with `cargo test --features testkit`.

mod support;

mod cache;
mod cli;
mod collect;
mod diff_report;
mod eval;
mod failures;
mod import;
mod keys;
mod paper;
mod plot;
mod resume;
mod scale;
mod serve;
mod slurm;
mod store;
mod train;
