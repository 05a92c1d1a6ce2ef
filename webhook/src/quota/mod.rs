//! Pod-creation quotas: per-namespace rate (GCRA) and counts (live pods, pods not yet
//! running, the cluster-wide pending cap), decided from a snapshot of the cluster read through
//! the [`view::ClusterView`] port this module owns.
//!
//! - [`decide`]: the pure decision and its order; [`refusal`]: what a refused client is told;
//! - [`ledger`]: what this replica admitted and has not yet seen in the watch, check and
//!   commit under one lock;
//! - [`rate`] (GCRA), [`waiting`] (refused clients not yet due back), [`retry`]
//!   (`retryAfterSeconds` with jitter), [`staleness`] (when counts stop being trusted);
//! - [`throttled`]: which namespaces are due a Throttled Event summing up their refusals;
//! - [`line`]: hold mode's line, which pods behind bulwark's scheduling gate go next.
//! - [`peers`]: what replicas tell each other of their consumption, and the part of a
//!   namespace's rate each may use.

pub mod decide;
pub mod ledger;
pub mod line;
pub mod peers;
pub mod rate;
pub mod refusal;
pub mod retry;
pub mod staleness;
pub mod throttled;
pub mod view;
pub mod waiting;

use std::time::Duration;

use serde::Deserialize;

use crate::{
    policy::parse_count,
    value::{self, Invalid, Scalar},
};

/// Cluster-wide cap on pods not yet running, across all namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterLimits {
    pub max_pending_pods: Option<u32>,
    /// Scales the cap with the healthy, schedulable nodes the cache sees.
    pub pending_per_healthy_node: Option<u32>,
}

/// The quota knobs of `--config`.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub cluster: ClusterLimits,
    /// Percentage of `max-pending-pods` only pods of already started workflows may use.
    pub workflow_reserved_percent: u8,
    /// How long an admission is counted before the watch shows its pod.
    pub reservation_ttl: Duration,
    /// Upper bound of `retryAfterSeconds`, before jitter.
    pub max_retry_after: Duration,
    /// How long a watch may fail before pod-count quotas stop being enforced (fail open).
    pub cache_stale_limit: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            cluster: ClusterLimits {
                max_pending_pods: Some(5000),
                pending_per_healthy_node: Some(30),
            },
            workflow_reserved_percent: 20,
            reservation_ttl: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(30),
            cache_stale_limit: Duration::from_secs(120),
        }
    }
}

/// The config file's `cluster:` section as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawCluster {
    max_pending_pods: Option<Scalar>,
    pending_per_healthy_node: Option<Scalar>,
}

/// The quota keys of the config file as written (the top-level ones and `cluster:`).
#[derive(Debug, Default)]
pub struct RawSettings<'a> {
    pub cluster: Option<&'a RawCluster>,
    pub workflow_reserved_share: Option<&'a Scalar>,
    pub reservation_ttl_seconds: Option<&'a Scalar>,
    pub max_retry_after_seconds: Option<&'a Scalar>,
    pub cache_stale_limit_seconds: Option<&'a Scalar>,
}

impl Settings {
    /// The defaults with what the file sets laid over them.
    pub fn parse(raw: &RawSettings<'_>) -> Result<Settings, Invalid> {
        let mut s = Settings::default();
        let count = |key: &str, value: &Option<Scalar>, current: Option<u32>| match value {
            None => Ok(current),
            Some(v) => parse_count(&v.text()).map_err(|e| Invalid::new(key, v, e.to_string())),
        };
        if let Some(c) = raw.cluster {
            s.cluster.max_pending_pods = count(
                "cluster.maxPendingPods",
                &c.max_pending_pods,
                s.cluster.max_pending_pods,
            )?;
            s.cluster.pending_per_healthy_node = count(
                "cluster.pendingPerHealthyNode",
                &c.pending_per_healthy_node,
                s.cluster.pending_per_healthy_node,
            )?;
        }
        if let Some(v) = raw.workflow_reserved_share {
            s.workflow_reserved_percent = value::percent("workflowReservedShare", v)?;
        }
        if let Some(v) = raw.reservation_ttl_seconds {
            s.reservation_ttl = value::seconds("reservationTtlSeconds", v, 1)?;
        }
        if let Some(v) = raw.max_retry_after_seconds {
            s.max_retry_after = value::seconds("maxRetryAfterSeconds", v, 1)?;
        }
        if let Some(v) = raw.cache_stale_limit_seconds {
            s.cache_stale_limit = value::seconds("cacheStaleLimitSeconds", v, 5)?;
        }
        Ok(s)
    }

    /// The knobs every decision needs, with count quotas on.
    pub fn limits(&self) -> decide::Limits {
        decide::Limits {
            cluster: self.cluster,
            workflow_reserved_percent: self.workflow_reserved_percent,
            count_quotas: true,
        }
    }
}
