//! bulwark: an admission webhook that defaults pod resources and paces pod creation per
//! namespace, so bursts of batch and CI work cannot overwhelm the control plane or nodes.

pub mod admission;
pub mod admit;
pub mod backoff;
pub mod cache;
pub mod certs;
pub mod config;
pub mod defaults;
pub mod jitter;
pub mod ledger;
pub mod metrics;
pub mod nodes;
pub mod peers;
pub mod pod;
pub mod policy;
pub mod quantity;
pub mod quota;
pub mod rate;
pub mod server;
pub mod staleness;
pub mod tls;
pub mod waiting;
pub mod watch;
