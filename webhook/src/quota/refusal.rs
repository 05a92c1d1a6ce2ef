//! Why a creation is refused, in words a person can act on: each refusal names the limit, what
//! was observed, when to retry and the knob that sets it.

use std::time::Duration;

use super::decide::{CapBasis, ClusterCap};
use crate::policy::{MAX_PENDING_PODS, MAX_PODS, POD_RATE, Rate};

/// Why a creation is refused; each names the limit, what was observed, and the knob.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    Rate {
        rate: Rate,
        burst: u32,
        wait: Duration,
    },
    MaxPods {
        live: u32,
        limit: u32,
        expected: Duration,
    },
    MaxPending {
        pending: u32,
        limit: u32,
        expected: Duration,
    },
    WorkflowShare {
        pending: u32,
        limit: u32,
        reserved: u32,
        workflow: String,
        expected: Duration,
    },
    ClusterPending {
        pending: u64,
        cap: ClusterCap,
        expected: Duration,
    },
}

impl Refusal {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Rate { .. } => "rate",
            Refusal::MaxPods { .. } => "max_pods",
            Refusal::MaxPending { .. } => "max_pending",
            Refusal::WorkflowShare { .. } => "workflow_share",
            Refusal::ClusterPending { .. } => "cluster_pending",
        }
    }

    /// How long until capacity is expected back, before jitter.
    pub fn expected_wait(&self) -> Duration {
        match self {
            Refusal::Rate { wait, .. } => *wait,
            Refusal::MaxPods { expected, .. }
            | Refusal::MaxPending { expected, .. }
            | Refusal::WorkflowShare { expected, .. }
            | Refusal::ClusterPending { expected, .. } => *expected,
        }
    }

    /// The message kubectl shows after `admission webhook "..." denied the request: `.
    pub fn message(&self, namespace: &str, retry_after: u32) -> String {
        match self {
            Refusal::Rate { rate, burst, .. } => format!(
                "namespace {namespace:?} is creating pods faster than its limit of {rate} \
                 (burst {burst}); retry in {retry_after}s (annotation {POD_RATE})"
            ),
            Refusal::MaxPods { live, limit, .. } => format!(
                "namespace {namespace:?} has {live} live pods, at its limit of {limit}; \
                 retry in {retry_after}s, when some finish (annotation {MAX_PODS})"
            ),
            Refusal::MaxPending { pending, limit, .. } => format!(
                "namespace {namespace:?} has {pending} pods not yet running, at its limit of \
                 {limit}; retry in {retry_after}s, when some start (annotation {MAX_PENDING_PODS})"
            ),
            Refusal::WorkflowShare {
                pending,
                limit,
                reserved,
                workflow,
                ..
            } => format!(
                "namespace {namespace:?} has {pending} pods not yet running; the last {reserved} \
                 of its limit of {limit} are kept for workflows already running, so new workflow \
                 {workflow} waits; retry in {retry_after}s (annotation {MAX_PENDING_PODS})"
            ),
            Refusal::ClusterPending { pending, cap, .. } => {
                let (basis, knob) = match cap.basis {
                    CapBasis::Absolute => (String::new(), "cluster.maxPendingPods"),
                    CapBasis::PerNode { per_node, nodes } => (
                        format!(" ({per_node} per schedulable node x {nodes} nodes)"),
                        "cluster.pendingPerHealthyNode",
                    ),
                };
                format!(
                    "the cluster has {pending} pods not yet running, at its limit of {}{basis}; \
                     retry in {retry_after}s (bulwark config {knob})",
                    cap.limit
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_rate;

    #[test]
    fn rate_message() {
        let r = Refusal::Rate {
            rate: parse_rate("5/s").unwrap().unwrap(),
            burst: 20,
            wait: Duration::from_millis(200),
        };
        assert_eq!(
            r.message("ci", 3),
            "namespace \"ci\" is creating pods faster than its limit of 5/s (burst 20); retry in 3s (annotation bulwark.io/pod-rate)"
        );
    }
}
