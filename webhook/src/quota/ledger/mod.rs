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

use super::{
    decide::{self, Ask, Limits, RateState, Snapshot},
    rate::Nanos,
    refusal::Refusal,
    view::ClusterView,
    waiting::WaitingLine,
};
use crate::policy::Policy;

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

/// One pod creation to decide.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub namespace: &'a str,
    /// Known when the client named the pod; pods created with generateName have none yet.
    pub name: Option<&'a str>,
    pub policy: &'a Policy,
    pub ask: Ask<'a>,
    pub commit: Commit,
    /// Whether a client refused for a count quota joins the waiting line: one told when to
    /// come back does; one whose own queue retries does not.
    pub joins_line: bool,
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

    /// Puts a client refused for a count quota on the line it waits in, if it is told when
    /// to come back.
    fn join_line(&self, ns: &mut NamespaceLedger, req: &Request<'_>, refusal: &Refusal, secs: u64) {
        if !req.joins_line {
            return;
        }
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

    /// Decides one pod creation and, unless its commit is [`Commit::DryRun`], records it.
    pub fn admit(
        &self,
        view: &dyn ClusterView,
        req: &Request<'_>,
        limits: &Limits,
        now: Instant,
    ) -> Result<(), Refusal> {
        let mut ns = self.namespaces.entry(req.namespace.into()).or_default();
        self.expire(&mut ns, now);
        let snap = self.snapshot(view, &mut ns, req, limits, now);
        let state = RateState {
            tat: ns.tat,
            now: self.nanos(now),
            replicas: self.replicas(),
        };
        let decided = decide::decide(req.policy, limits, &snap, req.ask, state);
        let secs = self.seconds(now);
        let new_tat = match (decided, req.commit) {
            (Ok(_), Commit::DryRun) => return Ok(()),
            (Err(refusal), Commit::DryRun) => return Err(refusal),
            (Err(refusal), Commit::Enforce) => {
                self.join_line(&mut ns, req, &refusal, secs);
                return Err(refusal);
            }
            (Err(refusal), Commit::Warn) => {
                // The pod will exist: count it, but take nothing from the rate.
                self.reserve_regardless(&mut ns, req, now);
                return Err(refusal);
            }
            (Ok(new_tat), Commit::Enforce | Commit::Warn) => new_tat,
        };
        if !req.ask.pending_exempt
            && let Err(refusal) = self.take_cluster_slot(view, &snap, now)
        {
            match req.commit {
                Commit::Warn => self.reserve_regardless(&mut ns, req, now),
                Commit::Enforce => self.join_line(&mut ns, req, &refusal, secs),
                Commit::DryRun => {}
            }
            return Err(refusal);
        }
        if let Some(tat) = new_tat {
            ns.tat = tat;
        }
        self.reserve(&mut ns, req, now);
        Ok(())
    }

    /// The counts a decision reads: the cache's, with this replica's reservations added.
    fn snapshot(
        &self,
        view: &dyn ClusterView,
        ns: &mut NamespaceLedger,
        req: &Request<'_>,
        limits: &Limits,
        now: Instant,
    ) -> Snapshot {
        let counts = view.pod_counts(req.namespace, req.ask.workflow, now);
        let reserved = u32::try_from(ns.reservations.len()).unwrap_or(u32::MAX);
        let workflow_reserved = req
            .ask
            .workflow
            .is_some_and(|w| ns.workflows.contains_key(w));
        // With counts off there is no cluster cap either: it is a count of pending pods.
        let cluster_cap = limits
            .count_quotas
            .then(|| decide::cluster_cap(&limits.cluster, view.schedulable_nodes()))
            .flatten();
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
        Snapshot {
            live: counts.live.saturating_add(reserved),
            pending: counts.pending.saturating_add(ns.pending),
            workflow_started: counts.workflow_started || workflow_reserved,
            pending_drain_rate: counts.pending_drain_rate,
            live_drain_rate: counts.live_drain_rate,
            cluster_pending,
            cluster_drain_rate: view.cluster_drain_rate(now),
            cluster_cap,
            waiting: ns.waiting(secs),
            cluster_waiting,
        }
    }

    /// Takes one slot of the cluster pending cap. The cap spans namespaces, which do not share
    /// a lock: a compare-and-swap keeps two namespaces from both taking the last one.
    fn take_cluster_slot(
        &self,
        view: &dyn ClusterView,
        snap: &Snapshot,
        now: Instant,
    ) -> Result<(), Refusal> {
        let mut current = self.reserved_pending.load(Ordering::Acquire);
        loop {
            if let Some(cap) = snap.cluster_cap {
                let pending = view.cluster_pending() + current;
                if pending >= cap.limit {
                    let secs = self.seconds(now);
                    let waiting = u64::from(self.cluster_line(|line| line.waiting(secs)));
                    return Err(decide::cluster_refusal(
                        pending,
                        cap,
                        snap.cluster_drain_rate,
                        waiting,
                    ));
                }
            }
            match self.reserved_pending.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => current = actual,
            }
        }
    }

    /// Records a pod that will be created although it was refused (mode warn): it counts
    /// against every cap, the cluster's included, without the cluster cap's check.
    fn reserve_regardless(&self, ns: &mut NamespaceLedger, req: &Request<'_>, now: Instant) {
        if !req.ask.pending_exempt {
            self.reserved_pending.fetch_add(1, Ordering::AcqRel);
        }
        self.reserve(ns, req, now);
    }

    /// Records an admitted pod. The caller has already taken its cluster pending slot.
    fn reserve(&self, ns: &mut NamespaceLedger, req: &Request<'_>, now: Instant) {
        // Share the workflow string with the namespace's other reservations of it.
        let workflow = req.ask.workflow.map(|w| {
            ns.workflows
                .get_key_value(w)
                .map_or_else(|| Arc::from(w), |(k, _)| k.clone())
        });
        ns.push(Reservation {
            expires: now + self.ttl,
            name: req.name.filter(|n| !n.is_empty()).map(Box::from),
            workflow,
            pending: !req.ask.pending_exempt,
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
mod tests;
