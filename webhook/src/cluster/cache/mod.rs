//! The in-memory view of the cluster that admission decisions read: compact per-pod entries
//! with per-namespace counters, parsed namespace policies, and the number of schedulable nodes.
//!
//! It is fed by the watches in [`super::feeds`] in a cluster, and directly by tests. Admission
//! reads it through the [`ClusterView`] port and never calls the API server.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use dashmap::DashMap;
use k8s_openapi::api::core::v1::Node;

mod pods;

use pods::{DecayingRate, NamespacePods};
pub use pods::{PodEntry, PodState};

use crate::{
    policy::{Policy, Problem, pod::PodRules},
    quota::{
        line::{HeldPod, Line},
        staleness::{Stale, WatchHealth},
        view::{ClusterView, NamespaceInfo, PodCounts},
    },
};

/// The cluster as the watches show it.
pub struct Cache {
    defaults: Policy,
    rules: PodRules,
    namespaces: DashMap<Box<str>, Arc<NamespaceInfo>>,
    pods: DashMap<Box<str>, NamespacePods>,
    cluster_pending: AtomicU64,
    cluster_live: AtomicU64,
    cluster_held: AtomicU64,
    cluster_drain: Mutex<DecayingRate>,
    nodes: DashMap<Box<str>, bool>,
    schedulable: AtomicU32,
    nodes_watched: AtomicBool,
    synced: [AtomicBool; 3],
    last_event: [Mutex<Option<Instant>>; 3],
    health: [Mutex<WatchHealth>; 3],
}

/// The three watched resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watched {
    Pods = 0,
    Namespaces = 1,
    Nodes = 2,
}

impl Watched {
    pub const ALL: [Watched; 3] = [Watched::Pods, Watched::Namespaces, Watched::Nodes];

    pub fn name(self) -> &'static str {
        match self {
            Watched::Pods => "pods",
            Watched::Namespaces => "namespaces",
            Watched::Nodes => "nodes",
        }
    }
}

impl Cache {
    pub fn new(defaults: Policy, rules: PodRules) -> Self {
        Cache {
            defaults,
            rules,
            namespaces: DashMap::new(),
            pods: DashMap::new(),
            cluster_pending: AtomicU64::new(0),
            cluster_live: AtomicU64::new(0),
            cluster_held: AtomicU64::new(0),
            cluster_drain: Mutex::new(DecayingRate::new()),
            nodes: DashMap::new(),
            schedulable: AtomicU32::new(0),
            nodes_watched: AtomicBool::new(false),
            synced: Default::default(),
            last_event: Default::default(),
            health: Default::default(),
        }
    }

    /// What a watched pod's entry is judged by: its workflow, and what exempts it where.
    pub fn rules(&self) -> &PodRules {
        &self.rules
    }

    pub fn defaults(&self) -> &Policy {
        &self.defaults
    }

    fn touch(&self, resource: Watched, now: Instant) {
        *self.last_event[resource as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(now);
        self.health(resource).delivered();
    }

    fn health(&self, resource: Watched) -> std::sync::MutexGuard<'_, WatchHealth> {
        self.health[resource as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The watch of `resource` (or a retry of it) failed.
    pub fn watch_failed(&self, resource: Watched, now: Instant) {
        self.health(resource).failed(now);
    }

    /// How long the watch of `resource` has been failing; `None` while it works.
    pub fn broken_for(&self, resource: Watched, now: Instant) -> Option<Duration> {
        self.health(resource).broken_for(now)
    }

    /// Marks a resource's initial list as complete (or, for a relist, complete again).
    pub fn mark_synced(&self, resource: Watched, now: Instant) {
        self.synced[resource as usize].store(true, Ordering::Release);
        if resource == Watched::Nodes {
            self.nodes_watched.store(true, Ordering::Release);
        }
        self.touch(resource, now);
    }

    pub fn is_synced(&self) -> bool {
        self.synced.iter().all(|s| s.load(Ordering::Acquire))
    }

    /// Time since the watch of `resource` last delivered anything.
    pub fn age(&self, resource: Watched, now: Instant) -> Option<Duration> {
        self.last_event[resource as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|t| now.saturating_duration_since(t))
    }

    pub fn live_pods(&self) -> u64 {
        self.cluster_live.load(Ordering::Relaxed)
    }

    /// Pods waiting behind bulwark's gate, cluster-wide.
    pub fn cluster_held(&self) -> u64 {
        self.cluster_held.load(Ordering::Relaxed)
    }

    /// The line of every namespace with held pods, as hold mode's releaser plans from it:
    /// after a restart it is rebuilt from the gated pods the watch shows, so nothing waits
    /// anywhere but on the pods themselves.
    pub fn lines(&self) -> Vec<Line> {
        let mut out = Vec::new();
        for entry in self.pods.iter().filter(|e| e.held > 0) {
            let ns = entry.value();
            let mut held = Vec::with_capacity(ns.held as usize);
            let mut started = HashSet::new();
            for (name, pod) in &ns.pods {
                match pod.gated() {
                    Some(g) => held.push(HeldPod {
                        name: Arc::from(&**name),
                        created: g.created,
                        gate: g.gate,
                        workflow: pod.workflow.clone(),
                    }),
                    None => {
                        if pod.live()
                            && let Some(w) = &pod.workflow
                        {
                            started.insert(w.clone());
                        }
                    }
                }
            }
            let namespace: &str = entry.key();
            let policy = self
                .namespaces
                .get(namespace)
                .map_or_else(|| self.defaults.clone(), |i| i.policy.clone());
            out.push(Line {
                namespace: Arc::from(namespace),
                policy,
                pending: ns.pending,
                started,
                held,
            });
        }
        out
    }

    // --- pods ---

    /// Records a pod; returns true when the cache did not know it before.
    pub fn apply_pod(&self, namespace: &str, name: &str, entry: PodEntry, now: Instant) -> bool {
        self.touch(Watched::Pods, now);
        let mut ns = self
            .pods
            .entry(namespace.into())
            .or_insert_with(NamespacePods::new);
        let entry = ns.intern(entry);
        ns.account(&entry, true);
        let old = ns.pods.insert(name.into(), entry.clone());
        if let Some(old) = &old {
            ns.account(old, false);
        }
        let was = old.as_ref().map_or(Counted::default(), Counted::of);
        let was_pending = was.pending;
        let was_live = was.live;
        self.adjust_cluster(was, Counted::of(&entry));
        if was_pending && !entry.counts_pending() {
            ns.pending_drain.record(now);
            self.record_cluster_drain(now);
        }
        if was_live && !entry.live() {
            ns.live_drain.record(now);
        }
        old.is_none()
    }

    pub fn delete_pod(&self, namespace: &str, name: &str, now: Instant) {
        self.touch(Watched::Pods, now);
        let Some(mut ns) = self.pods.get_mut(namespace) else {
            return;
        };
        let Some(old) = ns.pods.remove(name) else {
            return;
        };
        ns.account(&old, false);
        self.adjust_cluster(Counted::of(&old), Counted::default());
        if old.counts_pending() {
            ns.pending_drain.record(now);
            self.record_cluster_drain(now);
        }
        if old.live() {
            ns.live_drain.record(now);
        }
        let empty = ns.pods.is_empty();
        drop(ns);
        if empty {
            self.pods.remove_if(namespace, |_, ns| ns.pods.is_empty());
        }
    }

    /// Replaces every pod after a (re)list. Returns the pods that are new to the cache, so
    /// their admissions' reservations can be released.
    pub fn replace_pods(
        &self,
        pods: impl IntoIterator<Item = (String, String, PodEntry)>,
        now: Instant,
    ) -> Vec<(String, String)> {
        let mut fresh: HashMap<Box<str>, NamespacePods> = HashMap::new();
        let mut new_pods = Vec::new();
        for (namespace, name, entry) in pods {
            let known = self
                .pods
                .get(namespace.as_str())
                .is_some_and(|ns| ns.pods.contains_key(name.as_str()));
            let ns = fresh
                .entry(namespace.as_str().into())
                .or_insert_with(NamespacePods::new);
            let entry = ns.intern(entry);
            ns.account(&entry, true);
            if let Some(old) = ns.pods.insert(name.as_str().into(), entry) {
                ns.account(&old, false);
            }
            if !known {
                new_pods.push((namespace, name));
            }
        }
        let (live, pending, held) = fresh.values().fold((0u64, 0u64, 0u64), |(l, p, h), ns| {
            (
                l + u64::from(ns.live),
                p + u64::from(ns.pending),
                h + u64::from(ns.held),
            )
        });
        let keep: HashSet<&str> = fresh.keys().map(|k| &**k).collect();
        self.pods.retain(|k, _| keep.contains(&**k));
        for (namespace, mut ns) in fresh {
            // Keep the drain history: it describes the recent past, which a relist does not change.
            if let Some(old) = self.pods.get(&namespace) {
                ns.pending_drain = old.pending_drain;
                ns.live_drain = old.live_drain;
            }
            self.pods.insert(namespace, ns);
        }
        self.cluster_live.store(live, Ordering::Relaxed);
        self.cluster_pending.store(pending, Ordering::Relaxed);
        self.cluster_held.store(held, Ordering::Relaxed);
        self.mark_synced(Watched::Pods, now);
        new_pods
    }

    fn adjust_cluster(&self, was: Counted, now: Counted) {
        let adjust = |counter: &AtomicU64, before: bool, after: bool| match (before, after) {
            (false, true) => {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                // Never wraps below zero even if a delete races a relist.
                let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(1))
                });
            }
            _ => {}
        };
        adjust(&self.cluster_live, was.live, now.live);
        adjust(&self.cluster_pending, was.pending, now.pending);
        adjust(&self.cluster_held, was.held, now.held);
    }

    fn record_cluster_drain(&self, now: Instant) {
        self.cluster_drain
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(now);
    }

    // --- namespaces ---

    /// Records a namespace's annotations. Returns the problems when they differ from what the
    /// namespace had before, so each is reported once, not at every resync.
    pub fn apply_namespace(
        &self,
        name: &str,
        annotations: Option<&BTreeMap<String, String>>,
        now: Instant,
    ) -> Option<Vec<Problem>> {
        self.touch(Watched::Namespaces, now);
        let (policy, problems) = Policy::from_annotations(&self.defaults, annotations);
        let info = Arc::new(NamespaceInfo { policy, problems });
        let old = self.namespaces.insert(name.into(), info.clone());
        let changed = old.is_none_or(|o| o.problems != info.problems);
        (changed && !info.problems.is_empty()).then(|| info.problems.clone())
    }

    pub fn delete_namespace(&self, name: &str, now: Instant) {
        self.touch(Watched::Namespaces, now);
        self.namespaces.remove(name);
    }

    /// Drops namespaces a relist no longer shows.
    pub fn retain_namespaces(&self, names: &HashSet<String>, now: Instant) {
        self.namespaces.retain(|k, _| names.contains(&**k));
        self.mark_synced(Watched::Namespaces, now);
    }

    // --- nodes ---

    pub fn apply_node(&self, node: &Node, now: Instant) {
        let Some(name) = node.metadata.name.as_deref() else {
            return;
        };
        self.touch(Watched::Nodes, now);
        let ok = node_is_schedulable(node);
        let old = self.nodes.insert(name.into(), ok);
        self.adjust_schedulable(old.unwrap_or(false), ok);
    }

    pub fn delete_node(&self, name: &str, now: Instant) {
        self.touch(Watched::Nodes, now);
        if let Some((_, ok)) = self.nodes.remove(name) {
            self.adjust_schedulable(ok, false);
        }
    }

    pub fn retain_nodes(&self, names: &HashSet<String>, now: Instant) {
        self.nodes.retain(|k, _| names.contains(&**k));
        let count = self.nodes.iter().filter(|e| *e.value()).count();
        self.schedulable
            .store(u32::try_from(count).unwrap_or(u32::MAX), Ordering::Relaxed);
        self.mark_synced(Watched::Nodes, now);
    }

    fn adjust_schedulable(&self, before: bool, after: bool) {
        match (before, after) {
            (false, true) => {
                self.schedulable.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                let _ = self
                    .schedulable
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        Some(n.saturating_sub(1))
                    });
            }
            _ => {}
        }
    }
}

/// Which cluster-wide counters one pod entry is in.
#[derive(Debug, Clone, Copy, Default)]
struct Counted {
    live: bool,
    pending: bool,
    held: bool,
}

impl Counted {
    fn of(e: &PodEntry) -> Counted {
        Counted {
            live: e.live(),
            pending: e.counts_pending(),
            held: e.gated().is_some(),
        }
    }
}

/// A node new pods can land on: Ready, not cordoned, and without a NoSchedule/NoExecute taint
/// (bulwark's own `bulwark.io/unhealthy` taint among them).
pub fn node_is_schedulable(node: &Node) -> bool {
    let Some(spec) = &node.spec else {
        return false;
    };
    if spec.unschedulable == Some(true) {
        return false;
    }
    let tainted = spec
        .taints
        .iter()
        .flatten()
        .any(|t| matches!(t.effect.as_str(), "NoSchedule" | "NoExecute"));
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True");
    ready && !tainted
}

impl ClusterView for Cache {
    fn namespace(&self, name: &str) -> Option<Arc<NamespaceInfo>> {
        self.namespaces.get(name).map(|e| e.value().clone())
    }

    fn namespaces_listed(&self) -> bool {
        self.synced[Watched::Namespaces as usize].load(Ordering::Acquire)
    }

    fn pod_counts(&self, namespace: &str, workflow: Option<&str>, now: Instant) -> PodCounts {
        let Some(ns) = self.pods.get(namespace) else {
            return PodCounts::default();
        };
        PodCounts {
            live: ns.live,
            pending: ns.pending,
            held: ns.held,
            workflow_started: workflow.is_some_and(|w| ns.workflows.contains_key(w)),
            pending_drain_rate: ns.pending_drain.decayed(now),
            live_drain_rate: ns.live_drain.decayed(now),
        }
    }

    fn cluster_pending(&self) -> u64 {
        self.cluster_pending.load(Ordering::Relaxed)
    }

    fn cluster_held(&self) -> u64 {
        Cache::cluster_held(self)
    }

    fn cluster_drain_rate(&self, now: Instant) -> f64 {
        self.cluster_drain
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .decayed(now)
    }

    fn schedulable_nodes(&self) -> Option<u32> {
        self.nodes_watched
            .load(Ordering::Acquire)
            .then(|| self.schedulable.load(Ordering::Relaxed))
    }

    fn stale(&self, limit: Duration, now: Instant) -> Option<Stale> {
        Stale::pick(
            Watched::ALL
                .into_iter()
                .filter_map(|r| self.broken_for(r, now).map(|d| (r.name(), d))),
            limit,
        )
    }
}

#[cfg(test)]
mod tests;
