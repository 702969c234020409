//! The data plane: everything that moves events. It depends on `topology` only (never on
//! `kube` or `api`), so it runs the same under the operator and in standalone mode.

pub mod archive;
pub mod batcher;
pub mod broker;
pub mod cache;
pub mod delivery;
pub mod engine;
pub mod event;
pub mod http;
pub mod ingest;
pub mod problem;
pub mod relay;
pub mod store;
pub mod subscriptions;
pub mod trace;
