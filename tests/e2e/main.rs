//! End-to-end tests: the real CLI (`pipe-testkit`, i.e. `pipe` with the test stage kinds of
//! `tests/testkit`) on temporary datastores. Run with `cargo test --features testkit`.

mod support;

mod cache;
mod cli;
mod failures;
mod keys;
mod resume;
mod store;
mod train;
