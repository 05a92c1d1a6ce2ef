//! Feeds the [`Cache`] from watches of pods, namespaces and nodes, each through the one
//! [`index`](super::index) driver. A relist replaces the cache's contents per resource; pods
//! the watch shows release this replica's reservations for them in the [`Ledger`].

use std::{collections::HashSet, sync::Arc, time::Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::{
    Api, Client, ResourceExt,
    runtime::watcher::{self, Config},
};

use super::{
    cache::{Cache, PodEntry, Watched},
    events::{ProblemReport, Reports},
    index::{self, Index},
};
use crate::{metrics::webhook::PolicyMetrics, quota::ledger::Ledger};

/// Starts the three watches and the Event publisher; they run until the runtime stops.
/// `instance` names this replica in Events.
pub fn spawn(
    client: Client,
    instance: Option<String>,
    cache: Arc<Cache>,
    ledger: Arc<Ledger>,
    metrics: PolicyMetrics,
) {
    let reports = super::events::spawn(client.clone(), instance);
    let all = || Config::default();
    tokio::spawn(index::run(
        Api::all(client.clone()),
        all(),
        Pods {
            cache: cache.clone(),
            ledger,
        },
    ));
    tokio::spawn(index::run(
        Api::all(client.clone()),
        all(),
        Namespaces {
            cache: cache.clone(),
            metrics,
            reports,
        },
    ));
    tokio::spawn(index::run(Api::all(client), all(), Nodes { cache }));
}

fn watch_failed(cache: &Cache, watched: Watched, e: &watcher::Error, now: Instant) {
    cache.watch_failed(watched, now);
    tracing::warn!(resource = watched.name(), error = %e, "watch failed; retrying with back-off, decisions use the last snapshot");
}

struct Pods {
    cache: Arc<Cache>,
    ledger: Arc<Ledger>,
}

impl Index<Pod> for Pods {
    type Listed = (String, String, PodEntry);

    fn apply(&mut self, pod: Pod, now: Instant) {
        let (Some(ns), Some(name)) = (
            pod.metadata.namespace.as_deref(),
            pod.metadata.name.as_deref(),
        ) else {
            return;
        };
        let entry = PodEntry::from_pod(&pod, self.cache.rules());
        if self.cache.apply_pod(ns, name, entry, now) {
            self.ledger.observe_created(ns, name);
        }
    }

    fn delete(&mut self, pod: Pod, now: Instant) {
        if let (Some(ns), Some(name)) = (
            pod.metadata.namespace.as_deref(),
            pod.metadata.name.as_deref(),
        ) {
            self.cache.delete_pod(ns, name, now);
        }
    }

    fn listed(&mut self, pod: Pod, _now: Instant) -> Option<Self::Listed> {
        let entry = PodEntry::from_pod(&pod, self.cache.rules());
        Some((pod.metadata.namespace?, pod.metadata.name?, entry))
    }

    fn reset(&mut self, listed: Vec<Self::Listed>, now: Instant) {
        let count = listed.len();
        for (ns, name) in self.cache.replace_pods(listed, now) {
            self.ledger.observe_created(&ns, &name);
        }
        tracing::info!(pods = count, "pod cache synced");
    }

    fn failed(&mut self, e: &watcher::Error, now: Instant) {
        watch_failed(&self.cache, Watched::Pods, e, now);
    }
}

struct Namespaces {
    cache: Arc<Cache>,
    metrics: PolicyMetrics,
    reports: Reports,
}

impl Index<Namespace> for Namespaces {
    /// Namespaces are applied as they are listed (their policy is needed at once); the list
    /// only tells which ones are gone.
    type Listed = String;

    fn apply(&mut self, ns: Namespace, now: Instant) {
        let name = ns.name_any();
        let Some(problems) =
            self.cache
                .apply_namespace(&name, ns.metadata.annotations.as_ref(), now)
        else {
            return;
        };
        for p in &problems {
            tracing::warn!(namespace = %name, annotation = p.annotation, value = %p.value, error = %p.error, "invalid namespace annotation; using the default");
            self.metrics.problem(p.annotation);
        }
        // A full queue drops the Event, never the admission path: log and metric stand.
        if self
            .reports
            .try_send(ProblemReport { ns, problems })
            .is_err()
        {
            tracing::warn!(namespace = %name, "event queue full; annotation problem not published as an Event");
        }
    }

    fn delete(&mut self, ns: Namespace, now: Instant) {
        self.cache.delete_namespace(&ns.name_any(), now);
    }

    fn listed(&mut self, ns: Namespace, now: Instant) -> Option<String> {
        let name = ns.name_any();
        self.apply(ns, now);
        Some(name)
    }

    fn reset(&mut self, listed: Vec<String>, now: Instant) {
        let seen: HashSet<String> = listed.into_iter().collect();
        self.cache.retain_namespaces(&seen, now);
        tracing::info!(namespaces = seen.len(), "namespace cache synced");
    }

    fn failed(&mut self, e: &watcher::Error, now: Instant) {
        watch_failed(&self.cache, Watched::Namespaces, e, now);
    }
}

struct Nodes {
    cache: Arc<Cache>,
}

impl Index<Node> for Nodes {
    type Listed = String;

    fn apply(&mut self, node: Node, now: Instant) {
        self.cache.apply_node(&node, now);
    }

    fn delete(&mut self, node: Node, now: Instant) {
        self.cache.delete_node(&node.name_any(), now);
    }

    fn listed(&mut self, node: Node, now: Instant) -> Option<String> {
        self.cache.apply_node(&node, now);
        Some(node.name_any())
    }

    fn reset(&mut self, listed: Vec<String>, now: Instant) {
        let seen: HashSet<String> = listed.into_iter().collect();
        self.cache.retain_nodes(&seen, now);
        tracing::info!(nodes = seen.len(), "node cache synced");
    }

    fn failed(&mut self, e: &watcher::Error, now: Instant) {
        watch_failed(&self.cache, Watched::Nodes, e, now);
    }
}
