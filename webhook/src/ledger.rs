//! What this replica has admitted: per-namespace rate state and reservations for pods the
//! watch has not shown yet. Check and commit happen under one namespace lock, so concurrent
//! admissions cannot all see the same free slot; the cluster-wide pending cap is taken with a
//! compare-and-swap for the same reason across namespaces.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use dashmap::DashMap;

use crate::{
    cache::ClusterView,
    config::ClusterLimits,
    policy::Policy,
    quota::{self, Ask, Refusal, Snapshot},
    rate::{self, Nanos},
};

#[derive(Debug)]
struct Reservation {
    expires: Instant,
    /// Known when the client named the pod; pods created with generateName are matched by age.
    name: Option<Box<str>>,
    workflow: Option<Arc<str>>,
    pending: bool,
}

#[derive(Debug, Default)]
struct NamespaceLedger {
    tat: Nanos,
    reservations: VecDeque<Reservation>,
}

/// How an admission that passes is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// Consume rate and reserve counts.
    Enforce,
    /// Reserve counts even when refused (the pod is created anyway), never exceed the rate.
    Warn,
    /// Decide only; record nothing.
    DryRun,
}

/// The cluster-wide knobs a decision needs.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub cluster: ClusterLimits,
    pub workflow_reserved_percent: u8,
}

pub struct Ledger {
    epoch: Instant,
    ttl: Duration,
    namespaces: DashMap<Box<str>, NamespaceLedger>,
    reserved: AtomicU64,
    reserved_pending: AtomicU64,
}

impl Ledger {
    pub fn new(ttl: Duration, epoch: Instant) -> Self {
        Ledger {
            epoch,
            ttl,
            namespaces: DashMap::new(),
            reserved: AtomicU64::new(0),
            reserved_pending: AtomicU64::new(0),
        }
    }

    fn nanos(&self, now: Instant) -> Nanos {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Reservations not yet matched by a watched pod.
    pub fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Relaxed)
    }

    fn release(&self, r: &Reservation) {
        dec(&self.reserved);
        if r.pending {
            dec(&self.reserved_pending);
        }
    }

    fn expire(&self, ns: &mut NamespaceLedger, now: Instant) {
        // Reservations are appended in time order with one TTL, so expired ones are in front.
        while ns.reservations.front().is_some_and(|r| r.expires <= now) {
            if let Some(r) = ns.reservations.pop_front() {
                self.release(&r);
            }
        }
    }

    /// Decides one pod creation and, unless `commit` is [`Commit::DryRun`], records it.
    #[allow(clippy::too_many_arguments)]
    pub fn admit(
        &self,
        view: &dyn ClusterView,
        namespace: &str,
        name: Option<&str>,
        policy: &Policy,
        ask: Ask<'_>,
        limits: &Limits,
        commit: Commit,
        now: Instant,
    ) -> Result<(), Refusal> {
        let mut ns = self.namespaces.entry(namespace.into()).or_default();
        self.expire(&mut ns, now);

        let counts = view.pod_counts(namespace, ask.workflow, now);
        let reserved = u32::try_from(ns.reservations.len()).unwrap_or(u32::MAX);
        let reserved_pending =
            u32::try_from(ns.reservations.iter().filter(|r| r.pending).count()).unwrap_or(u32::MAX);
        let workflow_reserved = ask.workflow.is_some_and(|w| {
            ns.reservations
                .iter()
                .any(|r| r.workflow.as_deref() == Some(w))
        });
        let cluster_cap = quota::cluster_cap(&limits.cluster, view.schedulable_nodes());
        let cluster_drain_rate = view.cluster_drain_rate(now);
        let snap = Snapshot {
            live: counts.live.saturating_add(reserved),
            pending: counts.pending.saturating_add(reserved_pending),
            workflow_started: counts.workflow_started || workflow_reserved,
            pending_drain_rate: counts.pending_drain_rate,
            live_drain_rate: counts.live_drain_rate,
            cluster_pending: view.cluster_pending() + self.reserved_pending.load(Ordering::Acquire),
            cluster_drain_rate,
            cluster_cap,
        };

        let checked = quota::check_counts(policy, &snap, ask, limits.workflow_reserved_percent)
            .and_then(|()| match policy.rate {
                None => Ok(None),
                Some(r) => rate::check(ns.tat, self.nanos(now), r, policy.burst)
                    .map(Some)
                    .map_err(|wait| Refusal::Rate {
                        rate: r,
                        burst: policy.burst,
                        wait,
                    }),
            });

        let new_tat = match (checked, commit) {
            (Ok(_), Commit::DryRun) => return Ok(()),
            (Err(refusal), Commit::DryRun | Commit::Enforce) => return Err(refusal),
            (Err(refusal), Commit::Warn) => {
                // The pod will exist: count it, but take nothing from the rate.
                self.reserve(&mut ns, name, &ask, now);
                self.reserved_pending_force(&ask);
                return Err(refusal);
            }
            (Ok(new_tat), Commit::Enforce | Commit::Warn) => new_tat,
        };

        // The cluster cap spans namespaces, which do not share a lock: take the slot with a
        // compare-and-swap so two namespaces cannot both take the last one.
        if !ask.pending_exempt {
            let mut current = self.reserved_pending.load(Ordering::Acquire);
            loop {
                if let Some(cap) = cluster_cap {
                    let pending = view.cluster_pending() + current;
                    if pending >= cap.limit {
                        let refusal = quota::cluster_refusal(pending, cap, cluster_drain_rate);
                        if commit == Commit::Warn {
                            self.reserve(&mut ns, name, &ask, now);
                            self.reserved_pending_force(&ask);
                        }
                        return Err(refusal);
                    }
                }
                match self.reserved_pending.compare_exchange_weak(
                    current,
                    current + 1,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => break,
                    Err(actual) => current = actual,
                }
            }
        }
        if let Some(tat) = new_tat {
            ns.tat = tat;
        }
        self.reserve(&mut ns, name, &ask, now);
        Ok(())
    }

    fn reserved_pending_force(&self, ask: &Ask<'_>) {
        if !ask.pending_exempt {
            self.reserved_pending.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn reserve(&self, ns: &mut NamespaceLedger, name: Option<&str>, ask: &Ask<'_>, now: Instant) {
        ns.reservations.push_back(Reservation {
            expires: now + self.ttl,
            name: name.filter(|n| !n.is_empty()).map(Box::from),
            workflow: ask.workflow.map(Arc::from),
            pending: !ask.pending_exempt,
        });
        self.reserved.fetch_add(1, Ordering::AcqRel);
    }

    /// The watch showed a pod for the first time: its reservation, if this replica made one,
    /// is now counted by the cache instead. Call after the cache has the pod, so the pod is
    /// briefly counted twice rather than not at all.
    pub fn observe_created(&self, namespace: &str, name: &str) {
        let Some(mut ns) = self.namespaces.get_mut(namespace) else {
            return;
        };
        let pos = ns
            .reservations
            .iter()
            .position(|r| r.name.as_deref() == Some(name))
            .or_else(|| ns.reservations.iter().position(|r| r.name.is_none()));
        if let Some(r) = pos.and_then(|p| ns.reservations.remove(p)) {
            self.release(&r);
        }
    }

    /// Drops expired reservations and idle namespaces; run periodically so namespaces that
    /// stop creating pods do not hold reservations or memory.
    pub fn sweep(&self, now: Instant) {
        let now_nanos = self.nanos(now);
        self.namespaces.retain(|_, ns| {
            self.expire(ns, now);
            !ns.reservations.is_empty() || ns.tat > now_nanos
        });
    }
}

fn dec(counter: &AtomicU64) {
    let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
        Some(n.saturating_sub(1))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cache::{Cache, PodEntry, PodState},
        policy::parse_rate,
    };
    use std::sync::Barrier;

    const TTL: Duration = Duration::from_secs(30);

    fn limits(max_pending: Option<u32>) -> Limits {
        Limits {
            cluster: ClusterLimits {
                max_pending_pods: max_pending,
                pending_per_healthy_node: None,
            },
            workflow_reserved_percent: 20,
        }
    }

    fn counts_only(max_pods: Option<u32>, max_pending: Option<u32>) -> Policy {
        Policy {
            rate: None,
            max_pods,
            max_pending_pods: max_pending,
            ..Policy::default()
        }
    }

    fn pending(workflow: Option<&str>) -> PodEntry {
        PodEntry {
            state: PodState::Pending,
            pending_exempt: false,
            workflow: workflow.map(Arc::from),
        }
    }

    #[test]
    fn reservations_count_until_the_watch_shows_the_pod() {
        let t = Instant::now();
        let cache = Cache::new(Policy::default(), vec![]);
        let ledger = Ledger::new(TTL, t);
        let p = counts_only(Some(2), None);
        let l = limits(None);
        let admit = |name: &str| {
            ledger.admit(
                &cache,
                "ci",
                Some(name),
                &p,
                Ask::default(),
                &l,
                Commit::Enforce,
                t,
            )
        };
        assert!(admit("a").is_ok());
        assert!(admit("b").is_ok());
        assert_eq!(admit("c").unwrap_err().reason(), "max_pods");
        assert_eq!(ledger.reserved(), 2);

        // The watch shows "a": the cache counts it, the reservation goes; still full.
        cache.apply_pod("ci", "a", pending(None), t);
        ledger.observe_created("ci", "a");
        assert_eq!(ledger.reserved(), 1);
        assert!(admit("c").is_err());
        // "a" is deleted: a slot opens.
        cache.delete_pod("ci", "a", t);
        assert!(admit("c").is_ok());
    }

    #[test]
    fn reservations_expire_after_ttl() {
        let t = Instant::now();
        let cache = Cache::new(Policy::default(), vec![]);
        let ledger = Ledger::new(TTL, t);
        let p = counts_only(None, Some(1));
        let l = limits(None);
        let admit = |at: Instant| {
            ledger.admit(
                &cache,
                "ci",
                None,
                &p,
                Ask::default(),
                &l,
                Commit::Enforce,
                at,
            )
        };
        assert!(admit(t).is_ok());
        assert_eq!(
            admit(t + TTL - Duration::from_millis(1))
                .unwrap_err()
                .reason(),
            "max_pending"
        );
        // The pod never showed up (another webhook refused it): the slot comes back.
        assert!(admit(t + TTL).is_ok());
        ledger.sweep(t + 3 * TTL);
        assert_eq!(ledger.reserved(), 0);
    }

    #[test]
    fn generate_name_pods_match_the_oldest_nameless_reservation() {
        let t = Instant::now();
        let cache = Cache::new(Policy::default(), vec![]);
        let ledger = Ledger::new(TTL, t);
        let p = counts_only(None, None);
        let l = limits(None);
        ledger
            .admit(
                &cache,
                "ci",
                None,
                &p,
                Ask::default(),
                &l,
                Commit::Enforce,
                t,
            )
            .unwrap();
        ledger
            .admit(
                &cache,
                "ci",
                Some("named"),
                &p,
                Ask::default(),
                &l,
                Commit::Enforce,
                t,
            )
            .unwrap();
        ledger.observe_created("ci", "job-x7k2p");
        ledger.observe_created("ci", "unrelated-pod");
        assert_eq!(ledger.reserved(), 1, "the named reservation stays");
        ledger.observe_created("ci", "named");
        assert_eq!(ledger.reserved(), 0);
    }

    #[test]
    fn dry_run_consumes_nothing() {
        let t = Instant::now();
        let cache = Cache::new(Policy::default(), vec![]);
        let ledger = Ledger::new(TTL, t);
        let p = Policy {
            rate: parse_rate("1/m").unwrap(),
            burst: 1,
            ..counts_only(Some(1), None)
        };
        let l = limits(None);
        for _ in 0..5 {
            assert!(
                ledger
                    .admit(
                        &cache,
                        "ci",
                        None,
                        &p,
                        Ask::default(),
                        &l,
                        Commit::DryRun,
                        t
                    )
                    .is_ok()
            );
        }
        assert_eq!(ledger.reserved(), 0);
        assert!(
            ledger
                .admit(
                    &cache,
                    "ci",
                    None,
                    &p,
                    Ask::default(),
                    &l,
                    Commit::Enforce,
                    t
                )
                .is_ok()
        );
        let r = ledger.admit(
            &cache,
            "ci",
            None,
            &p,
            Ask::default(),
            &l,
            Commit::DryRun,
            t,
        );
        assert_eq!(
            r.unwrap_err().reason(),
            "max_pods",
            "dry-run still tells the verdict"
        );
    }

    #[test]
    fn warn_mode_counts_the_pod_but_not_the_rate() {
        let t = Instant::now();
        let cache = Cache::new(Policy::default(), vec![]);
        let ledger = Ledger::new(TTL, t);
        let p = Policy {
            rate: parse_rate("1/s").unwrap(),
            burst: 1,
            ..counts_only(None, None)
        };
        let l = limits(None);
        assert!(
            ledger
                .admit(&cache, "ci", None, &p, Ask::default(), &l, Commit::Warn, t)
                .is_ok()
        );
        let r = ledger.admit(&cache, "ci", None, &p, Ask::default(), &l, Commit::Warn, t);
        assert_eq!(r.unwrap_err().reason(), "rate");
        assert_eq!(ledger.reserved(), 2, "the warned pod is still counted");
        // The rate state did not run ahead: one second later one creation fits again.
        let later = t + Duration::from_secs(1);
        assert!(
            ledger
                .admit(
                    &cache,
                    "ci",
                    None,
                    &p,
                    Ask::default(),
                    &l,
                    Commit::Enforce,
                    later
                )
                .is_ok()
        );
    }

    #[test]
    fn workflow_with_a_reservation_counts_as_started() {
        let t = Instant::now();
        let cache = Cache::new(Policy::default(), vec![]);
        let ledger = Ledger::new(TTL, t);
        let p = counts_only(None, Some(5)); // 1 slot kept for started workflows
        let l = limits(None);
        let wf = |w: &'static str| Ask {
            pending_exempt: false,
            workflow: Some(w),
        };
        for _ in 0..4 {
            ledger
                .admit(&cache, "ci", None, &p, wf("a"), &l, Commit::Enforce, t)
                .unwrap();
        }
        assert_eq!(
            ledger
                .admit(&cache, "ci", None, &p, wf("b"), &l, Commit::Enforce, t)
                .unwrap_err()
                .reason(),
            "workflow_share"
        );
        assert!(
            ledger
                .admit(&cache, "ci", None, &p, wf("a"), &l, Commit::Enforce, t)
                .is_ok()
        );
        // A workflow whose pods the watch shows is started too.
        cache.apply_pod("ci", "c-1", pending(Some("c")), t);
        let p10 = counts_only(None, Some(10));
        for _ in 0..3 {
            ledger
                .admit(&cache, "ci", None, &p10, wf("a"), &l, Commit::Enforce, t)
                .unwrap();
        }
        // 9 pending of 10, 2 kept: "c" may, a new "d" may not.
        assert!(
            ledger
                .admit(&cache, "ci", None, &p10, wf("c"), &l, Commit::Enforce, t)
                .is_ok()
        );
        assert!(
            ledger
                .admit(&cache, "ci", None, &p10, wf("d"), &l, Commit::Enforce, t)
                .is_err()
        );
    }

    #[test]
    fn concurrent_admissions_never_overshoot_namespace_or_cluster_caps() {
        let t = Instant::now();
        let cache = Arc::new(Cache::new(Policy::default(), vec![]));
        let ledger = Arc::new(Ledger::new(TTL, t));
        let p = counts_only(Some(50), None);
        let l = limits(Some(120));
        let threads = 8;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (cache, ledger, barrier, p) =
                    (cache.clone(), ledger.clone(), barrier.clone(), p.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut ok = [0u32; 4];
                    for n in 0..100 {
                        // Four namespaces hammered from every thread at once.
                        let ns = ["a", "b", "c", "d"][(i + n) % 4];
                        let r = ledger.admit(
                            &*cache,
                            ns,
                            None,
                            &p,
                            Ask::default(),
                            &l,
                            Commit::Enforce,
                            t,
                        );
                        if r.is_ok() {
                            ok[(i + n) % 4] += 1;
                        }
                    }
                    ok
                })
            })
            .collect();
        let mut per_ns = [0u32; 4];
        for h in handles {
            for (acc, n) in per_ns.iter_mut().zip(h.join().unwrap()) {
                *acc += n;
            }
        }
        assert!(per_ns.iter().all(|&n| n <= 50), "{per_ns:?}");
        assert_eq!(
            per_ns.iter().sum::<u32>(),
            120,
            "{per_ns:?}: the cluster cap is exact"
        );
        assert_eq!(ledger.reserved(), 120);
    }

    #[test]
    fn rate_limits_per_namespace() {
        let t = Instant::now();
        let cache = Cache::new(Policy::default(), vec![]);
        let ledger = Ledger::new(TTL, t);
        let p = Policy {
            rate: parse_rate("5/s").unwrap(),
            burst: 3,
            ..counts_only(None, None)
        };
        let l = limits(None);
        for _ in 0..3 {
            ledger
                .admit(
                    &cache,
                    "a",
                    None,
                    &p,
                    Ask::default(),
                    &l,
                    Commit::Enforce,
                    t,
                )
                .unwrap();
        }
        let r = ledger
            .admit(
                &cache,
                "a",
                None,
                &p,
                Ask::default(),
                &l,
                Commit::Enforce,
                t,
            )
            .unwrap_err();
        assert_eq!(r.expected_wait(), Duration::from_millis(200));
        assert!(
            ledger
                .admit(
                    &cache,
                    "b",
                    None,
                    &p,
                    Ask::default(),
                    &l,
                    Commit::Enforce,
                    t
                )
                .is_ok()
        );
    }
}
