//! Stage progress: a handle stages update, drawn as an indicatif bar on a terminal, as plain log
//! lines otherwise, and persisted in the work dir so `pipe status` can show a partial's progress.
#[derive(Clone, Default)]
pub struct Progress {}
