//! Weir: event pipelines declared as Kubernetes resources.
//!
//! Layers (see `docs/architecture.md`): `api` (CRD structs) → `source` (manifest folder or
//! Kubernetes watch) → `topology` (validated kube-free model) → `data` (the data plane).
//! `app`, `cli`, `admin`, `server`, `status` and `otel` are wiring; `metrics`, `telemetry` and
//! `shutdown` are shared leaves.

pub mod admin;
pub mod api;
pub mod app;
pub mod audit;
pub mod bench;
pub mod cli;
pub mod control;
pub mod data;
pub mod metrics;
pub mod openapi;
pub mod otel;
pub mod poison;
pub mod server;
pub mod shutdown;
pub mod source;
pub mod telemetry;
pub mod tls_provider;
pub mod topology;
pub mod yaml;
