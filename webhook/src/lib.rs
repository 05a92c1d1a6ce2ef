//! bulwark: an admission webhook that defaults pod resources and paces pod creation per
//! namespace, so bursts of batch and CI work cannot overwhelm the control plane or nodes, and
//! a node controller that takes unhealthy nodes out of service.
//!
//! The webhook's flow, top to bottom (a module imports only those below it):
//!
//! ```text
//! webhook   the library entry: wires and starts everything `bulwark webhook` runs
//! serve     HTTPS routes, connections, TLS, self-managed certificates
//! release   hold mode's releaser: lets held pods past the gate in the line's order
//! review    AdmissionReview wire format, the defaults and gate patches, the webhooks' answers
//! quota     rate and count decisions, the ledger, and the ClusterView port they read
//! cluster   watch caches behind that port (the arrow points up: it implements the port)
//! policy    namespace policy from annotations, quantities, pod facts
//! ```
//!
//! Beside the flow: `nodes` (the node controller), `config` (the `--config` file, each section
//! parsed by its owner), `status` (what `bulwark status` reads and shows an operator), and the
//! leaves `metrics`, `backoff` and `value`. See docs/architecture.md.

pub mod backoff;
pub mod cluster;
pub mod config;
pub mod metrics;
pub mod nodes;
pub mod policy;
pub mod quota;
pub mod release;
pub mod review;
pub mod serve;
pub mod status;
#[cfg(test)]
pub mod testing;
pub mod value;
pub mod webhook;
