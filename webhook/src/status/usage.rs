//! What a namespace uses and what bulwark refused it: its pods counted as the webhook's cache
//! counts them (live, pending), the pods created over the last minute (by
//! `creationTimestamp`), and the refusals of the last ten minutes summed from bulwark's
//! Throttled Events.
//!
//! Both folds take one object at a time, so `status -A` on a large cluster keeps counters, not
//! every pod it listed.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::core::v1::{Event, Pod},
    jiff::{SignedDuration, Timestamp},
};

use crate::{
    cluster::{
        cache::PodEntry,
        throttled::{COUNTS_ANNOTATION, REASON, REPORTER},
    },
    policy::pod::PodRules,
};

/// The creation rate is measured over this window.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);
/// Refusals are summed over this window.
pub const REFUSALS_WINDOW: Duration = Duration::from_secs(600);

/// A namespace's pods.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodTally {
    /// Not Succeeded or Failed: what max-pods counts.
    pub live: u32,
    /// Not yet running, DaemonSet and mirror pods left out: what max-pending-pods counts.
    pub pending: u32,
    /// Behind bulwark's scheduling gate (hold mode): live, not pending.
    pub held: u32,
    /// Created within [`RATE_WINDOW`] before now (pods deleted since are not seen).
    pub created_last_minute: u32,
}

/// Refusals by reason (the webhook's labels: `max_pending`, `rate`, ...).
pub type Refusals = BTreeMap<String, u64>;

fn within(at: Timestamp, now: Timestamp, window: Duration) -> bool {
    let age = now.duration_since(at);
    // A pod stamped slightly after `now` (clocks differ) is as new as it gets.
    age < SignedDuration::try_from(window).unwrap_or(SignedDuration::MAX)
}

/// Adds `pod` to its namespace's tally, judged by `rules` as the webhook judges it (which pods
/// are held to which cap). `now` is this machine's clock, compared with the API server's
/// timestamps: a skew between the two shifts the one-minute window by as much.
pub fn count_pod(
    tallies: &mut BTreeMap<String, PodTally>,
    pod: &Pod,
    rules: &PodRules,
    now: Timestamp,
) {
    let Some(ns) = pod.metadata.namespace.as_deref() else {
        return;
    };
    let entry = PodEntry::from_pod(pod, rules);
    let tally = match tallies.get_mut(ns) {
        Some(t) => t,
        None => tallies.entry(ns.to_owned()).or_default(),
    };
    if entry.live() {
        tally.live += 1;
    }
    if entry.counts_pending() {
        tally.pending += 1;
    }
    if entry.gated().is_some() {
        tally.held += 1;
    }
    if pod
        .metadata
        .creation_timestamp
        .as_ref()
        .is_some_and(|t| within(t.0, now, RATE_WINDOW))
    {
        tally.created_last_minute += 1;
    }
}

/// When an Event was written: its eventTime (events.k8s.io), else its legacy timestamps.
fn written(event: &Event) -> Option<Timestamp> {
    event
        .event_time
        .as_ref()
        .map(|t| t.0)
        .or_else(|| event.last_timestamp.as_ref().map(|t| t.0))
        .or_else(|| event.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// Adds a Throttled Event of bulwark's, written within [`REFUSALS_WINDOW`], to the refusals
/// of the namespace it regards; any other Event is left out.
pub fn count_event(refusals: &mut BTreeMap<String, Refusals>, event: &Event, now: Timestamp) {
    let ours = event.reason.as_deref() == Some(REASON)
        && event.reporting_component.as_deref() == Some(REPORTER)
        && event.involved_object.kind.as_deref() == Some("Namespace");
    let recent = written(event).is_some_and(|at| within(at, now, REFUSALS_WINDOW));
    let (Some(ns), Some(counts)) = (
        event.involved_object.name.as_deref(),
        event
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(COUNTS_ANNOTATION)),
    ) else {
        return;
    };
    if !ours || !recent {
        return;
    }
    let by_reason = refusals.entry(ns.to_owned()).or_default();
    // `max_pending=153,rate=7`; a part that does not parse is skipped.
    for part in counts.split(',') {
        if let Some((reason, n)) = part.split_once('=')
            && let Ok(n) = n.trim().parse::<u64>()
        {
            *by_reason.entry(reason.trim().to_owned()).or_default() += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn pod(ns: &str, phase: &str, created: &str, extra: serde_json::Value) -> Pod {
        let mut v = json!({
            "metadata": {"name": "p", "namespace": ns, "creationTimestamp": created},
            "status": {"phase": phase},
        });
        if let (Some(m), Some(e)) = (v["metadata"].as_object_mut(), extra.as_object()) {
            m.extend(e.clone());
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn pods_are_counted_as_the_webhook_counts_them() {
        let now = at("2026-03-01T10:00:00Z");
        let mut t = BTreeMap::new();
        for p in [
            pod("ci", "Pending", "2026-03-01T09:59:30Z", json!({})),
            pod("ci", "Running", "2026-03-01T09:59:00.5Z", json!({})),
            pod("ci", "Running", "2026-03-01T09:58:00Z", json!({})),
            pod("ci", "Succeeded", "2026-03-01T09:59:59Z", json!({})),
            // A DaemonSet's pod in a system namespace is live but not held to the pending cap
            // (in a tenant's namespace it would be: anyone can name a DaemonSet owner).
            pod(
                "kube-system",
                "Pending",
                "2026-03-01T09:00:00Z",
                json!({"ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "d", "uid": "u", "controller": true}]}),
            ),
            // Stamped by a server clock a little ahead of ours.
            pod("batch", "Pending", "2026-03-01T10:00:01Z", json!({})),
        ] {
            count_pod(&mut t, &p, &PodRules::default(), now);
        }
        assert_eq!(
            t["ci"],
            PodTally {
                live: 3,
                pending: 1,
                held: 0,
                created_last_minute: 3,
            }
        );
        assert_eq!(
            t["kube-system"],
            PodTally {
                live: 1,
                pending: 0,
                held: 0,
                created_last_minute: 0,
            }
        );
        assert_eq!(
            t["batch"],
            PodTally {
                live: 1,
                pending: 1,
                held: 0,
                created_last_minute: 1,
            }
        );
    }

    fn throttled(ns: &str, written: &str, counts: &str) -> Event {
        serde_json::from_value(json!({
            "metadata": {"name": format!("{ns}.throttled.1"), "namespace": ns,
                         "annotations": {"bulwark.io/refusals": counts}},
            "involvedObject": {"apiVersion": "v1", "kind": "Namespace", "name": ns, "namespace": ns},
            "reason": "Throttled",
            "reportingComponent": "bulwark-webhook",
            "eventTime": written,
            "type": "Warning",
        }))
        .unwrap()
    }

    #[test]
    fn refusals_are_summed_over_ten_minutes_from_bulwarks_events() {
        let now = at("2026-03-01T10:00:00Z");
        let mut r = BTreeMap::new();
        let mut other = throttled("ci", "2026-03-01T09:59:00Z", "rate=1000");
        other.reporting_component = Some("someone-else".into());
        for e in [
            throttled("batch", "2026-03-01T09:59:50Z", "max_pending=2"),
            throttled("batch", "2026-03-01T09:58:50Z", "max_pending=151,rate=7"),
            throttled("batch", "2026-03-01T09:50:01Z", "max_pending=10"),
            // Older than ten minutes.
            throttled("batch", "2026-03-01T09:49:59Z", "max_pending=500"),
            throttled("ci", "2026-03-01T09:59:00Z", "max_pods=3,garbage,rate=x"),
            other,
        ] {
            count_event(&mut r, &e, now);
        }
        assert_eq!(
            r["batch"],
            [("max_pending".to_owned(), 163), ("rate".to_owned(), 7)].into()
        );
        assert_eq!(r["ci"], [("max_pods".to_owned(), 3)].into());
    }
}
