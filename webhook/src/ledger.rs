//! What this replica has admitted: per-namespace rate state and reservations for pods the
//! watch has not shown yet. Check and commit happen under one namespace lock, so concurrent
//! admissions cannot all see the same free slot; the cluster-wide pending cap is taken with a
//! compare-and-swap for the same reason across namespaces.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
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
    waiting::WaitingLine,
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
    /// Counters over `reservations`, so a decision does not scan them.
    pending: u32,
    workflows: HashMap<Arc<str>, u32>,
    /// Clients refused for this namespace's count quotas, until their retry is due; boxed
    /// and made on the first refusal, since most namespaces are never refused.
    line: Option<Box<WaitingLine>>,
}

impl NamespaceLedger {
    fn waiting(&mut self, secs: u64) -> u32 {
        self.line.as_mut().map_or(0, |line| line.waiting(secs))
    }

    fn push(&mut self, r: Reservation) {
        if r.pending {
            self.pending += 1;
        }
        if let Some(w) = &r.workflow {
            *self.workflows.entry(w.clone()).or_insert(0) += 1;
        }
        self.reservations.push_back(r);
    }

    fn forget(&mut self, r: &Reservation) {
        if r.pending {
            self.pending = self.pending.saturating_sub(1);
        }
        if let Some(w) = &r.workflow
            && let Some(n) = self.workflows.get_mut(w)
        {
            *n -= 1;
            if *n == 0 {
                self.workflows.remove(w);
            }
        }
    }
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
    /// False while the caches are too stale to count on: only the rate is enforced.
    pub count_quotas: bool,
}

pub struct Ledger {
    epoch: Instant,
    ttl: Duration,
    namespaces: DashMap<Box<str>, NamespaceLedger>,
    reserved: AtomicU64,
    reserved_pending: AtomicU64,
    /// Ready webhook replicas sharing each namespace's rate (1 until told otherwise).
    replicas: AtomicU32,
    /// Clients refused for the cluster cap, until their retry is due. Locked after a
    /// namespace entry, never before one.
    cluster_line: Mutex<WaitingLine>,
}

impl Ledger {
    pub fn new(ttl: Duration, epoch: Instant) -> Self {
        Ledger {
            epoch,
            ttl,
            namespaces: DashMap::new(),
            reserved: AtomicU64::new(0),
            reserved_pending: AtomicU64::new(0),
            replicas: AtomicU32::new(1),
            cluster_line: Mutex::new(WaitingLine::default()),
        }
    }

    /// How many ready replicas share the namespace rates (at least 1).
    pub fn set_replicas(&self, n: u32) {
        self.replicas.store(n.max(1), Ordering::Relaxed);
    }

    pub fn replicas(&self) -> u32 {
        self.replicas.load(Ordering::Relaxed)
    }

    fn nanos(&self, now: Instant) -> Nanos {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn seconds(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs()
    }

    /// Applies `f` to the cluster cap's waiting line. A poisoned lock still holds a usable
    /// count (the line's updates cannot be left half done), so it is used as is.
    fn cluster_line<T>(&self, f: impl FnOnce(&mut WaitingLine) -> T) -> T {
        let mut line = self
            .cluster_line
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut line)
    }

    /// Puts a client refused for a count quota on the line it waits in.
    fn join_line(&self, ns: &mut NamespaceLedger, refusal: &Refusal, secs: u64) {
        match refusal {
            Refusal::Rate { .. } => {}
            Refusal::ClusterPending { expected, .. } => {
                self.cluster_line(|line| line.join(secs, *expected));
            }
            Refusal::MaxPods { expected, .. }
            | Refusal::MaxPending { expected, .. }
            | Refusal::WorkflowShare { expected, .. } => {
                ns.line.get_or_insert_default().join(secs, *expected);
            }
        }
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
                ns.forget(&r);
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
        let reserved_pending = ns.pending;
        let workflow_reserved = ask.workflow.is_some_and(|w| ns.workflows.contains_key(w));
        // With counts off there is no cluster cap either: it is a count of pending pods.
        let cluster_cap = limits
            .count_quotas
            .then(|| quota::cluster_cap(&limits.cluster, view.schedulable_nodes()))
            .flatten();
        let cluster_drain_rate = view.cluster_drain_rate(now);
        let cluster_pending =
            view.cluster_pending() + self.reserved_pending.load(Ordering::Acquire);
        let secs = self.seconds(now);
        // Only a refusal reads the cluster's line: admissions below the cap skip the lock.
        let cluster_waiting = match cluster_cap {
            Some(cap) if cluster_pending >= cap.limit => {
                u64::from(self.cluster_line(|line| line.waiting(secs)))
            }
            _ => 0,
        };
        let snap = Snapshot {
            live: counts.live.saturating_add(reserved),
            pending: counts.pending.saturating_add(reserved_pending),
            workflow_started: counts.workflow_started || workflow_reserved,
            pending_drain_rate: counts.pending_drain_rate,
            live_drain_rate: counts.live_drain_rate,
            cluster_pending,
            cluster_drain_rate,
            cluster_cap,
            waiting: ns.waiting(secs),
            cluster_waiting,
        };

        let counted = if limits.count_quotas {
            quota::check_counts(policy, &snap, ask, limits.workflow_reserved_percent)
        } else {
            Ok(())
        };
        let checked = counted.and_then(|()| match policy.rate {
            None => Ok(None),
            // The refusal names the namespace's whole limit: that is what the user set.
            Some(r) => {
                let n = self.replicas();
                let burst = crate::policy::shared_burst(policy.burst, n);
                rate::check(ns.tat, self.nanos(now), r.shared(n), burst)
            }
            .map(Some)
            .map_err(|wait| Refusal::Rate {
                rate: r,
                burst: policy.burst,
                wait,
            }),
        });

        let new_tat = match (checked, commit) {
            (Ok(_), Commit::DryRun) => return Ok(()),
            (Err(refusal), Commit::DryRun) => return Err(refusal),
            (Err(refusal), Commit::Enforce) => {
                self.join_line(&mut ns, &refusal, secs);
                return Err(refusal);
            }
            (Err(refusal), Commit::Warn) => {
                // The pod will exist: count it, but take nothing from the rate.
                self.reserve_regardless(&mut ns, name, &ask, now);
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
                        let waiting = u64::from(self.cluster_line(|line| line.waiting(secs)));
                        let refusal =
                            quota::cluster_refusal(pending, cap, cluster_drain_rate, waiting);
                        match commit {
                            Commit::Warn => self.reserve_regardless(&mut ns, name, &ask, now),
                            Commit::Enforce => self.join_line(&mut ns, &refusal, secs),
                            Commit::DryRun => {}
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

    /// Records a pod that will be created although it was refused (mode warn): it counts
    /// against every cap, the cluster's included, without the cluster cap's check.
    fn reserve_regardless(
        &self,
        ns: &mut NamespaceLedger,
        name: Option<&str>,
        ask: &Ask<'_>,
        now: Instant,
    ) {
        if !ask.pending_exempt {
            self.reserved_pending.fetch_add(1, Ordering::AcqRel);
        }
        self.reserve(ns, name, ask, now);
    }

    /// Records an admitted pod. The caller has already taken its cluster pending slot.
    fn reserve(&self, ns: &mut NamespaceLedger, name: Option<&str>, ask: &Ask<'_>, now: Instant) {
        // Share the workflow string with the namespace's other reservations of it.
        let workflow = ask.workflow.map(|w| {
            ns.workflows
                .get_key_value(w)
                .map_or_else(|| Arc::from(w), |(k, _)| k.clone())
        });
        ns.push(Reservation {
            expires: now + self.ttl,
            name: name.filter(|n| !n.is_empty()).map(Box::from),
            workflow,
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
            ns.forget(&r);
            self.release(&r);
        }
    }

    /// Drops expired reservations and idle namespaces; run periodically so namespaces that
    /// stop creating pods do not hold reservations or memory.
    pub fn sweep(&self, now: Instant) {
        let now_nanos = self.nanos(now);
        let secs = self.seconds(now);
        self.namespaces.retain(|_, ns| {
            self.expire(ns, now);
            if ns.waiting(secs) == 0 {
                ns.line = None;
            }
            !ns.reservations.is_empty() || ns.tat > now_nanos || ns.line.is_some()
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

    /// A cache, a ledger and the cluster limits, at a fixed start time.
    struct Fixture {
        t: Instant,
        cache: Cache,
        ledger: Ledger,
        limits: Limits,
    }

    impl Fixture {
        fn new(cluster_max_pending: Option<u32>) -> Self {
            let t = Instant::now();
            Fixture {
                t,
                cache: Cache::new(Policy::default(), vec![]),
                ledger: Ledger::new(TTL, t),
                limits: Limits {
                    cluster: ClusterLimits {
                        max_pending_pods: cluster_max_pending,
                        pending_per_healthy_node: None,
                    },
                    workflow_reserved_percent: 20,
                    count_quotas: true,
                },
            }
        }

        fn admit_as(
            &self,
            name: Option<&str>,
            p: &Policy,
            ask: Ask<'_>,
            commit: Commit,
            at: Instant,
        ) -> Result<(), Refusal> {
            self.ledger
                .admit(&self.cache, "ci", name, p, ask, &self.limits, commit, at)
        }

        /// The wait a refusal by [`Draining`] names, for an unnamed pod in `namespace`.
        fn wait_in_draining(
            &self,
            namespace: &str,
            p: &Policy,
            commit: Commit,
            at: Instant,
        ) -> Duration {
            let ask = Ask::default();
            self.ledger
                .admit(&Draining, namespace, None, p, ask, &self.limits, commit, at)
                .unwrap_err()
                .expected_wait()
        }

        /// An unnamed pod outside workflows in namespace "ci", at the start time.
        fn admit(&self, p: &Policy, commit: Commit) -> Result<(), Refusal> {
            self.admit_as(None, p, Ask::default(), commit, self.t)
        }

        /// An unnamed pod outside workflows in `namespace`, enforced, at the start time.
        fn enforce_in(&self, namespace: &str, p: &Policy) -> Result<(), Refusal> {
            let (ask, commit) = (Ask::default(), Commit::Enforce);
            self.ledger.admit(
                &self.cache,
                namespace,
                None,
                p,
                ask,
                &self.limits,
                commit,
                self.t,
            )
        }

        fn workflow(&self, p: &Policy, workflow: &'static str) -> Result<(), Refusal> {
            let ask = Ask {
                pending_exempt: false,
                workflow: Some(workflow),
            };
            self.admit_as(None, p, ask, Commit::Enforce, self.t)
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

    fn rated(rate: &str, burst: u32) -> Policy {
        Policy {
            rate: parse_rate(rate).unwrap(),
            burst,
            ..counts_only(None, None)
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
    fn without_count_quotas_only_the_rate_refuses() {
        let mut f = Fixture::new(Some(1));
        f.limits.count_quotas = false;
        let p = Policy {
            max_pods: Some(1),
            max_pending_pods: Some(1),
            ..rated("3/m", 3)
        };
        for _ in 0..3 {
            assert_eq!(f.admit(&p, Commit::Enforce), Ok(()));
        }
        assert_eq!(f.admit(&p, Commit::Enforce).unwrap_err().reason(), "rate");
        // Admissions while counts were off still count once they are back on.
        f.limits.count_quotas = true;
        let later = f.t + Duration::from_secs(1);
        let refused = f.admit_as(None, &p, Ask::default(), Commit::Enforce, later);
        assert_eq!(refused.unwrap_err().reason(), "max_pods");
    }

    #[test]
    fn reservations_count_until_the_watch_shows_the_pod() {
        let f = Fixture::new(None);
        let p = counts_only(Some(2), None);
        let admit = |name: &str| f.admit_as(Some(name), &p, Ask::default(), Commit::Enforce, f.t);
        assert!(admit("a").is_ok());
        assert!(admit("b").is_ok());
        assert_eq!(admit("c").unwrap_err().reason(), "max_pods");
        assert_eq!(f.ledger.reserved(), 2);

        // The watch shows "a": the cache counts it, the reservation goes; still full.
        f.cache.apply_pod("ci", "a", pending(None), f.t);
        f.ledger.observe_created("ci", "a");
        assert_eq!(f.ledger.reserved(), 1);
        assert!(admit("c").is_err());
        // "a" is deleted: a slot opens.
        f.cache.delete_pod("ci", "a", f.t);
        assert!(admit("c").is_ok());
    }

    #[test]
    fn reservations_expire_after_ttl() {
        let f = Fixture::new(None);
        let p = counts_only(None, Some(1));
        let admit = |at: Instant| f.admit_as(None, &p, Ask::default(), Commit::Enforce, at);
        assert!(admit(f.t).is_ok());
        let r = admit(f.t + TTL - Duration::from_millis(1));
        assert_eq!(r.unwrap_err().reason(), "max_pending");
        // The pod never showed up (another webhook refused it): the slot comes back.
        assert!(admit(f.t + TTL).is_ok());
        f.ledger.sweep(f.t + 3 * TTL);
        assert_eq!(f.ledger.reserved(), 0);
    }

    #[test]
    fn generate_name_pods_match_the_oldest_nameless_reservation() {
        let f = Fixture::new(None);
        let p = counts_only(None, None);
        f.admit(&p, Commit::Enforce).unwrap();
        f.admit_as(Some("named"), &p, Ask::default(), Commit::Enforce, f.t)
            .unwrap();
        f.ledger.observe_created("ci", "job-x7k2p");
        f.ledger.observe_created("ci", "unrelated-pod");
        assert_eq!(f.ledger.reserved(), 1, "the named reservation stays");
        f.ledger.observe_created("ci", "named");
        assert_eq!(f.ledger.reserved(), 0);
    }

    #[test]
    fn dry_run_consumes_nothing() {
        let f = Fixture::new(None);
        let p = Policy {
            max_pods: Some(1),
            ..rated("1/m", 1)
        };
        for _ in 0..5 {
            assert!(f.admit(&p, Commit::DryRun).is_ok());
        }
        assert_eq!(f.ledger.reserved(), 0);
        assert!(f.admit(&p, Commit::Enforce).is_ok());
        let r = f.admit(&p, Commit::DryRun);
        assert_eq!(
            r.unwrap_err().reason(),
            "max_pods",
            "dry-run still tells the verdict"
        );
    }

    #[test]
    fn warn_mode_counts_the_pod_but_not_the_rate() {
        let f = Fixture::new(None);
        let p = rated("1/s", 1);
        assert!(f.admit(&p, Commit::Warn).is_ok());
        assert_eq!(f.admit(&p, Commit::Warn).unwrap_err().reason(), "rate");
        assert_eq!(f.ledger.reserved(), 2, "the warned pod is still counted");
        // The rate state did not run ahead: one second later one creation fits again.
        let later = f.t + Duration::from_secs(1);
        assert!(
            f.admit_as(None, &p, Ask::default(), Commit::Enforce, later)
                .is_ok()
        );
    }

    #[test]
    fn workflow_with_a_reservation_counts_as_started() {
        let f = Fixture::new(None);
        let p = counts_only(None, Some(5)); // 1 slot kept for started workflows
        for _ in 0..4 {
            f.workflow(&p, "a").unwrap();
        }
        assert_eq!(f.workflow(&p, "b").unwrap_err().reason(), "workflow_share");
        assert!(f.workflow(&p, "a").is_ok());
        // A workflow whose pods the watch shows is started too.
        f.cache.apply_pod("ci", "c-1", pending(Some("c")), f.t);
        let p10 = counts_only(None, Some(10));
        for _ in 0..3 {
            f.workflow(&p10, "a").unwrap();
        }
        // 9 pending of 10, 2 kept: "c" may, a new "d" may not.
        assert!(f.workflow(&p10, "c").is_ok());
        assert!(f.workflow(&p10, "d").is_err());
    }

    #[test]
    fn concurrent_admissions_never_overshoot_namespace_or_cluster_caps() {
        let f = Arc::new(Fixture::new(Some(120)));
        let p = counts_only(Some(50), None);
        let threads = 8;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (f, barrier, p) = (f.clone(), barrier.clone(), p.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut ok = [0u32; 4];
                    for n in 0..100 {
                        // Four namespaces hammered from every thread at once.
                        let k = (i + n) % 4;
                        let ns = ["a", "b", "c", "d"][k];
                        if f.enforce_in(ns, &p).is_ok() {
                            ok[k] += 1;
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
        assert_eq!(f.ledger.reserved(), 120);
    }

    /// A namespace at its pending cap whose pods start at 10 per second.
    struct Draining;

    impl ClusterView for Draining {
        fn namespace(&self, _: &str) -> Option<Arc<crate::cache::NamespaceInfo>> {
            None
        }
        fn pod_counts(&self, _: &str, _: Option<&str>, _: Instant) -> crate::cache::PodCounts {
            crate::cache::PodCounts {
                pending: 10,
                live: 10,
                pending_drain_rate: 10.0,
                ..Default::default()
            }
        }
        fn cluster_pending(&self) -> u64 {
            10
        }
        fn cluster_drain_rate(&self, _: Instant) -> f64 {
            10.0
        }
        fn schedulable_nodes(&self) -> Option<u32> {
            None
        }
    }

    #[test]
    fn refused_clients_line_up_and_leave_the_line_when_due() {
        let f = Fixture::new(None);
        let p = counts_only(None, Some(10));
        let refuse = |commit, at| f.wait_in_draining("ci", &p, commit, at);
        // A dry run does not retry: it does not join the line.
        assert_eq!(refuse(Commit::DryRun, f.t), Duration::from_millis(100));
        assert_eq!(refuse(Commit::DryRun, f.t), Duration::from_millis(100));
        let waits: Vec<_> = (0..20).map(|_| refuse(Commit::Enforce, f.t)).collect();
        assert_eq!(waits[0], Duration::from_millis(100));
        assert_eq!(
            waits[9],
            Duration::from_secs(1),
            "10th in line at 10 pods/s"
        );
        assert_eq!(waits[19], Duration::from_secs(2));
        // All 20 were told to come back after 1 s (0.1 s rounds up) or 2 s. The periodic sweep
        // keeps a namespace whose line is not empty, although it holds no reservation.
        f.ledger.sweep(f.t + Duration::from_secs(1));
        let later = |secs| refuse(Commit::DryRun, f.t + Duration::from_secs(secs));
        assert_eq!(later(1), Duration::from_millis(1100));
        assert_eq!(later(2), Duration::from_millis(100));
        // Another namespace has its own line.
        let other = f.wait_in_draining("b", &p, Commit::Enforce, f.t);
        assert_eq!(other, Duration::from_millis(100));
    }

    #[test]
    fn refusals_for_the_cluster_cap_line_up_across_namespaces() {
        let f = Fixture::new(Some(10));
        let p = counts_only(None, None);
        let waits = ["a", "b", "c"].map(|ns| f.wait_in_draining(ns, &p, Commit::Enforce, f.t));
        assert_eq!(
            waits,
            [100, 200, 300].map(Duration::from_millis),
            "one line for the cluster cap"
        );
    }

    #[test]
    fn rate_limits_per_namespace() {
        let f = Fixture::new(None);
        let p = rated("5/s", 3);
        for _ in 0..3 {
            f.admit(&p, Commit::Enforce).unwrap();
        }
        let r = f.admit(&p, Commit::Enforce).unwrap_err();
        assert_eq!(r.expected_wait(), Duration::from_millis(200));
        assert!(f.enforce_in("b", &p).is_ok());
    }

    #[test]
    fn replicas_share_the_rate_and_the_refusal_names_the_whole_limit() {
        let f = Fixture::new(None);
        f.ledger.set_replicas(2);
        // 10/s burst 5 over two replicas: this one admits 3 at once (5/2 rounded up), then
        // one every 200 ms.
        let p = rated("10/s", 5);
        for _ in 0..3 {
            f.admit(&p, Commit::Enforce).unwrap();
        }
        let r = f.admit(&p, Commit::Enforce).unwrap_err();
        assert_eq!(r.expected_wait(), Duration::from_millis(200));
        let message = r.message("a", 1);
        assert!(
            message.contains("10/s (burst 5)"),
            "the namespace's limit, not this replica's part: {message}"
        );
        let admit = |at| f.admit_as(None, &p, Ask::default(), Commit::Enforce, at);
        assert!(admit(f.t + Duration::from_millis(200)).is_ok());
        assert!(admit(f.t + Duration::from_millis(200)).is_err());

        // Zero ready replicas seen (e.g. none ready yet) counts as this one alone.
        f.ledger.set_replicas(0);
        assert_eq!(f.ledger.replicas(), 1);
        assert!(f.enforce_in("b", &p).is_ok());
    }
}
