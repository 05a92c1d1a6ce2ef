//! The requests the executor makes for each action: a read-modify-replace of the Node
//! carrying the resourceVersion it read, and for `delete-node` the DELETE after the mark.

use http::Method;
use serde_json::{Value, json};

use super::*;
use crate::testing::{ApiServer, Reply};

const NODE: &str = "/api/v1/nodes/n1";
const OTHER_TAINT: (&str, &str) = ("example.com/dedicated", "batch");

fn view() -> NodeView {
    NodeView {
        name: "n1".into(),
        zone: Some("eu-west-1a".into()),
        provider_id: Some("aws:///eu-west-1a/i-0abc".into()),
        signals: Vec::new(),
        heartbeat_late: false,
        tainted_since: None,
        marked: false,
        marked_at: None,
        opted_out: false,
        autoscaler_deleting: false,
    }
}

/// Node `n1` as the API server returns it, with these taints (key, value) and annotations.
fn node(resource_version: &str, taints: &[(&str, &str)], annotations: Value) -> Value {
    let taints: Vec<Value> = taints
        .iter()
        .map(|(key, value)| json!({"key": key, "value": value, "effect": "NoSchedule"}))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": "n1",
            "resourceVersion": resource_version,
            "labels": {"kubernetes.io/hostname": "n1", "topology.kubernetes.io/zone": "eu-west-1a"},
            "annotations": annotations,
        },
        "spec": {"providerID": "aws:///eu-west-1a/i-0abc", "taints": taints},
        "status": {"conditions": [{"type": "Ready", "status": "False", "reason": "KubeletNotReady"}]},
    })
}

/// The written node's taints as (key, value, effect).
fn taints(body: &Value) -> Vec<(String, String, String)> {
    let field = |t: &Value, name: &str| t[name].as_str().unwrap_or_default().to_owned();
    body["spec"]["taints"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .map(|t| (field(t, "key"), field(t, "value"), field(t, "effect")))
                .collect()
        })
        .unwrap_or_default()
}

fn taint(key: &str, value: &str) -> (String, String, String) {
    (key.into(), value.into(), "NoSchedule".into())
}

/// The node carries `OTHER_TAINT` and `bulwark.io/unhealthy=NotReady:NoSchedule`.
fn tainted_not_ready(body: &Value) {
    assert_eq!(
        taints(body),
        [
            taint(OTHER_TAINT.0, OTHER_TAINT.1),
            taint(UNHEALTHY_TAINT, "NotReady")
        ]
    );
    assert!(body["spec"]["taints"][1]["timeAdded"].is_string());
}

async fn applied(server: ApiServer, removal: Removal, action: Action) -> ActionOutcome {
    server
        .run(|client| async move {
            let executor = Executor::new(client, removal, false);
            executor.apply(&action, &view()).await
        })
        .await
        .expect("applied")
}

fn taint_not_ready() -> Action {
    Action::Taint {
        node: "n1".into(),
        reason: "NotReady".into(),
    }
}

/// Node `n1` without bulwark's taints (only `OTHER_TAINT`).
fn untainted(resource_version: &str) -> Value {
    node(resource_version, &[OTHER_TAINT], json!({}))
}

/// Taints `n1` as `NotReady`.
async fn tainted(server: ApiServer) -> ActionOutcome {
    applied(server, Removal::Annotate, taint_not_ready()).await
}

#[tokio::test]
async fn taint_replaces_the_node_with_the_taint_added() {
    let server = ApiServer::new()
        .get(NODE, Reply::Json(untainted("7")))
        .replace(NODE, "7")
        .body(tainted_not_ready)
        .respond(Reply::Stored);
    assert_eq!(tainted(server).await, ActionOutcome::Done);
}

#[tokio::test]
async fn a_conflicting_taint_reads_the_node_again_and_writes_again() {
    let server = ApiServer::new()
        .get(NODE, Reply::Json(untainted("7")))
        .replace(NODE, "7")
        .respond(Reply::conflict())
        .get(NODE, Reply::Json(untainted("8")))
        .replace(NODE, "8")
        .body(tainted_not_ready)
        .respond(Reply::Stored);
    assert_eq!(tainted(server).await, ActionOutcome::Done);
}

#[tokio::test]
async fn a_node_already_tainted_is_not_written() {
    let server = ApiServer::new().get(
        NODE,
        Reply::Json(node("7", &[(UNHEALTHY_TAINT, "KernelDeadlock")], json!({}))),
    );
    assert_eq!(tainted(server).await, ActionOutcome::Unchanged);
}

#[tokio::test]
async fn restore_removes_bulwarks_taints_and_mark() {
    let read = node(
        "7",
        &[
            (UNHEALTHY_TAINT, "NotReady"),
            OTHER_TAINT,
            (REMOVAL_TAINT, "NotReady"),
        ],
        json!({MARKED_ANNOTATION: "2026-01-01T00:00:00Z NotReady", "example.com/owner": "team-a"}),
    );
    let server = ApiServer::new()
        .get(NODE, Reply::Json(read))
        .replace(NODE, "7")
        .body(|n| {
            assert_eq!(taints(n), [taint(OTHER_TAINT.0, OTHER_TAINT.1)]);
            assert_eq!(
                n["metadata"]["annotations"],
                json!({"example.com/owner": "team-a"})
            );
        })
        .respond(Reply::Stored);
    let restore = Action::Restore { node: "n1".into() };
    assert_eq!(
        applied(server, Removal::Annotate, restore).await,
        ActionOutcome::Done
    );
}

#[tokio::test]
async fn delete_node_marks_the_node_before_deleting_it() {
    let deleted = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": "n1", "kind": "nodes", "uid": "0c7d5a8e-5b1f-4c0e-9a51-3f1c2b7e9d10"},
    });
    let server = ApiServer::new()
        .get(NODE, Reply::Json(node("7", &[], json!({}))))
        .replace(NODE, "7")
        .body(|n| {
            let mark = n["metadata"]["annotations"][MARKED_ANNOTATION]
                .as_str()
                .expect("the mark");
            assert!(mark.ends_with(" NotReady"), "{mark}");
            assert_eq!(taints(n), [taint(REMOVAL_TAINT, "NotReady")]);
        })
        .respond(Reply::Stored)
        .expect(Method::DELETE, &format!("{NODE}?"))
        .respond(Reply::Json(deleted));
    let remove = Action::Remove {
        node: "n1".into(),
        reason: "NotReady".into(),
    };
    assert_eq!(
        applied(server, Removal::DeleteNode, remove).await,
        ActionOutcome::Done
    );
}

#[tokio::test]
async fn dry_run_makes_no_request() {
    let actions = [
        taint_not_ready(),
        Action::Restore { node: "n1".into() },
        Action::Remove {
            node: "n1".into(),
            reason: "NotReady".into(),
        },
    ];
    let outcomes = ApiServer::new()
        .run(|client| async move {
            let executor = Executor::new(client, Removal::DeleteNode, true);
            let mut outcomes = Vec::new();
            for action in &actions {
                outcomes.push(executor.apply(action, &view()).await.expect("applied"));
            }
            outcomes
        })
        .await;
    assert_eq!(outcomes, vec![ActionOutcome::DryRun; 3]);
}

const MACHINES: &str = "/apis/cluster.x-k8s.io/v1beta1/machines?";
const PROVIDER_ID: &str = "aws:///eu-west-1a/i-0abc";

/// A Cluster API Machine; `owned` gives it a MachineSet as controller owner.
fn machine(ns: &str, name: &str, provider_id: &str, owned: bool, node_ref: Option<&str>) -> Value {
    let owners: Vec<Value> = if owned {
        vec![json!({
            "apiVersion": "cluster.x-k8s.io/v1beta1", "kind": "MachineSet", "name": "workers",
            "uid": "5d0f8c1e-0a8e-4c53-9f0e-2b7d5c9a1e34", "controller": true,
        })]
    } else {
        Vec::new()
    };
    let mut m = json!({
        "apiVersion": "cluster.x-k8s.io/v1beta1",
        "kind": "Machine",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": "3", "ownerReferences": owners},
        "spec": {"clusterName": "prod", "providerID": provider_id},
    });
    if let Some(node) = node_ref {
        m["status"] = json!({"nodeRef": {"kind": "Node", "name": node}});
    }
    m
}

fn machine_list(items: Vec<Value>) -> Value {
    json!({
        "apiVersion": "cluster.x-k8s.io/v1beta1",
        "kind": "MachineList",
        "metadata": {"resourceVersion": "9"},
        "items": items,
    })
}

/// Node `n1` whose own annotations name another Machine: what a compromised kubelet could
/// write to have bulwark delete a Machine of its choosing.
fn node_naming_victim() -> Value {
    node(
        "7",
        &[],
        json!({"cluster.x-k8s.io/machine": "victim", "cluster.x-k8s.io/cluster-namespace": "payments"}),
    )
}

/// A Machine the node's forged annotations point at: another node's, owned, replaceable.
fn victim() -> Value {
    machine(
        "payments",
        "victim",
        "aws:///eu-west-1b/i-0fff",
        true,
        Some("n9"),
    )
}

fn remove_not_ready() -> Action {
    Action::Remove {
        node: "n1".into(),
        reason: "NotReady".into(),
    }
}

#[tokio::test]
async fn cluster_api_marks_the_machine_with_the_nodes_provider_id() {
    let ours = machine("capi", "workers-abc", PROVIDER_ID, true, Some("n1"));
    let server = ApiServer::new()
        .get(NODE, Reply::Json(node_naming_victim()))
        .get(MACHINES, Reply::Json(machine_list(vec![victim(), ours])))
        .get(NODE, Reply::Json(node_naming_victim()))
        .replace(NODE, "7")
        .body(|n| assert!(n["metadata"]["annotations"][MARKED_ANNOTATION].is_string()))
        .respond(Reply::Stored)
        .expect(
            Method::PATCH,
            "/apis/cluster.x-k8s.io/v1beta1/namespaces/capi/machines/workers-abc?",
        )
        .body(|p| {
            assert_eq!(
                p,
                &json!({"metadata": {"annotations": {CAPI_DELETE_MACHINE: "yes"}}})
            );
        })
        .respond(Reply::Json(machine(
            "capi",
            "workers-abc",
            PROVIDER_ID,
            true,
            Some("n1"),
        )));
    assert_eq!(
        applied(server, Removal::ClusterApi, remove_not_ready()).await,
        ActionOutcome::Done
    );
}

/// The outcome when the Machines are `machines`: refused before anything is written.
async fn refused_with(machines: Vec<Value>) -> String {
    let server = ApiServer::new()
        .get(NODE, Reply::Json(node_naming_victim()))
        .get(MACHINES, Reply::Json(machine_list(machines)));
    match applied(server, Removal::ClusterApi, remove_not_ready()).await {
        ActionOutcome::Refused(why) => why,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn cluster_api_ignores_the_machine_the_nodes_annotations_name() {
    // Only the Machine the annotations name exists: it is not the node's, and is left alone.
    let why = refused_with(vec![victim()]).await;
    assert_eq!(
        why,
        format!("no Cluster API Machine has providerID {PROVIDER_ID}")
    );
}

#[tokio::test]
async fn cluster_api_refuses_a_machine_nothing_would_replace() {
    let unowned = machine("capi", "lonely", PROVIDER_ID, false, Some("n1"));
    let why = refused_with(vec![victim(), unowned]).await;
    assert!(why.contains("capi/lonely has no controller owner"), "{why}");
}

#[tokio::test]
async fn cluster_api_refuses_a_node_without_provider_id() {
    let mut bare = node_naming_victim();
    bare["spec"]
        .as_object_mut()
        .expect("a spec")
        .remove("providerID");
    let server = ApiServer::new().get(NODE, Reply::Json(bare));
    let outcome = applied(server, Removal::ClusterApi, remove_not_ready()).await;
    assert!(
        matches!(&outcome, ActionOutcome::Refused(why) if why.contains("no providerID")),
        "{outcome:?}"
    );
}

#[test]
fn machine_for_trusts_only_the_provider_id_and_cluster_apis_own_fields() {
    let parse = |v: Value| -> DynamicObject { serde_json::from_value(v).expect("a Machine") };
    let ours = parse(machine("capi", "a", PROVIDER_ID, true, Some("n1")));
    let not_yet_linked = parse(machine("capi", "b", PROVIDER_ID, true, None));
    let others_node = parse(machine("capi", "c", PROVIDER_ID, true, Some("n2")));
    let found = machine_for("n1", PROVIDER_ID, std::slice::from_ref(&ours));
    assert_eq!(found.map(|m| m.metadata.name.clone()), Ok(Some("a".into())));
    assert!(machine_for("n1", PROVIDER_ID, std::slice::from_ref(&not_yet_linked)).is_ok());
    // A node that set another node's providerID still does not get that node's Machine.
    let why = machine_for("n1", PROVIDER_ID, std::slice::from_ref(&others_node)).unwrap_err();
    assert!(why.contains("belongs to node n2"), "{why}");
    // Two Machines with one providerID: no guess.
    let why = machine_for("n1", PROVIDER_ID, &[ours, not_yet_linked]).unwrap_err();
    assert!(why.contains("2 Machines have providerID"), "{why}");
}
