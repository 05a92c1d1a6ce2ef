//! Property tests of the quota invariants: under any interleaving of admissions, creations
//! rejected later by another admission plugin, watch events that arrive late (but within the
//! reservation TTL), pods starting and finishing, time passing and sweeps, the pods that really
//! exist never exceed a namespace's max-pods or max-pending-pods nor the cluster pending cap;
//! and once the watch has shown everything and the TTL has passed, nothing stays reserved.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bulwark::{
    cluster::cache::{Cache, PodEntry, PodState},
    policy::{
        Policy,
        pod::{Held, PodRules},
    },
    quota::{
        ClusterLimits,
        decide::{Ask, Limits},
        ledger::{Commit, Ledger, Request},
        view::ClusterView,
    },
};
use proptest::prelude::*;

const TTL: Duration = Duration::from_secs(30);
const NAMESPACES: [&str; 2] = ["ci", "batch"];
const WORKFLOWS: [&str; 2] = ["wf-a", "wf-b"];

#[derive(Debug, Clone)]
enum Op {
    /// A creation in namespace `ns`, in workflow `wf` (if any); `rejected` by a later plugin.
    Admit {
        ns: usize,
        wf: Option<usize>,
        named: bool,
        rejected: bool,
        dry_run: bool,
    },
    /// The watch shows the oldest pod it has not shown yet.
    WatchShows,
    /// A pending pod the watch has shown starts running.
    Start(usize),
    /// A pod the watch has shown finishes (or is deleted).
    Finish(usize, bool),
    Advance(u64),
    Sweep,
}

fn op() -> impl Strategy<Value = Op> {
    let admit = (
        0..2usize,
        prop::option::of(0..2usize),
        any::<bool>(),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(ns, wf, named, rejected, dry_run)| Op::Admit {
            ns,
            wf,
            named,
            rejected,
            dry_run,
        });
    prop_oneof![
        6 => admit,
        4 => Just(Op::WatchShows),
        2 => any::<usize>().prop_map(Op::Start),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(i, delete)| Op::Finish(i, delete)),
        2 => (1..8000u64).prop_map(Op::Advance),
        1 => Just(Op::Sweep),
    ]
}

/// A pod that really exists, and whether the watch has shown it yet.
#[derive(Debug)]
struct RealPod {
    ns: usize,
    name: String,
    wf: Option<usize>,
    state: PodState,
    created: Instant,
    shown: bool,
}

struct World {
    now: Instant,
    cache: Cache,
    ledger: Ledger,
    limits: Limits,
    policy: Policy,
    pods: Vec<RealPod>,
    next: u64,
}

impl World {
    fn new(max_pods: u32, max_pending: u32, cluster_pending: u32) -> World {
        let now = Instant::now();
        World {
            now,
            cache: Cache::new(Policy::default(), PodRules::default()),
            ledger: Ledger::new(TTL, now),
            limits: Limits {
                cluster: ClusterLimits {
                    max_pending_pods: Some(cluster_pending),
                    pending_per_healthy_node: None,
                },
                workflow_reserved_percent: 20,
                count_quotas: true,
            },
            policy: Policy {
                rate: None,
                max_pods: Some(max_pods),
                max_pending_pods: Some(max_pending),
                ..Policy::default()
            },
            pods: Vec::new(),
            next: 0,
        }
    }

    /// The watch shows pod `i` as it is now.
    fn show(&mut self, i: usize) {
        let p = &mut self.pods[i];
        p.shown = true;
        let entry = PodEntry {
            state: p.state,
            held: Held::All,
            workflow: p.wf.map(|w| Arc::from(WORKFLOWS[w])),
        };
        let ns = NAMESPACES[p.ns];
        if self.cache.apply_pod(ns, &p.name, entry, self.now) {
            self.ledger.observe_created(ns, &p.name);
        }
    }

    /// Index of the `pick`-th pod (modulo their number) the watch has shown that `wanted`.
    fn shown(&self, pick: usize, wanted: impl Fn(&RealPod) -> bool) -> Option<usize> {
        let shown: Vec<usize> = (0..self.pods.len())
            .filter(|&i| self.pods[i].shown && wanted(&self.pods[i]))
            .collect();
        shown.get(pick % shown.len().max(1)).copied()
    }

    fn admit(&mut self, ns: usize, wf: Option<usize>, named: bool, rejected: bool, dry_run: bool) {
        self.next += 1;
        let name = format!("p{}", self.next);
        let ask = Ask {
            pending_exempt: false,
            workflow: wf.map(|w| WORKFLOWS[w]),
        };
        let commit = if dry_run {
            Commit::DryRun
        } else {
            Commit::Enforce
        };
        let request = Request {
            namespace: NAMESPACES[ns],
            name: named.then_some(name.as_str()),
            policy: &self.policy,
            ask,
            commit,
            joins_line: true,
            unknown_namespace: false,
        };
        let admitted = self
            .ledger
            .admit(&self.cache, &request, &self.limits, self.now);
        if admitted.is_ok() && !rejected && !dry_run {
            self.pods.push(RealPod {
                ns,
                name,
                wf,
                state: PodState::Pending,
                created: self.now,
                shown: false,
            });
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Admit {
                ns,
                wf,
                named,
                rejected,
                dry_run,
            } => self.admit(ns, wf, named, rejected, dry_run),
            Op::WatchShows => {
                if let Some(i) = self.pods.iter().position(|p| !p.shown) {
                    self.show(i);
                }
            }
            Op::Start(pick) => {
                if let Some(i) = self.shown(pick, |p| p.state == PodState::Pending) {
                    self.pods[i].state = PodState::Running;
                    self.show(i);
                }
            }
            Op::Finish(pick, delete) => {
                if let Some(i) = self.shown(pick, |_| true) {
                    if delete {
                        let p = self.pods.remove(i);
                        self.cache.delete_pod(NAMESPACES[p.ns], &p.name, self.now);
                    } else {
                        self.pods[i].state = PodState::Terminal;
                        self.show(i);
                    }
                }
            }
            Op::Advance(ms) => {
                let to = self.now + Duration::from_millis(ms);
                // The precondition of the invariant: the watch shows a pod within the TTL.
                // A pod it would otherwise miss is shown just before its reservation expires.
                while let Some(i) = self
                    .pods
                    .iter()
                    .position(|p| !p.shown && p.created + TTL <= to)
                {
                    let last_moment = self.pods[i].created + TTL - Duration::from_millis(1);
                    self.now = self.now.max(last_moment);
                    self.show(i);
                }
                self.now = to;
            }
            Op::Sweep => self.ledger.sweep(self.now),
        }
    }

    fn count(&self, ns: Option<usize>, states: &[PodState]) -> u32 {
        let n = self
            .pods
            .iter()
            .filter(|p| ns.is_none_or(|ns| p.ns == ns) && states.contains(&p.state))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    fn check(&self) -> Result<(), TestCaseError> {
        use PodState::{Pending, Running};
        let max_pods = self.policy.max_pods.unwrap_or(u32::MAX);
        let max_pending = self.policy.max_pending_pods.unwrap_or(u32::MAX);
        let cluster = self.limits.cluster.max_pending_pods.unwrap_or(u32::MAX);
        for (ns, name) in NAMESPACES.iter().enumerate() {
            let live = self.count(Some(ns), &[Pending, Running]);
            prop_assert!(
                live <= max_pods,
                "{live} live in {name} > max-pods {max_pods}"
            );
            let pending = self.count(Some(ns), &[Pending]);
            prop_assert!(
                pending <= max_pending,
                "{pending} pending in {name} > max-pending-pods {max_pending}"
            );
        }
        let pending = self.count(None, &[Pending]);
        prop_assert!(
            pending <= cluster,
            "{pending} pending > cluster cap {cluster}"
        );
        // The cache counts each pod the watch has shown exactly once.
        let shown_pending = self
            .pods
            .iter()
            .filter(|p| p.shown && p.state == Pending)
            .count();
        prop_assert_eq!(self.cache.cluster_pending(), shown_pending as u64);
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn caps_hold_under_any_interleaving(
        max_pods in 1..12u32,
        max_pending in 1..8u32,
        cluster in 1..10u32,
        ops in prop::collection::vec(op(), 1..200),
    ) {
        let mut world = World::new(max_pods, max_pending, cluster);
        for op in &ops {
            world.apply(op);
            world.check()?;
        }
        // Once the watch has shown every pod and the TTL has passed, nothing stays reserved:
        // rejected creations and unmatched reservations do not leak.
        while world.pods.iter().any(|p| !p.shown) {
            world.apply(&Op::WatchShows);
        }
        world.apply(&Op::Advance(TTL.as_millis() as u64 + 1));
        world.apply(&Op::Sweep);
        prop_assert_eq!(world.ledger.reserved(), 0);
    }

    #[test]
    fn a_full_namespace_admits_again_once_a_pod_is_gone(
        max_pods in 1..6u32,
        extra in 1..5u32,
    ) {
        let mut world = World::new(max_pods, max_pods, 100);
        for _ in 0..max_pods + extra {
            world.admit(0, None, true, false, false);
        }
        prop_assert_eq!(world.pods.len() as u32, max_pods);
        while world.pods.iter().any(|p| !p.shown) {
            world.apply(&Op::WatchShows);
        }
        world.apply(&Op::Finish(0, true));
        world.admit(0, None, true, false, false);
        prop_assert_eq!(world.pods.len() as u32, max_pods, "the freed slot is taken again");
        prop_assert_eq!(world.cache.pod_counts("ci", None, world.now).live, max_pods - 1);
    }
}
