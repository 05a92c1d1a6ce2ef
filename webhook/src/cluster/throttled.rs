//! Throttled Events: once a second, the reports [`Throttled`] says are due become Warning
//! Events, one per namespace, written off the admission path (which only counted). Without an
//! API server (offline) they are logged only.
//!
//! Each Event lives in the namespace it is about and regards that Namespace, so whoever may
//! read the namespace's Events sees it (`kubectl get events -n NS`, `kubectl bulwark status`),
//! and it goes away with the namespace. An Event in a namespace must name it as its object's
//! namespace (kube-apiserver's Event validation), hence `regarding.namespace` is set although
//! a Namespace has none.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};

use super::events::truncate;
use crate::quota::throttled::{Report, Throttled};

/// The Event's reason.
pub const REASON: &str = "Throttled";
/// Who writes it (`reportingController`; `reportingComponent` in core/v1 Events).
pub const REPORTER: &str = "bulwark-webhook";
/// The counts by refusal reason, e.g. `max_pending=153,rate=7`, for `bulwark status`.
pub const COUNTS_ANNOTATION: &str = "bulwark.io/refusals";
/// The seconds the counts cover.
pub const WINDOW_ANNOTATION: &str = "bulwark.io/window-seconds";

/// How often the publisher asks what is due: a namespace's first refusal shows within it.
const TICK: Duration = Duration::from_secs(1);

/// At most this many Events a tick: thousands of namespaces refused at once are reported
/// over the next ticks (their counts keep adding up meanwhile), not in one storm.
const MAX_PER_TICK: usize = 10;

/// Events cap their note at 1 kB.
const MAX_NOTE: usize = 1000;

/// Starts the publisher. `instance` names this replica in the Events (its pod name).
pub fn spawn(
    client: Option<Client>,
    instance: Option<String>,
    throttled: Arc<Throttled>,
) -> tokio::task::JoinHandle<()> {
    let instance = instance.unwrap_or_else(|| REPORTER.to_owned());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        // A slow API server delays the next tick rather than bunching the ones missed.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for report in throttled.due(Instant::now(), MAX_PER_TICK) {
                let message = report.message();
                tracing::info!(namespace = %report.namespace, refused = report.total(), "throttled: {message}");
                let Some(client) = &client else { continue };
                let event = event(&report, &instance, Timestamp::now());
                if let Err(e) = publish(client, &event).await {
                    tracing::warn!(namespace = %report.namespace, error = %e, "publishing the Throttled Event failed");
                }
            }
        }
    })
}

/// The Event for `report`, written at `at` by `instance`.
pub fn event(report: &Report, instance: &str, at: Timestamp) -> Event {
    let ns = &report.namespace;
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{ns}.throttled.{:x}", at.as_nanosecond())),
            namespace: Some(ns.clone()),
            annotations: Some(
                [
                    (COUNTS_ANNOTATION.to_owned(), report.counts()),
                    (
                        WINDOW_ANNOTATION.to_owned(),
                        report.window_seconds().to_string(),
                    ),
                ]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(at)),
        type_: Some("Warning".into()),
        reason: Some(REASON.into()),
        action: Some("RefusePodCreation".into()),
        note: Some(truncate(report.message(), MAX_NOTE)),
        regarding: Some(ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Namespace".into()),
            name: Some(ns.clone()),
            namespace: Some(ns.clone()),
            ..ObjectReference::default()
        }),
        reporting_controller: Some(REPORTER.into()),
        reporting_instance: Some(instance.to_owned()),
        ..Event::default()
    }
}

/// Creates `event` in its namespace.
pub async fn publish(client: &Client, event: &Event) -> Result<(), kube::Error> {
    let ns = event.metadata.namespace.as_deref().unwrap_or("default");
    Api::<Event>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), event)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        quota::refusal::Refusal,
        testing::{ApiServer, Reply},
    };

    fn report() -> Report {
        let throttled = Throttled::new();
        let t = Instant::now();
        let refusal = Refusal::MaxPending {
            pending: 20,
            limit: 20,
            expected: Duration::from_secs(1),
        };
        for _ in 0..153 {
            throttled.refused("batch", &refusal, t);
        }
        throttled
            .due(t + Duration::from_secs(60), 10)
            .pop()
            .expect("due")
    }

    #[tokio::test]
    async fn the_event_is_created_in_the_namespace_it_regards() {
        let at: Timestamp = "2026-03-01T10:00:00Z".parse().unwrap();
        let event = event(&report(), "bulwark-webhook-abc", at);
        ApiServer::new()
            .expect(
                http::Method::POST,
                "/apis/events.k8s.io/v1/namespaces/batch/events?",
            )
            .body(|e| {
                assert_eq!(e["metadata"]["namespace"], "batch");
                assert!(
                    e["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("batch.throttled.")),
                    "{e}"
                );
                assert_eq!(e["metadata"]["annotations"]["bulwark.io/refusals"], "max_pending=153");
                assert_eq!(e["metadata"]["annotations"]["bulwark.io/window-seconds"], "60");
                assert_eq!(e["type"], "Warning");
                assert_eq!(e["reason"], "Throttled");
                assert_eq!(
                    e["note"],
                    "refused 153 pod creations in the last 60s: max-pending-pods 20 (annotation bulwark.io/max-pending-pods)"
                );
                assert_eq!(
                    e["regarding"],
                    serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "name": "batch", "namespace": "batch"})
                );
                assert_eq!(e["reportingController"], "bulwark-webhook");
                assert_eq!(e["reportingInstance"], "bulwark-webhook-abc");
                assert_eq!(e["eventTime"], "2026-03-01T10:00:00.000000Z");
            })
            .respond(Reply::Stored)
            .run(|client| async move { publish(&client, &event).await })
            .await
            .expect("created");
    }

    #[tokio::test]
    async fn a_refused_write_is_an_error_for_the_log() {
        let event = event(&report(), "r", Timestamp::now());
        let result = ApiServer::new()
            .expect(
                http::Method::POST,
                "/apis/events.k8s.io/v1/namespaces/batch/events?",
            )
            .respond(Reply::Failure {
                code: 403,
                reason: "Forbidden",
            })
            .run(|client| async move { publish(&client, &event).await })
            .await;
        assert!(matches!(result, Err(kube::Error::Api(s)) if s.code == 403));
    }
}
