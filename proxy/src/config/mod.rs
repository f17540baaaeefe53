//! Istio configuration: the model, its validation and its compilation into the
//! routing [`Snapshot`](crate::snapshot::Snapshot).
//!
//! ```text
//! YAML files ──load──▶ ConfigSet (typed Istio resources, each checked alone)
//!            ──compile──▶ Snapshot (registry + DestinationRules + routes linked)
//! ```
//!
//! Kinds read: `VirtualService`, `DestinationRule`, `ServiceEntry`, `WorkloadEntry`
//! and `Gateway` (networking.istio.io `v1`, `v1beta1`, `v1alpha3`),
//! `PeerAuthentication` and `AuthorizationPolicy` (security.istio.io `v1`,
//! `v1beta1`; compiled into [`crate::security::SecurityPolicies`]). Other Istio
//! kinds (Sidecar, RequestAuthentication, …) are accepted and reported as not
//! applied; unknown kinds, unknown fields and Istio fields serin does not
//! implement are errors naming the file, the resource and the field.
//! See `docs/istio-compat.md` for what is supported.

mod compile;
pub mod duration;
mod error;
pub mod hosts;
mod load;
pub mod model;
pub(crate) mod validate;
mod validate_cmd;
mod yaml;

pub use compile::compile;
pub use compile::gateway;
pub use error::{ConfigError, ConfigErrors};
pub use load::{ConfigSet, load_path, load_paths, load_sources, load_str};
pub use validate_cmd::validate_command;
