//! What this replica has admitted: per-namespace rate state and reservations for pods the
//! watch has not shown yet. Check and commit happen under one namespace lock, so concurrent
//! admissions cannot all see the same free slot; the cluster-wide pending cap is taken with a
//! compare-and-swap for the same reason across namespaces.
//!
//! Everything kept is bounded, since reviews may come from anyone who reaches the port:
//! reservations per namespace ([`MAX_NAMESPACE_RESERVATIONS`]) and in all
//! ([`MAX_RESERVATIONS`]), and namespaces the cluster does not show, which live apart in the
//! small [`strangers`] table so made-up names can neither grow memory nor fill the cluster cap.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, OnceLock, RwLock,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use dashmap::DashMap;

use super::{
    decide::{self, Ask, Limits, RateState, Snapshot},
    peers::{self, Hits, MAX_REPORT_NAMESPACES, Part, PeerBook, Report, ReportError, Reserved},
    rate::Nanos,
    refusal::Refusal,
    view::ClusterView,
    waiting::WaitingLine,
};
use crate::policy::{Policy, Rate, pod::MAX_POD_NAME_LEN};
use strangers::Strangers;

mod strangers;

/// Reservations one namespace may hold. At the bound a new one replaces the namespace's
/// oldest: counts then lag the truth by the dropped pod until the watch shows it, which costs
/// only that namespace (a real one reaching it has thousands of creations the watch has not
/// shown, or rejected by a later admission plugin, within one TTL).
pub const MAX_NAMESPACE_RESERVATIONS: usize = 4096;
/// Reservations in all known namespaces. At the bound a new reservation replaces its own
/// namespace's oldest; a namespace with none still gets its first, so the total exceeds the
/// bound by at most one per namespace the cluster has.
pub const MAX_RESERVATIONS: u64 = 65_536;

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
    /// Rate hits not yet reported to the peers.
    unsent: u32,
    /// Reservations (and those of pending pods) made since the last report every peer in
    /// the group confirmed: what the peers may not know of yet.
    unconfirmed: u32,
    unconfirmed_pending: u32,
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

    /// The reservation of the pod the watch just showed: by name, or for `generateName` pods
    /// the oldest without one.
    fn take_reservation(&mut self, name: &str) -> Option<Reservation> {
        let pos = self
            .reservations
            .iter()
            .position(|r| r.name.as_deref() == Some(name))
            .or_else(|| self.reservations.iter().position(|r| r.name.is_none()));
        let r = pos.and_then(|p| self.reservations.remove(p))?;
        self.forget(&r);
        Some(r)
    }

    /// Whether anything here still matters: a reservation, a rate not yet refilled, a line.
    fn in_use(&self, now: Nanos) -> bool {
        !self.reservations.is_empty() || self.tat > now || self.line.is_some() || self.unsent > 0
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

/// What one report told the peers of this replica's unconfirmed reservations, per namespace;
/// handed back to [`Ledger::confirm`] once every peer in the group has it.
#[derive(Debug, Default)]
pub struct Sent(Vec<(Box<str>, u32, u32)>);

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
    /// The namespace watch has listed every namespace and this one is not among them: brand
    /// new, or made up by a forged review. Its state goes to the [`strangers`] table.
    pub unknown_namespace: bool,
}

/// Where a namespace's state is kept, and so how long and how much of it.
#[derive(Debug, Clone, Copy)]
struct Keep {
    ttl: Duration,
    max_reservations: usize,
    /// The bound on reservations in the whole table, where it is checked per reservation.
    max_total: Option<u64>,
}

pub struct Ledger {
    epoch: Instant,
    ttl: Duration,
    namespaces: DashMap<Box<str>, NamespaceLedger>,
    reserved: AtomicU64,
    reserved_pending: AtomicU64,
    /// Ready webhook replicas (1 until told otherwise).
    replicas: AtomicU32,
    /// Of those, the ones this replica shares consumption with, itself included.
    group: AtomicU32,
    /// This replica's id in its reports, random per process.
    id: u64,
    /// The peers' reports; `has_peers` lets a lone replica's admissions skip its lock.
    peers: RwLock<PeerBook>,
    has_peers: AtomicBool,
    /// Whether reports go anywhere: only then are hits kept for them.
    reporting: AtomicBool,
    /// Called when a namespace comes near a limit: its consumption should go out at once.
    nudge: OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// Clients refused for the cluster cap, until their retry is due. Locked after a
    /// namespace entry, never before one.
    cluster_line: Mutex<WaitingLine>,
    /// Namespaces the cluster does not show (see [`Request::unknown_namespace`]).
    strangers: Mutex<Strangers>,
}

impl Ledger {
    pub fn new(ttl: Duration, epoch: Instant) -> Self {
        let id = fastrand::u64(1..);
        Ledger {
            epoch,
            ttl,
            namespaces: DashMap::new(),
            reserved: AtomicU64::new(0),
            reserved_pending: AtomicU64::new(0),
            replicas: AtomicU32::new(1),
            group: AtomicU32::new(1),
            id,
            peers: RwLock::new(PeerBook::new(id)),
            has_peers: AtomicBool::new(false),
            reporting: AtomicBool::new(false),
            nudge: OnceLock::new(),
            cluster_line: Mutex::new(WaitingLine::default()),
            strangers: Mutex::new(Strangers::default()),
        }
    }

    fn strangers(&self) -> std::sync::MutexGuard<'_, Strangers> {
        // A poisoned table is still consistent: every update completes before it can panic.
        self.strangers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn known(&self) -> Keep {
        Keep {
            ttl: self.ttl,
            max_reservations: MAX_NAMESPACE_RESERVATIONS,
            max_total: Some(MAX_RESERVATIONS),
        }
    }

    /// How many ready replicas share the namespace rates (at least 1).
    pub fn set_replicas(&self, n: u32) {
        self.replicas.store(n.max(1), Ordering::Relaxed);
    }

    pub fn replicas(&self) -> u32 {
        self.replicas.load(Ordering::Relaxed)
    }

    /// How many replicas, this one included, currently share consumption with each other.
    pub fn set_group(&self, n: u32) {
        self.group.store(n.max(1), Ordering::Relaxed);
    }

    /// The part of each namespace's rate this replica may use now.
    pub fn part(&self) -> Part {
        Part::new(
            self.group.load(Ordering::Relaxed),
            self.replicas.load(Ordering::Relaxed),
        )
    }

    /// This replica's id in the reports it sends.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether this replica has peers to report to (set by the peer exchange). Turning it off
    /// leaves hits counted before in the namespaces: the next [`Ledger::report`] takes them.
    pub fn set_reporting(&self, on: bool) {
        self.reporting.store(on, Ordering::Relaxed);
    }

    /// What to call when a namespace comes near a limit (set once, by the peer exchange).
    pub fn on_near_limit(&self, nudge: Box<dyn Fn() + Send + Sync>) {
        let _ = self.nudge.set(nudge);
    }

    fn book(&self) -> std::sync::RwLockReadGuard<'_, PeerBook> {
        // A poisoned book is still consistent: every update completes before it can panic.
        self.peers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn book_mut(&self) -> std::sync::RwLockWriteGuard<'_, PeerBook> {
        self.peers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The peers' reservations in `ns` (all, pending) and of pending pods everywhere.
    fn peer_reserved(&self, ns: &str, now: Instant) -> ((u32, u32), u64) {
        if !self.has_peers.load(Ordering::Acquire) {
            return ((0, 0), 0);
        }
        let book = self.book();
        (book.reserved(ns, now), book.reserved_pending(now))
    }

    /// Whether `peer` reported within the peer timeout.
    pub fn heard_from(&self, peer: u64, now: Instant) -> bool {
        self.book().heard_from(peer, now)
    }

    /// What this replica reports to its peers now: the rate hits since its last report
    /// (taken, so each goes out once) and its reservations. Namespaces the cluster does not
    /// show are never reported. At most [`MAX_REPORT_NAMESPACES`] of each: hits left over go
    /// in the next report, and the namespaces holding the most reservations go first.
    pub fn report(&self, seq: u64) -> (Report, Sent) {
        let mut hits = Vec::new();
        let mut reserved = Vec::new();
        let mut sent = Vec::new();
        for mut entry in self.namespaces.iter_mut() {
            if entry.unconfirmed > 0 || entry.unconfirmed_pending > 0 {
                sent.push((
                    entry.key().clone(),
                    entry.unconfirmed,
                    entry.unconfirmed_pending,
                ));
            }
            if entry.unsent > 0 && hits.len() < MAX_REPORT_NAMESPACES {
                let n = std::mem::take(&mut entry.value_mut().unsent);
                hits.push(Hits {
                    ns: entry.key().to_string(),
                    n,
                });
            }
            let ns = entry.value();
            if !ns.reservations.is_empty() {
                reserved.push(Reserved {
                    ns: entry.key().to_string(),
                    live: u32::try_from(ns.reservations.len()).unwrap_or(u32::MAX),
                    pending: ns.pending,
                });
            }
        }
        if reserved.len() > MAX_REPORT_NAMESPACES {
            reserved.sort_unstable_by_key(|r| std::cmp::Reverse(r.live));
            reserved.truncate(MAX_REPORT_NAMESPACES);
        }
        let own_pending = self.reserved_pending.load(Ordering::Acquire);
        let report = Report {
            from: self.id(),
            seq,
            hits,
            reserved,
            reserved_pending: own_pending,
        };
        (report, Sent(sent))
    }

    /// Every peer in the group has the report `sent` came with: those reservations are known
    /// to all of them now.
    pub fn confirm(&self, sent: &Sent) {
        for (ns, live, pending) in &sent.0 {
            if let Some(mut ns) = self.namespaces.get_mut(ns) {
                ns.unconfirmed = ns.unconfirmed.saturating_sub(*live);
                ns.unconfirmed_pending = ns.unconfirmed_pending.saturating_sub(*pending);
            }
        }
    }

    /// Takes a peer's report in. Its reservations count in this replica's decisions while the
    /// peer keeps reporting; its hits are folded into the namespaces' rate state when the
    /// peer is `in_group` (one that shares the rate with this replica; a peer outside keeps
    /// its own 1/N part). `rate_of` gives the rate of a namespace the cluster shows (`None`
    /// for any other: its hits are dropped). A report can only add consumption: at most what
    /// would empty every replica's part of the burst and take [`peers::PEER_TIMEOUT`] of
    /// refill, however many hits it claims.
    pub fn absorb(
        &self,
        report: &Report,
        in_group: bool,
        rate_of: impl Fn(&str) -> Option<(Rate, u32)>,
        now: Instant,
    ) -> Result<(), ReportError> {
        self.book_mut().accept(report, now)?;
        self.has_peers.store(true, Ordering::Release);
        if !in_group {
            return Ok(());
        }
        let part = self.part();
        let now_nanos = self.nanos(now);
        for hits in &report.hits {
            let Some((rate, burst)) = rate_of(&hits.ns) else {
                continue;
            };
            let interval = u64::try_from(part.rate(rate).interval.as_nanos()).unwrap_or(u64::MAX);
            let timeout = u64::try_from(peers::PEER_TIMEOUT.as_nanos()).unwrap_or(u64::MAX);
            let most = now_nanos
                .saturating_add(
                    interval
                        .saturating_mul(u64::from(part.burst(burst)))
                        .saturating_mul(u64::from(part.replicas())),
                )
                .saturating_add(timeout);
            let mut ns = self.namespaces.entry(hits.ns.as_str().into()).or_default();
            let folded = ns
                .tat
                .max(now_nanos)
                .saturating_add(interval.saturating_mul(u64::from(hits.n)));
            ns.tat = folded.min(most.max(ns.tat));
        }
        Ok(())
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
        if req.unknown_namespace {
            let mut strangers = self.strangers();
            let (ns, dropped) = strangers.entry(req.namespace, now);
            for r in &dropped {
                self.release(r);
            }
            let keep = Strangers::keep(self.ttl);
            return self.admit_in(view, ns, keep, req, limits, now);
        }
        let mut ns = self.namespaces.entry(req.namespace.into()).or_default();
        self.admit_in(view, &mut ns, self.known(), req, limits, now)
    }

    /// [`Ledger::admit`] in the namespace's state `ns`, kept as `keep` says.
    fn admit_in(
        &self,
        view: &dyn ClusterView,
        ns: &mut NamespaceLedger,
        keep: Keep,
        req: &Request<'_>,
        limits: &Limits,
        now: Instant,
    ) -> Result<(), Refusal> {
        self.expire(ns, now);
        // Read once: the snapshot and the cluster slot both count the peers' reservations.
        let peers = self.peer_reserved(req.namespace, now);
        let snap = self.snapshot(view, ns, req, limits, peers, now);
        let state = RateState {
            tat: ns.tat,
            now: self.nanos(now),
            part: self.part(),
        };
        let decided = decide::decide(req.policy, limits, &snap, req.ask, state);
        let secs = self.seconds(now);
        let new_tat = match (decided, req.commit) {
            (Ok(_), Commit::DryRun) => return Ok(()),
            (Err(refusal), Commit::DryRun) => return Err(refusal),
            (Err(refusal), Commit::Enforce) => {
                self.join_line(ns, req, &refusal, secs);
                return Err(refusal);
            }
            (Err(refusal), Commit::Warn) => {
                // The pod will exist: count it, but take nothing from the rate.
                self.reserve_regardless(ns, keep, req, now);
                return Err(refusal);
            }
            (Ok(new_tat), Commit::Enforce | Commit::Warn) => new_tat,
        };
        if !req.ask.pending_exempt
            && let Err(refusal) = self.take_cluster_slot(view, &snap, peers.1, now)
        {
            match req.commit {
                Commit::Warn => self.reserve_regardless(ns, keep, req, now),
                Commit::Enforce => self.join_line(ns, req, &refusal, secs),
                Commit::DryRun => {}
            }
            return Err(refusal);
        }
        if let Some(tat) = new_tat {
            ns.tat = tat;
        }
        self.reserve(ns, keep, req, now);
        // Namespaces the cluster does not show stay this replica's own.
        if self.reporting.load(Ordering::Relaxed) && !req.unknown_namespace {
            if new_tat.is_some() {
                ns.unsent = ns.unsent.saturating_add(1);
            }
            if let Some(nudge) = self.nudge.get()
                && peers::near_limit(req.policy, &snap, ns.tat, state.now, state.part)
            {
                nudge();
            }
        }
        Ok(())
    }

    /// The counts a decision reads: the cache's, with this replica's reservations and its
    /// peers' (`peers`, from [`Ledger::peer_reserved`]) added.
    fn snapshot(
        &self,
        view: &dyn ClusterView,
        ns: &mut NamespaceLedger,
        req: &Request<'_>,
        limits: &Limits,
        peers: ((u32, u32), u64),
        now: Instant,
    ) -> Snapshot {
        let counts = view.pod_counts(req.namespace, req.ask.workflow, now);
        let ((peer_live, peer_pending), peer_cluster_pending) = peers;
        let reserved = u32::try_from(ns.reservations.len())
            .unwrap_or(u32::MAX)
            .saturating_add(peer_live);
        let workflow_reserved = req
            .ask
            .workflow
            .is_some_and(|w| ns.workflows.contains_key(w));
        // With counts off there is no cluster cap either: it is a count of pending pods.
        let cluster_cap = limits
            .count_quotas
            .then(|| decide::cluster_cap(&limits.cluster, view.schedulable_nodes()))
            .flatten();
        let cluster_pending = view.cluster_pending()
            + self.reserved_pending.load(Ordering::Acquire)
            + peer_cluster_pending;
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
            pending: counts
                .pending
                .saturating_add(ns.pending)
                .saturating_add(peer_pending),
            workflow_started: counts.workflow_started || workflow_reserved,
            pending_drain_rate: counts.pending_drain_rate,
            live_drain_rate: counts.live_drain_rate,
            cluster_pending,
            cluster_drain_rate: view.cluster_drain_rate(now),
            cluster_cap,
            waiting: ns.waiting(secs),
            cluster_waiting,
            // Reservations the watch showed or that expired are no longer this replica's to
            // project: at most what it still holds.
            unconfirmed: ns
                .unconfirmed
                .min(u32::try_from(ns.reservations.len()).unwrap_or(u32::MAX)),
            unconfirmed_pending: ns.unconfirmed_pending.min(ns.pending),
            sharers: if self.reporting.load(Ordering::Relaxed) {
                self.part().group()
            } else {
                1
            },
        }
    }

    /// Takes one slot of the cluster pending cap. The cap spans namespaces, which do not share
    /// a lock: a compare-and-swap keeps two namespaces from both taking the last one. `peers`:
    /// the peers' reservations of pending pods.
    fn take_cluster_slot(
        &self,
        view: &dyn ClusterView,
        snap: &Snapshot,
        peers: u64,
        now: Instant,
    ) -> Result<(), Refusal> {
        let mut current = self.reserved_pending.load(Ordering::Acquire);
        loop {
            if let Some(cap) = snap.cluster_cap {
                let pending = view.cluster_pending() + current + peers;
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
    fn reserve_regardless(
        &self,
        ns: &mut NamespaceLedger,
        keep: Keep,
        req: &Request<'_>,
        now: Instant,
    ) {
        if !req.ask.pending_exempt {
            self.reserved_pending.fetch_add(1, Ordering::AcqRel);
        }
        self.reserve(ns, keep, req, now);
    }

    /// Records an admitted pod. The caller has already taken its cluster pending slot.
    fn reserve(&self, ns: &mut NamespaceLedger, keep: Keep, req: &Request<'_>, now: Instant) {
        let full = ns.reservations.len() >= keep.max_reservations
            || keep.max_total.is_some_and(|total| self.reserved() >= total);
        if full && let Some(oldest) = ns.reservations.pop_front() {
            ns.forget(&oldest);
            self.release(&oldest);
        }
        // Share the workflow string with the namespace's other reservations of it.
        let workflow = req.ask.workflow.map(|w| {
            ns.workflows
                .get_key_value(w)
                .map_or_else(|| Arc::from(w), |(k, _)| k.clone())
        });
        if self.reporting.load(Ordering::Relaxed) && !req.unknown_namespace {
            ns.unconfirmed = ns.unconfirmed.saturating_add(1);
            if !req.ask.pending_exempt {
                ns.unconfirmed_pending = ns.unconfirmed_pending.saturating_add(1);
            }
        }
        ns.push(Reservation {
            expires: now + keep.ttl,
            // A longer name cannot be a real pod's (the admitter never asks for one).
            name: req
                .name
                .filter(|n| !n.is_empty() && n.len() <= MAX_POD_NAME_LEN)
                .map(Box::from),
            workflow,
            pending: !req.ask.pending_exempt,
        });
        self.reserved.fetch_add(1, Ordering::AcqRel);
    }

    /// The watch showed a pod for the first time: its reservation, if this replica made one,
    /// is now counted by the cache instead. Call after the cache has the pod, so the pod is
    /// briefly counted twice rather than not at all.
    pub fn observe_created(&self, namespace: &str, name: &str) {
        if let Some(mut ns) = self.namespaces.get_mut(namespace) {
            if let Some(r) = ns.take_reservation(name) {
                self.release(&r);
            }
            return;
        }
        // A namespace new to the watch may have been admitted as a stranger.
        let taken = self
            .strangers()
            .get_mut(namespace)
            .and_then(|ns| ns.take_reservation(name));
        if let Some(r) = taken {
            self.release(&r);
        }
    }

    /// Namespaces with state in the table of namespaces the cluster does not show.
    pub fn strangers_held(&self) -> usize {
        self.strangers().len()
    }

    /// Drops expired reservations and idle namespaces; run periodically so namespaces that
    /// stop creating pods do not hold reservations or memory.
    pub fn sweep(&self, now: Instant) {
        if self.has_peers.load(Ordering::Acquire) {
            let mut book = self.book_mut();
            book.age_out(now);
            self.has_peers.store(!book.is_empty(), Ordering::Release);
        }
        let now_nanos = self.nanos(now);
        let secs = self.seconds(now);
        self.namespaces.retain(|_, ns| {
            self.expire(ns, now);
            if ns.waiting(secs) == 0 {
                ns.line = None;
            }
            ns.in_use(now_nanos)
        });
        let mut strangers = self.strangers();
        strangers.retain(|ns| {
            self.expire(ns, now);
            if ns.waiting(secs) == 0 {
                ns.line = None;
            }
            ns.in_use(now_nanos)
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
