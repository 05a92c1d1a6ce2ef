//! The port through which decisions read the cluster: answered from memory by whatever feeds
//! it (the watch caches in `cluster`, or a test's fixture). Owned here, by its consumer, so
//! quota decisions depend on what they need and not on how it is kept.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use super::staleness::Stale;
use crate::policy::{Policy, Problem};

/// What admission needs to know about the cluster, answered from memory.
pub trait ClusterView: Send + Sync {
    /// The parsed policy of a namespace the cache knows.
    fn namespace(&self, name: &str) -> Option<Arc<NamespaceInfo>>;
    /// Whether every namespace of the cluster has been listed, so one that
    /// [`ClusterView::namespace`] does not know is new or made up. False offline.
    fn namespaces_listed(&self) -> bool {
        false
    }
    /// Live and pending pods of a namespace, and whether `workflow` already has pods there.
    fn pod_counts(&self, namespace: &str, workflow: Option<&str>, now: Instant) -> PodCounts;
    /// Pods not yet running in the whole cluster (DaemonSet and mirror pods, and pods behind
    /// bulwark's gate, left out).
    fn cluster_pending(&self) -> u64;
    /// Pods behind bulwark's gate in the whole cluster (hold mode).
    fn cluster_held(&self) -> u64 {
        0
    }
    /// How fast pods leave the pending state cluster-wide, per second.
    fn cluster_drain_rate(&self, now: Instant) -> f64;
    /// Healthy, schedulable nodes; `None` while nodes are not watched (offline mode).
    fn schedulable_nodes(&self) -> Option<u32>;
    /// The watch that has been failing longest, if for longer than `limit`.
    fn stale(&self, _limit: Duration, _now: Instant) -> Option<Stale> {
        None
    }
}

/// Counters of one namespace as the watch shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PodCounts {
    pub live: u32,
    /// Not yet running and not behind bulwark's gate.
    pub pending: u32,
    /// Behind bulwark's gate (hold mode).
    pub held: u32,
    pub workflow_started: bool,
    /// Recent rate (per second) at which pods stopped being pending, and stopped being live.
    pub pending_drain_rate: f64,
    pub live_drain_rate: f64,
}

/// A namespace's effective policy and what was wrong with its annotations.
#[derive(Debug, Clone, PartialEq)]
pub struct NamespaceInfo {
    pub policy: Policy,
    pub problems: Vec<Problem>,
}
