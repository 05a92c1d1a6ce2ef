//! Carries out a plan's actions against the API server. Every write is a read-modify-replace
//! carrying the resourceVersion it read (a conflict reads again), retried with jittered
//! exponential back-off; a 429 waits at least the `Retry-After` the server asked for.

use std::time::{Duration, SystemTime};

use k8s_openapi::{
    api::core::v1::{Node, Taint},
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Client,
    api::{
        ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
    },
};

use super::{
    CAPI_DELETE_MACHINE, MARKED_ANNOTATION, NodeView, REMOVAL_TAINT, Removal, UNHEALTHY_TAINT,
    plan::Action,
};
use crate::backoff::Jittered;

#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("API request failed: {0}")]
    Api(#[from] kube::Error),
    #[error("removal command {command:?} failed: {why}")]
    Exec { command: String, why: String },
}

/// What an action came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionOutcome {
    Done,
    /// `--dry-run`: only logged and reported.
    DryRun,
    /// The node was already as wanted, or is gone.
    Unchanged,
    /// Not done, and why (e.g. nothing would replace the node).
    Refused(String),
}

pub struct Executor {
    client: Client,
    nodes: Api<Node>,
    removal: Removal,
    dry_run: bool,
}

const ATTEMPTS: u32 = 6;

/// Retries `op` on conflicts, throttling and server errors; other errors end it.
async fn retrying<T, F, Fut>(op: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let backoff = Jittered::new(Duration::from_millis(200), Duration::from_secs(10));
    retrying_with(backoff, op).await
}

async fn retrying_with<T, F, Fut>(mut backoff: Jittered, mut op: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let err = match op().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let pause = match &err {
            kube::Error::Api(s) if s.code == 409 => Duration::ZERO,
            kube::Error::Api(s) if s.code == 429 => {
                let asked = s
                    .details
                    .as_ref()
                    .map_or(0, |d| u64::from(d.retry_after_seconds));
                backoff
                    .next()
                    .unwrap_or_default()
                    .max(Duration::from_secs(asked))
            }
            kube::Error::Api(s) if s.code < 500 => return Err(err),
            _ => backoff.next().unwrap_or_default(),
        };
        if attempt >= ATTEMPTS {
            return Err(err);
        }
        tracing::debug!(error = %err, ?pause, attempt, "API write failed; retrying");
        tokio::time::sleep(pause).await;
    }
}

/// A taint value must be a label value: at most 63 of `[A-Za-z0-9-_.]`, alphanumeric ends.
fn taint_value(reason: &str) -> String {
    let clean: String = reason
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    clean
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

fn now_time() -> Option<Time> {
    k8s_openapi::jiff::Timestamp::try_from(SystemTime::now())
        .ok()
        .map(Time)
}

fn set_taint(node: &mut Node, key: &str, value: &str) -> bool {
    let taints = node
        .spec
        .get_or_insert_with(Default::default)
        .taints
        .get_or_insert_with(Vec::new);
    if taints.iter().any(|t| t.key == key) {
        return false;
    }
    taints.push(Taint {
        key: key.to_owned(),
        value: Some(taint_value(value)),
        effect: "NoSchedule".to_owned(),
        time_added: now_time(),
    });
    true
}

impl Executor {
    pub fn new(client: Client, removal: Removal, dry_run: bool) -> Self {
        Executor {
            nodes: Api::all(client.clone()),
            client,
            removal,
            dry_run,
        }
    }

    /// Reads the node, lets `change` edit it, and writes it back if it changed.
    async fn update_node(
        &self,
        name: &str,
        change: impl Fn(&mut Node) -> bool,
    ) -> Result<ActionOutcome, kube::Error> {
        retrying(|| async {
            let Some(mut node) = self.nodes.get_opt(name).await? else {
                return Ok(ActionOutcome::Unchanged);
            };
            if !change(&mut node) {
                return Ok(ActionOutcome::Unchanged);
            }
            self.nodes
                .replace(name, &PostParams::default(), &node)
                .await?;
            Ok(ActionOutcome::Done)
        })
        .await
    }

    pub async fn apply(
        &self,
        action: &Action,
        view: &NodeView,
    ) -> Result<ActionOutcome, ActionError> {
        if self.dry_run {
            return Ok(ActionOutcome::DryRun);
        }
        match action {
            Action::Taint { node, reason } => Ok(self
                .update_node(node, |n| set_taint(n, UNHEALTHY_TAINT, reason))
                .await?),
            Action::Restore { node } => Ok(self
                .update_node(node, |n| {
                    let mut changed = false;
                    if let Some(taints) = n.spec.as_mut().and_then(|s| s.taints.as_mut()) {
                        let before = taints.len();
                        taints.retain(|t| t.key != UNHEALTHY_TAINT && t.key != REMOVAL_TAINT);
                        changed |= taints.len() != before;
                    }
                    if let Some(a) = n.metadata.annotations.as_mut() {
                        changed |= a.remove(MARKED_ANNOTATION).is_some();
                    }
                    changed
                })
                .await?),
            Action::Remove { node, reason } => self.remove(node, reason, view).await,
        }
    }

    async fn remove(
        &self,
        name: &str,
        reason: &str,
        view: &NodeView,
    ) -> Result<ActionOutcome, ActionError> {
        // Cluster API: only a Machine that something owns (a MachineSet) gets replaced.
        let machine = match self.removal {
            Removal::ClusterApi => match self.machine_of(name).await? {
                Ok(m) => Some(m),
                Err(why) => return Ok(ActionOutcome::Refused(why)),
            },
            _ => None,
        };
        // Recorded first: whatever happens next, the node is never acted on twice.
        let stamp = format!(
            "{} {}",
            now_time().map(|t| t.0.to_string()).unwrap_or_default(),
            reason
        );
        self.update_node(name, |n| {
            let fresh = n
                .metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(MARKED_ANNOTATION.to_owned(), stamp.clone())
                .is_none();
            set_taint(n, REMOVAL_TAINT, reason) || fresh
        })
        .await?;
        match &self.removal {
            Removal::Annotate => Ok(ActionOutcome::Done),
            Removal::DeleteNode => {
                retrying(|| async {
                    match self.nodes.delete(name, &Default::default()).await {
                        Ok(_) => Ok(()),
                        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
                        Err(e) => Err(e),
                    }
                })
                .await?;
                Ok(ActionOutcome::Done)
            }
            Removal::ClusterApi => {
                let Some((api, machine)) = machine else {
                    return Ok(ActionOutcome::Refused("no Machine".into()));
                };
                let patch =
                    serde_json::json!({"metadata": {"annotations": {CAPI_DELETE_MACHINE: "yes"}}});
                retrying(|| async {
                    api.patch(&machine, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                })
                .await?;
                Ok(ActionOutcome::Done)
            }
            Removal::Exec(command) => self.exec(command, name, reason, view).await,
        }
    }

    /// The node's Machine, if Cluster API manages it and a controller owns the Machine. Found
    /// by the node's `spec.providerID` among all Machines, never by the node's annotations:
    /// a kubelet may write any annotation on its Node, but not change a providerID once set.
    async fn machine_of(
        &self,
        name: &str,
    ) -> Result<Result<(Api<DynamicObject>, String), String>, kube::Error> {
        let Some(node) = self.nodes.get_opt(name).await? else {
            return Ok(Err("the node is gone".into()));
        };
        let provider_id = node
            .spec
            .and_then(|s| s.provider_id)
            .filter(|p| !p.is_empty());
        let Some(provider_id) = provider_id else {
            return Ok(Err(
                "the node has no providerID, so no Cluster API Machine can be told apart".into(),
            ));
        };
        let resource =
            ApiResource::from_gvk(&GroupVersionKind::gvk(CAPI_GROUP, CAPI_VERSION, "Machine"));
        let all: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
        let machines = all.list(&ListParams::default()).await?.items;
        let machine = match machine_for(name, &provider_id, &machines) {
            Ok(m) => m,
            Err(why) => return Ok(Err(why)),
        };
        let ns = machine.metadata.namespace.clone().unwrap_or_default();
        let machine_name = machine.metadata.name.clone().unwrap_or_default();
        let api = Api::namespaced_with(self.client.clone(), &ns, &resource);
        Ok(Ok((api, machine_name)))
    }

    async fn exec(
        &self,
        command: &[String],
        name: &str,
        reason: &str,
        view: &NodeView,
    ) -> Result<ActionOutcome, ActionError> {
        let shown = command.join(" ");
        let fail = |why: String| ActionError::Exec {
            command: shown.clone(),
            why,
        };
        let (program, args) = command
            .split_first()
            .ok_or_else(|| fail("empty command".into()))?;
        let run = tokio::process::Command::new(program)
            .args(args)
            .env("BULWARK_NODE", name)
            .env(
                "BULWARK_PROVIDER_ID",
                view.provider_id.as_deref().unwrap_or_default(),
            )
            .env("BULWARK_REASON", reason)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .map_err(|_| fail("did not finish within 120s".into()))?
            .map_err(|e| fail(e.to_string()))?;
        if out.status.success() {
            Ok(ActionOutcome::Done)
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr);
            Err(fail(format!("{}: {}", out.status, stderr.trim())))
        }
    }
}

/// Cluster API's Machines, as `cluster.x-k8s.io/v1beta1` serves them.
const CAPI_GROUP: &str = "cluster.x-k8s.io";
const CAPI_VERSION: &str = "v1beta1";

/// Pure: the one Machine among `machines` whose `spec.providerID` is `provider_id`, if a
/// controller owns it (something will replace it) and its `status.nodeRef` (written by Cluster
/// API, not the node) names no other node; otherwise why not.
pub fn machine_for<'a>(
    node: &str,
    provider_id: &str,
    machines: &'a [DynamicObject],
) -> Result<&'a DynamicObject, String> {
    let field = |m: &DynamicObject, pointer: &str| {
        m.data
            .pointer(pointer)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    let shown = |m: &DynamicObject| {
        format!(
            "{}/{}",
            m.metadata.namespace.as_deref().unwrap_or_default(),
            m.metadata.name.as_deref().unwrap_or_default()
        )
    };
    let matching: Vec<&DynamicObject> = machines
        .iter()
        .filter(|m| field(m, "/spec/providerID").as_deref() == Some(provider_id))
        .collect();
    let machine = match matching.as_slice() {
        [] => {
            return Err(format!(
                "no Cluster API Machine has providerID {provider_id}"
            ));
        }
        [one] => *one,
        more => {
            let names: Vec<String> = more.iter().map(|m| shown(m)).collect();
            return Err(format!(
                "{} Machines have providerID {provider_id} ({}): not guessing which",
                more.len(),
                names.join(", ")
            ));
        }
    };
    if let Some(other) = field(machine, "/status/nodeRef/name").filter(|n| n != node) {
        return Err(format!(
            "Machine {} belongs to node {other}, not to this node",
            shown(machine)
        ));
    }
    let owned = machine
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true));
    if !owned {
        return Err(format!(
            "Machine {} has no controller owner, so nothing would replace it",
            shown(machine)
        ));
    }
    Ok(machine)
}

#[cfg(test)]
mod api_tests;

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn api_error(code: u16, retry_after: u32) -> kube::Error {
        let status = serde_json::json!({
            "code": code, "details": {"retryAfterSeconds": retry_after},
        });
        kube::Error::Api(Box::new(serde_json::from_value(status).unwrap()))
    }

    #[tokio::test]
    async fn conflicts_retry_at_once_and_client_errors_do_not_retry() {
        let calls = AtomicU32::new(0);
        let start = std::time::Instant::now();
        let r = retrying(|| async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0 | 1 => Err(api_error(409, 0)),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(r.ok(), Some(2));
        assert!(
            start.elapsed() < Duration::from_millis(100),
            "409 does not wait"
        );

        calls.store(0, Ordering::SeqCst);
        let r: Result<(), _> = retrying(|| async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(api_error(403, 0))
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn throttling_waits_at_least_retry_after() {
        let calls = AtomicU32::new(0);
        let start = std::time::Instant::now();
        let r = retrying(|| async {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(api_error(429, 1))
            } else {
                Ok(())
            }
        })
        .await;
        assert!(r.is_ok());
        assert!(
            start.elapsed() >= Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );

        // Server errors back off and give up after a bounded number of attempts.
        calls.store(0, Ordering::SeqCst);
        let quick = Jittered::new(Duration::from_millis(1), Duration::from_millis(2));
        let r: Result<(), _> = retrying_with(quick, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(api_error(503, 0))
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), ATTEMPTS);
    }

    #[test]
    fn taint_values_are_label_values() {
        assert_eq!(taint_value("NotReady-LeaseStale"), "NotReady-LeaseStale");
        assert_eq!(taint_value("a b/c"), "a-b-c");
        assert_eq!(taint_value(&"X".repeat(80)).len(), 63);
        assert_eq!(taint_value("-odd-"), "odd");
    }

    #[test]
    fn taints_are_added_once() {
        let mut n = Node::default();
        assert!(set_taint(&mut n, UNHEALTHY_TAINT, "NotReady"));
        assert!(!set_taint(&mut n, UNHEALTHY_TAINT, "KernelDeadlock"));
        let taints = n.spec.and_then(|s| s.taints).unwrap_or_default();
        assert_eq!(taints.len(), 1);
        assert_eq!(taints[0].value.as_deref(), Some("NotReady"));
        assert_eq!(taints[0].effect, "NoSchedule");
        assert!(taints[0].time_added.is_some());
    }
}
