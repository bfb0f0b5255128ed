//! `pipe`'s generic engine: pipeline files ([`config`]), the stage DAG ([`graph`]), blake3 keys
//! ([`key`], [`hash`]), the content-addressed datastore ([`store`]), planning ([`plan`]) and the
//! executor ([`exec`]). It knows stage kinds only through the [`stage`] API and contains no ML code.

pub mod config;
pub mod diff;
pub mod exec;
pub mod graph;
pub mod hash;
pub mod key;
pub mod lease;
pub mod logging;
pub mod plan;
pub mod progress;
pub mod report;
pub mod report_html;
pub mod schema;
pub mod slurm;
pub mod stage;
pub mod store;

pub use key::{Canon, Key};
pub use stage::{
    Arity, Cancel, Compared, DeviceUse, InputSource, InputSpec, ParamError, Portion, Registry, Stage,
    StageContext, StageError, Upstream,
};
