//! Warning Events on namespaces whose annotations are invalid, written off the admission path
//! through a bounded queue: a slow or failing API server delays Events, never admissions.

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Client, Resource, ResourceExt,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use tokio::sync::mpsc;

use crate::policy::Problem;

/// Invalid annotations of one namespace, to be published as an Event.
pub struct ProblemReport {
    pub ns: Namespace,
    pub problems: Vec<Problem>,
}

pub type Reports = mpsc::Sender<ProblemReport>;

/// Events waiting to be written; past this, new ones are dropped (and logged).
const QUEUE: usize = 256;

/// Events cap their note at 1 kB.
const MAX_NOTE: usize = 1000;

/// Starts the publisher; reports sent to the returned queue become Events. `instance` names
/// this replica in them (its pod name).
pub fn spawn(client: Client, instance: Option<String>) -> Reports {
    let (tx, rx) = mpsc::channel(QUEUE);
    let reporter = Reporter {
        controller: "bulwark-webhook".into(),
        instance,
    };
    tokio::spawn(publish(Recorder::new(client, reporter), rx));
    tx
}

/// `note` cut to at most `max` bytes on a character boundary.
pub fn truncate(mut note: String, max: usize) -> String {
    if let Some(cut) = (0..=max.min(note.len()))
        .rev()
        .find(|&i| note.is_char_boundary(i))
    {
        note.truncate(cut);
    }
    note
}

async fn publish(recorder: Recorder, mut reports: mpsc::Receiver<ProblemReport>) {
    while let Some(ProblemReport { ns, problems }) = reports.recv().await {
        let note: Vec<String> = problems.iter().map(ToString::to_string).collect();
        let event = Event {
            type_: EventType::Warning,
            reason: "InvalidAnnotation".into(),
            note: Some(truncate(note.join("; "), MAX_NOTE)),
            action: "ParsePolicy".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &ns.object_ref(&())).await {
            tracing::warn!(namespace = %ns.name_any(), error = %e, "publishing Event failed");
        }
    }
}
