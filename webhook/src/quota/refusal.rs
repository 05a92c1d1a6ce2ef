//! Why a creation is refused, in words a person can act on: each refusal names the limit, what
//! was observed, when to retry and the knob that sets it.

use std::time::Duration;

use super::decide::{CapBasis, ClusterCap};
use crate::policy::{MAX_PENDING_PODS, MAX_PODS, POD_BURST, POD_RATE, Rate};

/// Every [`Refusal::reason`], in the order of the checks (`decide`) but for the rate, which
/// is checked last.
pub const REASONS: [&str; 5] = [
    "rate",
    "max_pods",
    "max_pending",
    "workflow_share",
    "cluster_pending",
];

/// "pod" or "pods", as `n` asks.
fn pods(n: u64) -> &'static str {
    if n == 1 { "pod" } else { "pods" }
}

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
                "namespace {namespace:?} has {live} live {}, at its limit of {limit}; \
                 retry in {retry_after}s, when some finish (annotation {MAX_PODS})",
                pods((*live).into())
            ),
            Refusal::MaxPending { pending, limit, .. } => format!(
                "namespace {namespace:?} has {pending} {} not yet running, at its limit of \
                 {limit}; retry in {retry_after}s, when some start (annotation {MAX_PENDING_PODS})",
                pods((*pending).into())
            ),
            Refusal::WorkflowShare {
                pending,
                limit,
                reserved,
                workflow,
                ..
            } => format!(
                "namespace {namespace:?} has {pending} {} not yet running; the last {reserved} \
                 of its limit of {limit} are kept for workflows already running, so new workflow \
                 {workflow} waits; retry in {retry_after}s (annotation {MAX_PENDING_PODS})",
                pods((*pending).into())
            ),
            Refusal::ClusterPending { pending, cap, .. } => {
                let (basis, knob) = cluster_basis(cap);
                let basis = basis.map(|b| format!(" ({b})")).unwrap_or_default();
                format!(
                    "the cluster has {pending} {} not yet running, at its limit of {}{basis}; \
                     retry in {retry_after}s (bulwark config {knob})",
                    pods(*pending),
                    cap.limit
                )
            }
        }
    }

    /// The limit this refusal hit and the knob that sets it, without what was observed, e.g.
    /// `max-pending-pods 20 (annotation bulwark.io/max-pending-pods)`: the words of a report
    /// that sums up many refusals.
    pub fn limit(&self) -> String {
        match self {
            Refusal::Rate { rate, burst, .. } => {
                format!("pod-rate {rate}, burst {burst} (annotations {POD_RATE}, {POD_BURST})")
            }
            Refusal::MaxPods { limit, .. } => format!("max-pods {limit} (annotation {MAX_PODS})"),
            Refusal::MaxPending { limit, .. } => {
                format!("max-pending-pods {limit} (annotation {MAX_PENDING_PODS})")
            }
            Refusal::WorkflowShare {
                limit, reserved, ..
            } => format!(
                "max-pending-pods {limit}, the last {reserved} kept for workflows already running \
                 (annotation {MAX_PENDING_PODS})"
            ),
            Refusal::ClusterPending { cap, .. } => {
                let (basis, knob) = cluster_basis(cap);
                let basis = basis.map(|b| format!("{b}; ")).unwrap_or_default();
                format!(
                    "the cluster's pending cap {} ({basis}bulwark config {knob})",
                    cap.limit
                )
            }
        }
    }
}

/// How the cluster cap came about (`30 per schedulable node x 2 nodes`, none for the absolute
/// cap) and the knob that sets it.
fn cluster_basis(cap: &ClusterCap) -> (Option<String>, &'static str) {
    match cap.basis {
        CapBasis::Absolute => (None, "cluster.maxPendingPods"),
        CapBasis::PerNode { per_node, nodes } => (
            Some(format!(
                "{per_node} per schedulable node x {nodes} {}",
                if nodes == 1 { "node" } else { "nodes" }
            )),
            "cluster.pendingPerHealthyNode",
        ),
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
        assert_eq!(
            r.limit(),
            "pod-rate 5/s, burst 20 (annotations bulwark.io/pod-rate, bulwark.io/pod-burst)"
        );
    }

    #[test]
    fn one_pod_is_one_pod() {
        let expected = Duration::from_secs(1);
        let one_live = Refusal::MaxPods {
            live: 1,
            limit: 1,
            expected,
        };
        assert_eq!(
            one_live.message("tiny", 2),
            "namespace \"tiny\" has 1 live pod, at its limit of 1; retry in 2s, when some finish (annotation bulwark.io/max-pods)"
        );
        let one_pending = Refusal::MaxPending {
            pending: 1,
            limit: 1,
            expected,
        };
        assert!(
            one_pending
                .message("ci", 1)
                .starts_with("namespace \"ci\" has 1 pod not yet running, at its limit of 1;"),
            "{}",
            one_pending.message("ci", 1)
        );
        let share = Refusal::WorkflowShare {
            pending: 1,
            limit: 2,
            reserved: 1,
            workflow: "bulwark.io/workflow=b".into(),
            expected,
        };
        assert!(
            share
                .message("ci", 1)
                .contains("has 1 pod not yet running; the last 1")
        );
        let cluster = Refusal::ClusterPending {
            pending: 1,
            cap: ClusterCap {
                limit: 1,
                basis: CapBasis::PerNode {
                    per_node: 1,
                    nodes: 1,
                },
            },
            expected,
        };
        assert_eq!(
            cluster.message("ci", 1),
            "the cluster has 1 pod not yet running, at its limit of 1 (1 per schedulable node x 1 node); retry in 1s (bulwark config cluster.pendingPerHealthyNode)"
        );
        assert_eq!(
            cluster.limit(),
            "the cluster's pending cap 1 (1 per schedulable node x 1 node; bulwark config cluster.pendingPerHealthyNode)"
        );
        // Several still take the plural.
        let many = Refusal::MaxPods {
            live: 3,
            limit: 3,
            expected,
        };
        assert!(
            many.message("ci", 1)
                .contains("has 3 live pods, at its limit of 3")
        );
        assert_eq!(many.limit(), "max-pods 3 (annotation bulwark.io/max-pods)");
    }

    #[test]
    fn reasons_lists_every_label() {
        let expected = Duration::ZERO;
        let all = [
            Refusal::Rate {
                rate: parse_rate("1/s").unwrap().unwrap(),
                burst: 1,
                wait: expected,
            },
            Refusal::MaxPods {
                live: 0,
                limit: 0,
                expected,
            },
            Refusal::MaxPending {
                pending: 0,
                limit: 0,
                expected,
            },
            Refusal::WorkflowShare {
                pending: 0,
                limit: 0,
                reserved: 0,
                workflow: String::new(),
                expected,
            },
            Refusal::ClusterPending {
                pending: 0,
                cap: ClusterCap {
                    limit: 0,
                    basis: CapBasis::Absolute,
                },
                expected,
            },
        ];
        let labels: Vec<&str> = all.iter().map(Refusal::reason).collect();
        assert_eq!(labels, REASONS);
    }
}
