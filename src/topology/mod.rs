//! The validated, kube-free model of what should run.
//!
//! Both sources (the Kubernetes watcher and the manifest folder) fill an [`Index`] of raw
//! resources; [`build::build`] turns the index into a [`Topology`] of plans plus a report of
//! every problem found, by resource and field path. `data/` runs plans and never sees `api/`.

pub mod build;
pub mod defaults;
pub mod filter;
pub mod index;
pub mod mounts;
pub mod pii;
pub mod plan;
pub mod report;
pub mod units;

pub use build::{BuildCounts, Builder, Built, build};
pub use defaults::Defaults;
pub use filter::Filter;
pub use index::{Index, Kind};
pub use pii::PiiPlan;
pub use plan::*;
pub use report::{Problem, Reason, Report};
