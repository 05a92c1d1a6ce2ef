//! Feeds the [`Cache`] from kube-rs watches of pods, namespaces and nodes. Watches resume on
//! their own after errors with a fully jittered exponential back-off (0.25 s up to 5 s); a
//! relist replaces the cache contents atomically per resource.

use std::{collections::HashSet, sync::Arc, time::Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        WatchStreamExt,
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        watcher::{self, Event},
    },
};
use tokio::sync::mpsc;

use crate::{
    backoff::Jittered,
    cache::{Cache, PodEntry, Resource as CacheResource},
    ledger::Ledger,
    metrics::Metrics,
    policy::Problem,
};

/// Invalid annotations of one namespace, to be published as an Event.
type ProblemReport = (Namespace, Vec<Problem>);

/// Starts the three watches and the Event publisher; they run until the runtime stops.
pub fn spawn(client: Client, cache: Arc<Cache>, ledger: Arc<Ledger>, metrics: Arc<Metrics>) {
    let (tx, rx) = mpsc::channel::<ProblemReport>(256);
    tokio::spawn(watch_pods(Api::all(client.clone()), cache.clone(), ledger));
    tokio::spawn(watch_namespaces(
        Api::all(client.clone()),
        cache.clone(),
        metrics,
        tx,
    ));
    tokio::spawn(watch_nodes(Api::all(client.clone()), cache));
    tokio::spawn(publish_problems(client, rx));
}

/// A watch that resumes after errors with the jittered back-off every bulwark watch uses.
pub fn stream<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, config).backoff(Jittered::for_watches())
}

fn watch_failed(cache: &Cache, resource: CacheResource, e: &watcher::Error, now: Instant) {
    cache.watch_failed(resource, now);
    tracing::warn!(resource = resource.name(), error = %e, "watch failed; retrying with back-off, decisions use the last snapshot");
}

async fn watch_pods(api: Api<Pod>, cache: Arc<Cache>, ledger: Arc<Ledger>) {
    let labels = cache.workflow_labels().to_vec();
    let mut buffer = Vec::new();
    let mut events = std::pin::pin!(stream(api, watcher::Config::default()));
    while let Some(event) = events.next().await {
        let now = Instant::now();
        match event {
            Ok(Event::Apply(pod)) => {
                let (Some(ns), Some(name)) = (
                    pod.metadata.namespace.as_deref(),
                    pod.metadata.name.as_deref(),
                ) else {
                    continue;
                };
                if cache.apply_pod(ns, name, PodEntry::from_pod(&pod, &labels), now) {
                    ledger.observe_created(ns, name);
                }
            }
            Ok(Event::Delete(pod)) => {
                if let (Some(ns), Some(name)) = (
                    pod.metadata.namespace.as_deref(),
                    pod.metadata.name.as_deref(),
                ) {
                    cache.delete_pod(ns, name, now);
                }
            }
            Ok(Event::Init) => buffer.clear(),
            Ok(Event::InitApply(pod)) => {
                let entry = PodEntry::from_pod(&pod, &labels);
                if let (Some(ns), Some(name)) = (pod.metadata.namespace, pod.metadata.name) {
                    buffer.push((ns, name, entry));
                }
            }
            Ok(Event::InitDone) => {
                // Taken, not drained: a drained Vec keeps the capacity of the whole cluster.
                let listed = std::mem::take(&mut buffer);
                let count = listed.len();
                for (ns, name) in cache.replace_pods(listed, now) {
                    ledger.observe_created(&ns, &name);
                }
                tracing::info!(pods = count, "pod cache synced");
            }
            Err(e) => watch_failed(&cache, CacheResource::Pods, &e, now),
        }
    }
}

async fn watch_namespaces(
    api: Api<Namespace>,
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    reports: mpsc::Sender<ProblemReport>,
) {
    let mut seen = HashSet::new();
    let mut events = std::pin::pin!(stream(api, watcher::Config::default()));
    let apply = |ns: Namespace, now| {
        let name = ns.name_any();
        if let Some(problems) = cache.apply_namespace(&name, ns.metadata.annotations.as_ref(), now)
        {
            for p in &problems {
                tracing::warn!(namespace = %name, annotation = p.annotation, value = %p.value, error = %p.error, "invalid namespace annotation; using the default");
                metrics
                    .policy_problems
                    .with_label_values(&[p.annotation])
                    .inc();
            }
            // A full channel drops the Event, never the admission path: log and metric stand.
            if reports.try_send((ns, problems)).is_err() {
                tracing::warn!(namespace = %name, "event queue full; annotation problem not published as an Event");
            }
        }
        name
    };
    while let Some(event) = events.next().await {
        let now = Instant::now();
        match event {
            Ok(Event::Apply(ns)) => {
                apply(ns, now);
            }
            Ok(Event::Delete(ns)) => cache.delete_namespace(&ns.name_any(), now),
            Ok(Event::Init) => seen.clear(),
            Ok(Event::InitApply(ns)) => {
                seen.insert(apply(ns, now));
            }
            Ok(Event::InitDone) => {
                let seen = std::mem::take(&mut seen);
                cache.retain_namespaces(&seen, now);
                tracing::info!(namespaces = seen.len(), "namespace cache synced");
            }
            Err(e) => watch_failed(&cache, CacheResource::Namespaces, &e, now),
        }
    }
}

async fn watch_nodes(api: Api<Node>, cache: Arc<Cache>) {
    let mut seen = HashSet::new();
    let mut events = std::pin::pin!(stream(api, watcher::Config::default()));
    while let Some(event) = events.next().await {
        let now = Instant::now();
        match event {
            Ok(Event::Apply(node)) => cache.apply_node(&node, now),
            Ok(Event::Delete(node)) => cache.delete_node(&node.name_any(), now),
            Ok(Event::Init) => seen.clear(),
            Ok(Event::InitApply(node)) => {
                seen.insert(node.name_any());
                cache.apply_node(&node, now);
            }
            Ok(Event::InitDone) => {
                let seen = std::mem::take(&mut seen);
                cache.retain_nodes(&seen, now);
                tracing::info!(nodes = seen.len(), "node cache synced");
            }
            Err(e) => watch_failed(&cache, CacheResource::Nodes, &e, now),
        }
    }
}

/// Publishes one Warning Event per namespace whose annotations became invalid. Runs off the
/// admission path: a slow or failing API server delays Events, never admissions.
async fn publish_problems(client: Client, mut reports: mpsc::Receiver<ProblemReport>) {
    let reporter = Reporter {
        controller: "bulwark-webhook".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let recorder = Recorder::new(client, reporter);
    while let Some((ns, problems)) = reports.recv().await {
        let note: Vec<String> = problems.iter().map(ToString::to_string).collect();
        let mut note = note.join("; ");
        // Events cap their note at 1 kB; cut on a character boundary.
        if let Some(cut) = (0..=1000.min(note.len()))
            .rev()
            .find(|&i| note.is_char_boundary(i))
        {
            note.truncate(cut);
        }
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: "InvalidAnnotation".into(),
            note: Some(note),
            action: "ParsePolicy".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &ns.object_ref(&())).await {
            tracing::warn!(namespace = %ns.name_any(), error = %e, "publishing Event failed");
        }
    }
}
