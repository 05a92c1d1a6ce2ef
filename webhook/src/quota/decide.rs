//! The quota decision: policy + counts snapshot + rate state + pod -> admit, or a refusal a
//! person can act on. Pure: the ledger takes the snapshot under the namespace's lock and
//! commits the result. The order is the contract's: max-pods, max-pending-pods (with the
//! workflow share), the cluster cap, then the rate, the only check that consumes anything.

use std::time::Duration;

use super::{
    ClusterLimits,
    peers::Part,
    rate::{self, Nanos},
    refusal::Refusal,
};
use crate::policy::Policy;

/// The cluster-wide knobs a decision needs.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub cluster: ClusterLimits,
    pub workflow_reserved_percent: u8,
    /// False while the caches are too stale to count on: only the rate is enforced.
    pub count_quotas: bool,
}

/// A namespace's rate state on this replica, and the part of the namespace's rate it may use.
#[derive(Debug, Clone, Copy)]
pub struct RateState {
    /// GCRA's theoretical arrival time of the next creation.
    pub tat: Nanos,
    pub now: Nanos,
    pub part: Part,
}

/// Decides one creation. `Ok(Some(tat))`: admitted, and the rate state to store; `Ok(None)`:
/// admitted by a namespace without a rate.
pub fn decide(
    policy: &Policy,
    limits: &Limits,
    snap: &Snapshot,
    ask: Ask<'_>,
    state: RateState,
) -> Result<Option<Nanos>, Refusal> {
    if limits.count_quotas {
        check_counts(policy, snap, ask, limits.workflow_reserved_percent)?;
    }
    let Some(r) = policy.rate else {
        return Ok(None);
    };
    rate::check(
        state.tat,
        state.now,
        state.part.rate(r),
        state.part.burst(policy.burst),
    )
    .map(Some)
    // The refusal names the namespace's whole limit: that is what the user set.
    .map_err(|wait| Refusal::Rate {
        rate: r,
        burst: policy.burst,
        wait,
    })
}

/// What the counters said when the decision was taken; reservations already added in.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Snapshot {
    pub live: u32,
    pub pending: u32,
    pub workflow_started: bool,
    pub pending_drain_rate: f64,
    pub live_drain_rate: f64,
    pub cluster_pending: u64,
    pub cluster_drain_rate: f64,
    pub cluster_cap: Option<ClusterCap>,
    /// Clients of this namespace refused for a count quota and not yet due back.
    pub waiting: u32,
    /// The same for the cluster cap, across namespaces.
    pub cluster_waiting: u64,
    /// Of `live` (and `pending`), this replica's admissions its peers have not confirmed
    /// receiving yet, and how many replicas (itself included) may be admitting at once.
    pub unconfirmed: u32,
    pub unconfirmed_pending: u32,
    pub sharers: u32,
}

impl Snapshot {
    /// A count as this replica must judge it while `sharers` replicas admit at once: its own
    /// unconfirmed admissions count once for each, since every other replica may have made as
    /// many that it does not know of yet. So each takes at most its share of the slots left
    /// (docs/architecture.md, "Replicas share one limit"); alone, the count as it is.
    fn projected(&self, count: u32, unconfirmed: u32) -> u32 {
        let others = self.sharers.saturating_sub(1);
        count.saturating_add(unconfirmed.saturating_mul(others))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterCap {
    pub limit: u64,
    pub basis: CapBasis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapBasis {
    Absolute,
    PerNode { per_node: u32, nodes: u32 },
}

/// The smaller of the absolute cap and the per-schedulable-node cap; the per-node cap only
/// applies once nodes are watched.
pub fn cluster_cap(limits: &ClusterLimits, schedulable_nodes: Option<u32>) -> Option<ClusterCap> {
    let absolute = limits.max_pending_pods.map(|limit| ClusterCap {
        limit: u64::from(limit),
        basis: CapBasis::Absolute,
    });
    let per_node =
        limits
            .pending_per_healthy_node
            .zip(schedulable_nodes)
            .map(|(per_node, nodes)| ClusterCap {
                limit: u64::from(per_node) * u64::from(nodes),
                basis: CapBasis::PerNode { per_node, nodes },
            });
    match (absolute, per_node) {
        (Some(a), Some(p)) => Some(if p.limit < a.limit { p } else { a }),
        (a, p) => a.or(p),
    }
}

/// The pod as the quota sees it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ask<'a> {
    pub pending_exempt: bool,
    pub workflow: Option<&'a str>,
}

/// When nothing has drained recently there is no rate to go by: a short pause lets the
/// scheduler and kubelets catch up without parking clients for long.
const NO_DRAIN_PENDING_WAIT: Duration = Duration::from_secs(5);
const NO_DRAIN_LIVE_WAIT: Duration = Duration::from_secs(10);

/// Time until `needed` slots free up at `rate` per second. `needed` counts the clients already
/// waiting in line ([`crate::waiting`]), so a refused client is sent behind them.
fn expected(needed: u64, rate: f64, fallback: Duration) -> Duration {
    if rate < 0.01 {
        fallback
    } else {
        Duration::from_secs_f64((needed.max(1) as f64 / rate).min(3600.0))
    }
}

/// How much of a namespace's `max-pending-pods` one pod may fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub usable: u32,
    /// The last pending slots, kept for workflows that already have running pods.
    pub reserved: u32,
}

/// A pod of a workflow with no running pod yet leaves the reserved share to workflows already
/// under way, so a flood of new workflows cannot stall those that have started; every other
/// pod may use the whole cap. The admission check, the hold and the releaser all ask here.
pub fn pending_share(limit: u32, reserved_percent: u8, new_workflow: bool) -> Share {
    let reserved = limit * u32::from(reserved_percent.min(100)) / 100;
    let usable = if new_workflow {
        limit - reserved
    } else {
        limit
    };
    Share { usable, reserved }
}

/// Checks the count quotas (they consume nothing, so they go before the rate).
pub fn check_counts(
    policy: &Policy,
    snap: &Snapshot,
    ask: Ask<'_>,
    workflow_reserved_percent: u8,
) -> Result<(), Refusal> {
    let live = snap.projected(snap.live, snap.unconfirmed);
    if let Some(limit) = policy.max_pods
        && live >= limit
    {
        // Shown as the count the namespace is about to reach, at most the limit when only
        // the projection reaches it.
        let shown = snap.live.max(limit.min(live));
        return Err(Refusal::MaxPods {
            live: shown,
            limit,
            expected: expected(
                u64::from(shown - limit) + 1 + u64::from(snap.waiting),
                snap.live_drain_rate,
                NO_DRAIN_LIVE_WAIT,
            ),
        });
    }
    if ask.pending_exempt {
        return Ok(());
    }
    if let Some(limit) = policy.max_pending_pods {
        let new_workflow = ask.workflow.filter(|_| !snap.workflow_started);
        let Share { usable, reserved } =
            pending_share(limit, workflow_reserved_percent, new_workflow.is_some());
        let projected = snap.projected(snap.pending, snap.unconfirmed_pending);
        if projected >= usable {
            let pending = snap.pending.max(usable.min(projected));
            let expected = expected(
                u64::from(pending - usable) + 1 + u64::from(snap.waiting),
                snap.pending_drain_rate,
                NO_DRAIN_PENDING_WAIT,
            );
            return Err(match new_workflow {
                Some(workflow) if pending < limit => Refusal::WorkflowShare {
                    pending,
                    limit,
                    reserved,
                    workflow: workflow.to_owned(),
                    expected,
                },
                _ => Refusal::MaxPending {
                    pending,
                    limit,
                    expected,
                },
            });
        }
    }
    if let Some(cap) = snap.cluster_cap
        && snap.cluster_pending >= cap.limit
    {
        return Err(cluster_refusal(
            snap.cluster_pending,
            cap,
            snap.cluster_drain_rate,
            snap.cluster_waiting,
        ));
    }
    Ok(())
}

pub fn cluster_refusal(pending: u64, cap: ClusterCap, drain_rate: f64, waiting: u64) -> Refusal {
    Refusal::ClusterPending {
        pending,
        cap,
        expected: expected(
            pending.saturating_sub(cap.limit) + 1 + waiting,
            drain_rate,
            NO_DRAIN_PENDING_WAIT,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_pods: Option<u32>, max_pending: Option<u32>) -> Policy {
        Policy {
            max_pods,
            max_pending_pods: max_pending,
            ..Policy::default()
        }
    }

    fn snap(live: u32, pending: u32) -> Snapshot {
        Snapshot {
            live,
            pending,
            ..Snapshot::default()
        }
    }

    #[test]
    fn replicas_admitting_at_once_each_take_their_share_of_the_slots_left() {
        let p = policy(Some(20), Some(20));
        // 8 known to all, 4 of this replica's own not yet confirmed by its two peers: each
        // of the three may hold ceil(12 / 3) = 4 unconfirmed, so this one is at its share.
        let s = Snapshot {
            live: 12,
            pending: 12,
            unconfirmed: 4,
            unconfirmed_pending: 4,
            sharers: 3,
            ..Snapshot::default()
        };
        let r = check_counts(&p, &s, Ask::default(), 0).unwrap_err();
        assert_eq!(r.reason(), "max_pods");
        assert!(
            r.message("ci", 1).contains("has 20 live pods"),
            "{}",
            r.message("ci", 1)
        );
        // One fewer unconfirmed: room for one more.
        let s = Snapshot {
            live: 11,
            pending: 11,
            unconfirmed: 3,
            unconfirmed_pending: 3,
            ..s
        };
        assert!(check_counts(&p, &s, Ask::default(), 0).is_ok());
        // The pending cap alone (max-pods off) is judged the same way.
        let only_pending = policy(None, Some(20));
        let s = Snapshot {
            live: 12,
            pending: 12,
            unconfirmed: 4,
            unconfirmed_pending: 4,
            ..s
        };
        assert_eq!(
            check_counts(&only_pending, &s, Ask::default(), 0)
                .unwrap_err()
                .reason(),
            "max_pending"
        );
        // Alone, or with everything confirmed, the count as it is.
        for s in [
            Snapshot { sharers: 1, ..s },
            Snapshot {
                unconfirmed: 0,
                unconfirmed_pending: 0,
                ..s
            },
        ] {
            assert!(check_counts(&p, &s, Ask::default(), 0).is_ok());
        }
    }

    #[test]
    fn max_pods() {
        let p = policy(Some(3), None);
        assert!(check_counts(&p, &snap(2, 0), Ask::default(), 20).is_ok());
        let r = check_counts(&p, &snap(3, 0), Ask::default(), 20).unwrap_err();
        assert_eq!(r.reason(), "max_pods");
        assert_eq!(
            r.message("ci", 7),
            "namespace \"ci\" has 3 live pods, at its limit of 3; retry in 7s, when some finish (annotation bulwark.io/max-pods)"
        );
        assert!(
            check_counts(
                &policy(None, None),
                &snap(1_000_000, 1_000_000),
                Ask::default(),
                20
            )
            .is_ok()
        );
    }

    #[test]
    fn max_pending_and_daemonsets() {
        let p = policy(None, Some(2));
        assert!(check_counts(&p, &snap(10, 1), Ask::default(), 0).is_ok());
        let r = check_counts(&p, &snap(10, 2), Ask::default(), 0).unwrap_err();
        assert_eq!(r.reason(), "max_pending");
        assert!(
            r.message("ci", 3)
                .contains("2 pods not yet running, at its limit of 2")
        );
        let ds = Ask {
            pending_exempt: true,
            workflow: None,
        };
        assert!(check_counts(&p, &snap(10, 5), ds, 0).is_ok());
        // max-pods still applies to DaemonSet pods.
        assert!(check_counts(&policy(Some(10), Some(2)), &snap(10, 5), ds, 0).is_err());
    }

    #[test]
    fn workflow_priority() {
        let p = policy(None, Some(10)); // 20% -> 2 slots kept for started workflows
        let new_wf = Ask {
            pending_exempt: false,
            workflow: Some("bulwark.io/workflow=b"),
        };
        let started = Snapshot {
            workflow_started: true,
            ..snap(0, 9)
        };
        assert!(check_counts(&p, &snap(0, 7), new_wf, 20).is_ok());
        let r = check_counts(&p, &snap(0, 8), new_wf, 20).unwrap_err();
        assert_eq!(r.reason(), "workflow_share");
        assert!(
            r.message("ci", 2)
                .contains("the last 2 of its limit of 10 are kept for workflows already running, so new workflow bulwark.io/workflow=b waits"),
            "{}",
            r.message("ci", 2)
        );
        assert!(
            check_counts(&p, &started, new_wf, 20).is_ok(),
            "started workflow uses the share"
        );
        let full = Snapshot {
            workflow_started: true,
            ..snap(0, 10)
        };
        assert_eq!(
            check_counts(&p, &full, new_wf, 20).unwrap_err().reason(),
            "max_pending"
        );
        // Pods outside workflows are not held back by the share.
        assert!(check_counts(&p, &snap(0, 9), Ask::default(), 20).is_ok());
        // At a tiny limit the share rounds down, so new workflows can still start.
        assert!(check_counts(&policy(None, Some(1)), &snap(0, 0), new_wf, 20).is_ok());
        // A new workflow at the full limit is told about the limit, not the share.
        assert_eq!(
            check_counts(&p, &snap(0, 10), new_wf, 20)
                .unwrap_err()
                .reason(),
            "max_pending"
        );
    }

    #[test]
    fn cluster_cap_takes_the_smaller_and_needs_nodes() {
        let limits = ClusterLimits {
            max_pending_pods: Some(1000),
            pending_per_healthy_node: Some(20),
        };
        assert_eq!(cluster_cap(&limits, None).map(|c| c.limit), Some(1000));
        let cap = cluster_cap(&limits, Some(10)).unwrap();
        assert_eq!(cap.limit, 200);
        assert_eq!(
            cap.basis,
            CapBasis::PerNode {
                per_node: 20,
                nodes: 10
            }
        );
        assert_eq!(cluster_cap(&limits, Some(100)).map(|c| c.limit), Some(1000));
        assert_eq!(cluster_cap(&limits, Some(0)).map(|c| c.limit), Some(0));
        let none = ClusterLimits {
            max_pending_pods: None,
            pending_per_healthy_node: None,
        };
        assert_eq!(cluster_cap(&none, Some(5)), None);

        let s = Snapshot {
            cluster_pending: 200,
            cluster_cap: Some(cap),
            ..snap(0, 0)
        };
        let r = check_counts(&policy(None, None), &s, Ask::default(), 20).unwrap_err();
        assert_eq!(
            r.message("ci", 5),
            "the cluster has 200 pods not yet running, at its limit of 200 (20 per schedulable node x 10 nodes); retry in 5s (bulwark config cluster.pendingPerHealthyNode)"
        );
    }

    #[test]
    fn expected_wait_follows_the_drain_rate() {
        let p = policy(None, Some(10));
        let fast = Snapshot {
            pending_drain_rate: 5.0,
            ..snap(0, 14)
        };
        // 5 slots needed at 5 pods/s: about a second.
        let r = check_counts(&p, &fast, Ask::default(), 0).unwrap_err();
        assert_eq!(r.expected_wait(), Duration::from_secs(1));
        let stalled = snap(0, 10);
        let r = check_counts(&p, &stalled, Ask::default(), 0).unwrap_err();
        assert_eq!(r.expected_wait(), NO_DRAIN_PENDING_WAIT);
    }

    #[test]
    fn clients_already_waiting_push_the_next_one_back() {
        let p = policy(None, Some(10));
        let full = Snapshot {
            pending_drain_rate: 10.0,
            ..snap(0, 10)
        };
        // One slot at 10 pods/s: 0.1 s, which the client hears as 1 s.
        let r = check_counts(&p, &full, Ask::default(), 0).unwrap_err();
        assert_eq!(r.expected_wait(), Duration::from_millis(100));
        // 49 clients already told to come back: this one is 50th in line, 5 s away.
        let queued = Snapshot {
            waiting: 49,
            ..full
        };
        let r = check_counts(&p, &queued, Ask::default(), 0).unwrap_err();
        assert_eq!(r.expected_wait(), Duration::from_secs(5));
        let max_pods = Snapshot {
            live_drain_rate: 2.0,
            waiting: 3,
            ..snap(4, 0)
        };
        let r = check_counts(&policy(Some(4), None), &max_pods, Ask::default(), 0).unwrap_err();
        assert_eq!(r.expected_wait(), Duration::from_secs(2));
        let cap = ClusterCap {
            limit: 100,
            basis: CapBasis::Absolute,
        };
        assert_eq!(
            cluster_refusal(100, cap, 20.0, 39).expected_wait(),
            Duration::from_secs(2)
        );
        // Nothing drains: the line cannot be timed, the short fixed pause stands.
        let stalled = Snapshot {
            waiting: 500,
            ..snap(0, 10)
        };
        let r = check_counts(&p, &stalled, Ask::default(), 0).unwrap_err();
        assert_eq!(r.expected_wait(), NO_DRAIN_PENDING_WAIT);
    }
}
