//! Removing bulwark's gate from one pod, as one JSON patch that first tests the gate is the
//! one at the index it removes: a gate of someone else's is never touched, and a pod whose
//! gates moved is read again rather than patched blind.

use std::fmt;

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use serde_json::json;

use crate::{
    cluster::events::truncate,
    policy::pod::{HOLD_GATE, hold_gate},
    quota::line::{Release, Why},
};

/// How one release ended.
#[derive(Debug)]
pub enum Outcome {
    Released,
    /// The pod is gone, or no longer carries the gate.
    Gone,
    Failed(kube::Error),
}

/// The JSON patch removing the gate at `index`, if it is bulwark's.
pub fn patch(index: usize) -> Result<json_patch::Patch, serde_json::Error> {
    serde_json::from_value(json!([
        {"op": "test", "path": format!("/spec/schedulingGates/{index}/name"), "value": HOLD_GATE},
        {"op": "remove", "path": format!("/spec/schedulingGates/{index}")}
    ]))
}

/// What the pod's Event says.
pub fn note(r: &Release) -> String {
    let why = match r.why {
        Why::Room => format!(
            "the pending caps of namespace {:?} have room",
            &*r.namespace
        ),
        Why::NotEnforced => format!("namespace {:?} no longer enforces limits", &*r.namespace),
        Why::Told => "bulwark release --all was run".to_owned(),
    };
    format!("bulwark removed scheduling gate {HOLD_GATE}: {why}")
}

pub struct Releaser {
    client: Client,
    recorder: Recorder,
}

impl fmt::Debug for Releaser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Releaser")
    }
}

/// The statuses kube-apiserver answers a JSON patch whose test failed or whose index is out
/// of range with (`handlers/patch.go`'s `interpretPatchError`, and validation).
fn gates_moved(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if matches!(s.code, 400 | 409 | 422))
}

fn gone(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

impl Releaser {
    pub fn new(client: Client, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: "bulwark-webhook".into(),
            instance,
        };
        Releaser {
            recorder: Recorder::new(client.clone(), reporter),
            client,
        }
    }

    /// Removes the gate from the pod `r` names, then writes its Event.
    pub async fn release(&self, r: &Release) -> Outcome {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &r.namespace);
        let outcome = remove(&api, &r.name, usize::from(r.gate)).await;
        if let Outcome::Released = outcome {
            let event = Event {
                type_: EventType::Normal,
                reason: "Released".into(),
                note: Some(truncate(note(r), 1000)),
                action: "Release".into(),
                secondary: None,
            };
            let pod = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(r.name.to_string()),
                namespace: Some(r.namespace.to_string()),
                ..ObjectReference::default()
            };
            if let Err(e) = self.recorder.publish(&event, &pod).await {
                tracing::debug!(error = %e, "publishing the release Event failed");
            }
        }
        outcome
    }

    /// Releases every pod of the cluster that carries bulwark's gate (`bulwark release
    /// --all`, before uninstalling): returns how many were released and how many failed.
    pub async fn release_all(&self) -> Result<(usize, Vec<String>), kube::Error> {
        let all: Api<Pod> = Api::all(self.client.clone());
        let mut params = ListParams::default().limit(500);
        let mut released = 0;
        let mut failed = Vec::new();
        loop {
            let page = all.list(&params).await?;
            for pod in &page.items {
                let (Some(ns), Some(name), Some(gate)) = (
                    pod.metadata.namespace.as_deref(),
                    pod.metadata.name.as_deref(),
                    hold_gate(pod),
                ) else {
                    continue;
                };
                let r = Release {
                    namespace: ns.into(),
                    name: name.into(),
                    gate: u16::try_from(gate).unwrap_or(u16::MAX),
                    created: 0,
                    why: Why::Told,
                };
                match self.release(&r).await {
                    Outcome::Released => released += 1,
                    Outcome::Gone => {}
                    Outcome::Failed(e) => failed.push(format!("{ns}/{name}: {e}")),
                }
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(next) => params = params.continue_token(&next),
                None => return Ok((released, failed)),
            }
        }
    }
}

/// Removes the gate at `index`; when it is not there, reads the pod once and tries where it is.
async fn remove(api: &Api<Pod>, name: &str, index: usize) -> Outcome {
    let mut index = index;
    for attempt in 0..2 {
        let patch = match patch(index) {
            Ok(p) => p,
            Err(e) => return Outcome::Failed(kube::Error::SerdeError(e)),
        };
        match api
            .patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await
        {
            Ok(_) => return Outcome::Released,
            Err(e) if gone(&e) => return Outcome::Gone,
            Err(e) if attempt == 0 && gates_moved(&e) => match api.get_opt(name).await {
                Ok(Some(pod)) => match hold_gate(&pod) {
                    Some(at) => index = at,
                    None => return Outcome::Gone,
                },
                Ok(None) => return Outcome::Gone,
                Err(e) => return Outcome::Failed(e),
            },
            Err(e) => return Outcome::Failed(e),
        }
    }
    Outcome::Gone
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_patch_removes_only_bulwarks_gate() {
        let mut pod = json!({"spec": {"schedulingGates": [
            {"name": "example.com/x"}, {"name": HOLD_GATE}, {"name": "example.com/y"}
        ]}});
        json_patch::patch(&mut pod, &patch(1).unwrap().0).unwrap();
        assert_eq!(
            pod["spec"]["schedulingGates"],
            json!([{"name": "example.com/x"}, {"name": "example.com/y"}])
        );
        // At an index holding someone else's gate the test fails and nothing changes.
        let before = pod.clone();
        assert!(json_patch::patch(&mut pod, &patch(0).unwrap().0).is_err());
        assert_eq!(pod, before);
    }

    #[test]
    fn the_event_says_why() {
        let r = Release {
            namespace: "ci".into(),
            name: "p".into(),
            gate: 0,
            created: 0,
            why: Why::Room,
        };
        assert_eq!(
            note(&r),
            "bulwark removed scheduling gate bulwark.io/pending-cap: the pending caps of namespace \"ci\" have room"
        );
    }
}
