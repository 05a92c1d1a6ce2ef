//! The in-memory view of the cluster that admission decisions read: compact per-pod entries
//! with per-namespace counters, parsed namespace policies, and the number of schedulable nodes.
//!
//! It is fed by the watches in [`crate::watch`] in a cluster, and directly by tests. Admission
//! reads it through [`ClusterView`] and never calls the API server.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use dashmap::DashMap;
use k8s_openapi::api::core::v1::{Node, Pod};

use crate::{
    policy::{Policy, Problem},
    staleness::{Stale, WatchHealth},
};

/// What admission needs to know about the cluster, answered from memory.
pub trait ClusterView: Send + Sync {
    /// The parsed policy of a namespace the cache knows.
    fn namespace(&self, name: &str) -> Option<Arc<NamespaceInfo>>;
    /// Live and pending pods of a namespace, and whether `workflow` already has pods there.
    fn pod_counts(&self, namespace: &str, workflow: Option<&str>, now: Instant) -> PodCounts;
    /// Pods not yet running in the whole cluster (DaemonSet and mirror pods left out).
    fn cluster_pending(&self) -> u64;
    /// How fast pods leave the pending state cluster-wide, per second.
    fn cluster_drain_rate(&self, now: Instant) -> f64;
    /// Healthy, schedulable nodes; `None` while nodes are not watched (offline mode).
    fn schedulable_nodes(&self) -> Option<u32>;
    /// The watch that has been failing longest, if for longer than `limit`.
    fn stale(&self, _limit: Duration, _now: Instant) -> Option<Stale> {
        None
    }
}

/// Counters of one namespace as the watch shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PodCounts {
    pub live: u32,
    pub pending: u32,
    pub workflow_started: bool,
    /// Recent rate (per second) at which pods stopped being pending, and stopped being live.
    pub pending_drain_rate: f64,
    pub live_drain_rate: f64,
}

/// A namespace's effective policy and what was wrong with its annotations.
#[derive(Debug, Clone, PartialEq)]
pub struct NamespaceInfo {
    pub policy: Policy,
    pub problems: Vec<Problem>,
}

/// What bulwark keeps of a pod: a few bits and the workflow it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEntry {
    pub state: PodState,
    /// DaemonSet and mirror pods are not held to pending limits.
    pub pending_exempt: bool,
    pub workflow: Option<Arc<str>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodState {
    /// Not yet running: unscheduled, or scheduled and starting.
    Pending,
    Running,
    /// Succeeded or Failed: holds no quota.
    Terminal,
}

impl PodEntry {
    pub fn from_pod(pod: &Pod, workflow_labels: &[String]) -> PodEntry {
        let facts = crate::pod::PodFacts::of(pod, workflow_labels);
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .unwrap_or("Pending");
        let state = match phase {
            "Succeeded" | "Failed" => PodState::Terminal,
            "Pending" => PodState::Pending,
            _ => PodState::Running,
        };
        PodEntry {
            state,
            pending_exempt: facts.pending_exempt,
            workflow: facts.workflow.map(Arc::from),
        }
    }

    fn live(&self) -> bool {
        self.state != PodState::Terminal
    }

    fn counts_pending(&self) -> bool {
        self.state == PodState::Pending && !self.pending_exempt
    }
}

/// An exponentially decaying event rate, for "when will capacity be back".
#[derive(Debug, Clone, Copy)]
struct DecayingRate {
    per_second: f64,
    at: Option<Instant>,
}

const RATE_WINDOW_SECS: f64 = 10.0;

impl DecayingRate {
    const fn new() -> Self {
        DecayingRate {
            per_second: 0.0,
            at: None,
        }
    }

    fn decayed(&self, now: Instant) -> f64 {
        match self.at {
            None => 0.0,
            Some(at) => {
                let dt = now.saturating_duration_since(at).as_secs_f64();
                self.per_second * (-dt / RATE_WINDOW_SECS).exp()
            }
        }
    }

    fn record(&mut self, now: Instant) {
        self.per_second = self.decayed(now) + 1.0 / RATE_WINDOW_SECS;
        self.at = Some(now);
    }
}

#[derive(Debug)]
struct NamespacePods {
    pods: HashMap<Box<str>, PodEntry>,
    live: u32,
    pending: u32,
    workflows: HashMap<Arc<str>, u32>,
    pending_drain: DecayingRate,
    live_drain: DecayingRate,
}

impl NamespacePods {
    fn new() -> Self {
        NamespacePods {
            pods: HashMap::new(),
            live: 0,
            pending: 0,
            workflows: HashMap::new(),
            pending_drain: DecayingRate::new(),
            live_drain: DecayingRate::new(),
        }
    }

    /// Adds (`sign` 1) or removes (`sign` -1) an entry's contribution to the counters.
    fn account(&mut self, entry: &PodEntry, add: bool) {
        let step = |n: &mut u32| {
            *n = if add {
                n.saturating_add(1)
            } else {
                n.saturating_sub(1)
            }
        };
        if entry.live() {
            step(&mut self.live);
        }
        if entry.counts_pending() {
            step(&mut self.pending);
        }
        if let Some(wf) = &entry.workflow {
            if add {
                *self.workflows.entry(wf.clone()).or_insert(0) += 1;
            } else if let Some(n) = self.workflows.get_mut(wf) {
                *n -= 1;
                if *n == 0 {
                    self.workflows.remove(wf);
                }
            }
        }
    }

    /// Shares the workflow string with the namespace's other pods of the same workflow.
    fn intern(&self, mut entry: PodEntry) -> PodEntry {
        if let Some(wf) = &entry.workflow
            && let Some((shared, _)) = self.workflows.get_key_value(wf)
        {
            entry.workflow = Some(shared.clone());
        }
        entry
    }
}

/// The cluster as the watches show it.
pub struct Cache {
    defaults: Policy,
    workflow_labels: Vec<String>,
    namespaces: DashMap<Box<str>, Arc<NamespaceInfo>>,
    pods: DashMap<Box<str>, NamespacePods>,
    cluster_pending: AtomicU64,
    cluster_live: AtomicU64,
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
pub enum Resource {
    Pods = 0,
    Namespaces = 1,
    Nodes = 2,
}

impl Resource {
    pub const ALL: [Resource; 3] = [Resource::Pods, Resource::Namespaces, Resource::Nodes];

    pub fn name(self) -> &'static str {
        match self {
            Resource::Pods => "pods",
            Resource::Namespaces => "namespaces",
            Resource::Nodes => "nodes",
        }
    }
}

impl Cache {
    pub fn new(defaults: Policy, workflow_labels: Vec<String>) -> Self {
        Cache {
            defaults,
            workflow_labels,
            namespaces: DashMap::new(),
            pods: DashMap::new(),
            cluster_pending: AtomicU64::new(0),
            cluster_live: AtomicU64::new(0),
            cluster_drain: Mutex::new(DecayingRate::new()),
            nodes: DashMap::new(),
            schedulable: AtomicU32::new(0),
            nodes_watched: AtomicBool::new(false),
            synced: Default::default(),
            last_event: Default::default(),
            health: Default::default(),
        }
    }

    pub fn workflow_labels(&self) -> &[String] {
        &self.workflow_labels
    }

    pub fn defaults(&self) -> &Policy {
        &self.defaults
    }

    fn touch(&self, resource: Resource, now: Instant) {
        *self.last_event[resource as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(now);
        self.health(resource).delivered();
    }

    fn health(&self, resource: Resource) -> std::sync::MutexGuard<'_, WatchHealth> {
        self.health[resource as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The watch of `resource` (or a retry of it) failed.
    pub fn watch_failed(&self, resource: Resource, now: Instant) {
        self.health(resource).failed(now);
    }

    /// How long the watch of `resource` has been failing; `None` while it works.
    pub fn broken_for(&self, resource: Resource, now: Instant) -> Option<Duration> {
        self.health(resource).broken_for(now)
    }

    /// Marks a resource's initial list as complete (or, for a relist, complete again).
    pub fn mark_synced(&self, resource: Resource, now: Instant) {
        self.synced[resource as usize].store(true, Ordering::Release);
        if resource == Resource::Nodes {
            self.nodes_watched.store(true, Ordering::Release);
        }
        self.touch(resource, now);
    }

    pub fn is_synced(&self) -> bool {
        self.synced.iter().all(|s| s.load(Ordering::Acquire))
    }

    /// Time since the watch of `resource` last delivered anything.
    pub fn age(&self, resource: Resource, now: Instant) -> Option<Duration> {
        self.last_event[resource as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|t| now.saturating_duration_since(t))
    }

    pub fn live_pods(&self) -> u64 {
        self.cluster_live.load(Ordering::Relaxed)
    }

    // --- pods ---

    /// Records a pod; returns true when the cache did not know it before.
    pub fn apply_pod(&self, namespace: &str, name: &str, entry: PodEntry, now: Instant) -> bool {
        self.touch(Resource::Pods, now);
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
        let (was_live, was_pending) = old
            .as_ref()
            .map_or((false, false), |o| (o.live(), o.counts_pending()));
        self.adjust_cluster(was_live, entry.live(), was_pending, entry.counts_pending());
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
        self.touch(Resource::Pods, now);
        let Some(mut ns) = self.pods.get_mut(namespace) else {
            return;
        };
        let Some(old) = ns.pods.remove(name) else {
            return;
        };
        ns.account(&old, false);
        self.adjust_cluster(old.live(), false, old.counts_pending(), false);
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
        let (live, pending) = fresh.values().fold((0u64, 0u64), |(l, p), ns| {
            (l + u64::from(ns.live), p + u64::from(ns.pending))
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
        self.mark_synced(Resource::Pods, now);
        new_pods
    }

    fn adjust_cluster(&self, was_live: bool, live: bool, was_pending: bool, pending: bool) {
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
        adjust(&self.cluster_live, was_live, live);
        adjust(&self.cluster_pending, was_pending, pending);
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
        self.touch(Resource::Namespaces, now);
        let (policy, problems) = Policy::from_annotations(&self.defaults, annotations);
        let info = Arc::new(NamespaceInfo { policy, problems });
        let old = self.namespaces.insert(name.into(), info.clone());
        let changed = old.is_none_or(|o| o.problems != info.problems);
        (changed && !info.problems.is_empty()).then(|| info.problems.clone())
    }

    pub fn delete_namespace(&self, name: &str, now: Instant) {
        self.touch(Resource::Namespaces, now);
        self.namespaces.remove(name);
    }

    /// Drops namespaces a relist no longer shows.
    pub fn retain_namespaces(&self, names: &HashSet<String>, now: Instant) {
        self.namespaces.retain(|k, _| names.contains(&**k));
        self.mark_synced(Resource::Namespaces, now);
    }

    // --- nodes ---

    pub fn apply_node(&self, node: &Node, now: Instant) {
        let Some(name) = node.metadata.name.as_deref() else {
            return;
        };
        self.touch(Resource::Nodes, now);
        let ok = node_is_schedulable(node);
        let old = self.nodes.insert(name.into(), ok);
        self.adjust_schedulable(old.unwrap_or(false), ok);
    }

    pub fn delete_node(&self, name: &str, now: Instant) {
        self.touch(Resource::Nodes, now);
        if let Some((_, ok)) = self.nodes.remove(name) {
            self.adjust_schedulable(ok, false);
        }
    }

    pub fn retain_nodes(&self, names: &HashSet<String>, now: Instant) {
        self.nodes.retain(|k, _| names.contains(&**k));
        let count = self.nodes.iter().filter(|e| *e.value()).count();
        self.schedulable
            .store(u32::try_from(count).unwrap_or(u32::MAX), Ordering::Relaxed);
        self.mark_synced(Resource::Nodes, now);
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

    fn pod_counts(&self, namespace: &str, workflow: Option<&str>, now: Instant) -> PodCounts {
        let Some(ns) = self.pods.get(namespace) else {
            return PodCounts::default();
        };
        PodCounts {
            live: ns.live,
            pending: ns.pending,
            workflow_started: workflow.is_some_and(|w| ns.workflows.contains_key(w)),
            pending_drain_rate: ns.pending_drain.decayed(now),
            live_drain_rate: ns.live_drain.decayed(now),
        }
    }

    fn cluster_pending(&self) -> u64 {
        self.cluster_pending.load(Ordering::Relaxed)
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
            Resource::ALL
                .into_iter()
                .filter_map(|r| self.broken_for(r, now).map(|d| (r.name(), d))),
            limit,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(state: PodState, workflow: Option<&str>) -> PodEntry {
        PodEntry {
            state,
            pending_exempt: false,
            workflow: workflow.map(Arc::from),
        }
    }

    fn cache() -> Cache {
        Cache::new(Policy::default(), vec!["bulwark.io/workflow".into()])
    }

    #[test]
    fn counts_follow_pod_lifecycle() {
        let c = cache();
        let t = Instant::now();
        assert!(c.apply_pod("ci", "a", entry(PodState::Pending, Some("wf")), t));
        assert!(c.apply_pod("ci", "b", entry(PodState::Pending, None), t));
        let n = c.pod_counts("ci", Some("wf"), t);
        assert_eq!((n.live, n.pending, n.workflow_started), (2, 2, true));
        assert_eq!(c.cluster_pending(), 2);

        assert!(!c.apply_pod("ci", "a", entry(PodState::Running, Some("wf")), t));
        let n = c.pod_counts("ci", Some("wf"), t);
        assert_eq!((n.live, n.pending), (2, 1));
        assert!(
            n.pending_drain_rate > 0.0,
            "a pod started: drain is observed"
        );
        assert_eq!(c.cluster_pending(), 1);

        c.apply_pod("ci", "a", entry(PodState::Terminal, Some("wf")), t);
        let n = c.pod_counts("ci", Some("wf"), t);
        assert_eq!((n.live, n.pending, n.workflow_started), (1, 1, true));
        assert_eq!(c.live_pods(), 1);

        c.delete_pod("ci", "a", t);
        c.delete_pod("ci", "b", t);
        c.delete_pod("ci", "missing", t);
        let n = c.pod_counts("ci", Some("wf"), t);
        assert_eq!((n.live, n.pending, n.workflow_started), (0, 0, false));
        assert_eq!((c.cluster_pending(), c.live_pods()), (0, 0));
    }

    #[test]
    fn daemonset_pods_do_not_count_as_pending() {
        let c = cache();
        let t = Instant::now();
        let mut e = entry(PodState::Pending, None);
        e.pending_exempt = true;
        c.apply_pod("ns", "ds-1", e, t);
        let n = c.pod_counts("ns", None, t);
        assert_eq!((n.live, n.pending), (1, 0));
        assert_eq!(c.cluster_pending(), 0);
    }

    #[test]
    fn relist_replaces_everything_and_names_new_pods() {
        let c = cache();
        let t = Instant::now();
        c.apply_pod("a", "old", entry(PodState::Pending, None), t);
        c.apply_pod("b", "gone", entry(PodState::Pending, None), t);
        let new = c.replace_pods(
            vec![
                ("a".into(), "old".into(), entry(PodState::Running, None)),
                ("a".into(), "new".into(), entry(PodState::Pending, None)),
            ],
            t,
        );
        assert_eq!(new, vec![("a".to_string(), "new".to_string())]);
        let n = c.pod_counts("a", None, t);
        assert_eq!((n.live, n.pending), (2, 1));
        assert_eq!(c.pod_counts("b", None, t).live, 0);
        assert_eq!(c.cluster_pending(), 1);
    }

    #[test]
    fn namespace_problems_are_reported_once() {
        let c = cache();
        let t = Instant::now();
        let bad: BTreeMap<String, String> =
            [("bulwark.io/max-pods".to_string(), "many".to_string())].into();
        assert!(c.apply_namespace("ci", Some(&bad), t).is_some());
        assert!(c.apply_namespace("ci", Some(&bad), t).is_none(), "resync");
        assert!(c.apply_namespace("ci", None, t).is_none(), "fixed");
        assert_eq!(c.namespace("ci").map(|i| i.problems.len()), Some(0));
    }

    #[test]
    fn drain_rate_decays() {
        let mut r = DecayingRate::new();
        let t = Instant::now();
        for _ in 0..10 {
            r.record(t);
        }
        let fresh = r.decayed(t);
        assert!((fresh - 1.0).abs() < 1e-9, "{fresh}");
        assert!(r.decayed(t + Duration::from_secs(30)) < fresh / 10.0);
    }
}
