//! The four Weir custom resources, `weir.dev/v1alpha1`.
//!
//! These are the wire types: every duration and size is still a string and every default is
//! still absent. `topology` parses, defaults and checks them; nothing here runs.

pub mod archivepolicy;
pub mod cachepolicy;
pub mod common;
pub mod crds;
pub mod eventstream;
pub mod subscription;

pub use archivepolicy::{ArchivePolicy, ArchivePolicySpec, ArchivePolicyStatus};
pub use cachepolicy::{CachePolicy, CachePolicySpec, CachePolicyStatus, CacheStrategy};
pub use common::{ConfigMapKeyRef, DeletionPolicy, SecretKeyRef, SecretRef};
pub use eventstream::{EventStream, EventStreamSpec, EventStreamStatus};
pub use subscription::{Subscription, SubscriptionSpec, SubscriptionStatus};
