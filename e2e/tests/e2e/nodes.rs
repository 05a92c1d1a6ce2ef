//! The node controller against kwok nodes. A node is made unhealthy by taking it away from
//! kwok (its Lease stops being renewed, as when a kubelet dies) and, where a test says so, by
//! setting a node-problem-detector condition; it is made healthy again by handing it back.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, ensure};
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{Event as CoreEvent, Node},
    },
    jiff::Timestamp,
};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::json;

use crate::support::{Ctx, eventually};

pub const UNHEALTHY_TAINT: &str = "bulwark.io/unhealthy";
const MARKED: &str = "bulwark.io/marked-for-removal";
/// bulwark's removal taint: its `timeAdded` is when the node was marked.
pub const REMOVAL_TAINT: &str = "bulwark.io/marked-for-removal";
const KWOK_ANNOTATION: &str = "kwok.x-k8s.io/node";
/// From the e2e cluster's config: grace 2s, removeAfter 5s, recoverAfter 3s,
/// leaseStaleAfter 6s, stormCooldown 5s.
const GRACE: Duration = Duration::from_secs(2);
const REMOVE_AFTER: Duration = Duration::from_secs(5);
const LEASE_STALE_AFTER: Duration = Duration::from_secs(6);
const STORM_COOLDOWN: Duration = Duration::from_secs(5);

pub fn nodes(ctx: &Ctx) -> Api<Node> {
    Api::all(ctx.client.clone())
}

fn now_rfc3339() -> String {
    Timestamp::now().to_string()
}

fn system_time(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> SystemTime {
    SystemTime::from(t.0)
}

/// Takes the node from kwok (no more heartbeats or lease renewals) and, with `condition`,
/// sets that node-problem-detector condition to True as of now.
pub async fn break_node(
    ctx: &Ctx,
    name: &str,
    condition: Option<&str>,
) -> anyhow::Result<SystemTime> {
    let api = nodes(ctx);
    let unmanage = json!({"metadata": {"annotations": {KWOK_ANNOTATION: null}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&unmanage))
        .await
        .with_context(|| format!("taking {name} from kwok"))?;
    let broken = SystemTime::now();
    if let Some(kind) = condition {
        let status = json!({"status": {"conditions": [{
            "type": kind, "status": "True", "reason": "E2E", "message": "set by the e2e test",
            "lastTransitionTime": now_rfc3339(), "lastHeartbeatTime": now_rfc3339(),
        }]}});
        api.patch_status(name, &PatchParams::default(), &Patch::Strategic(&status))
            .await
            .with_context(|| format!("setting {kind} on {name}"))?;
    }
    Ok(broken)
}

/// Clears the condition and gives the node back to kwok, which renews its lease again.
pub async fn heal_node(ctx: &Ctx, name: &str, condition: Option<&str>) -> anyhow::Result<()> {
    let api = nodes(ctx);
    if let Some(kind) = condition {
        let status = json!({"status": {"conditions": [{
            "type": kind, "status": "False", "reason": "E2E", "message": "cleared by the e2e test",
            "lastTransitionTime": now_rfc3339(), "lastHeartbeatTime": now_rfc3339(),
        }]}});
        api.patch_status(name, &PatchParams::default(), &Patch::Strategic(&status))
            .await?;
    }
    let manage = json!({"metadata": {"annotations": {KWOK_ANNOTATION: "fake"}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&manage))
        .await?;
    Ok(())
}

/// Waits until bulwark has lifted its taint and mark (recoverAfter 3 s after the node is
/// healthy again).
pub async fn until_restored(ctx: &Ctx, name: &str) -> anyhow::Result<()> {
    let api = nodes(ctx);
    eventually(
        Duration::from_secs(30),
        "bulwark's taint and mark lifted",
        || {
            let api = api.clone();
            async move {
                let n = api.get(name).await?;
                Ok((taint_added(&n, UNHEALTHY_TAINT).is_none() && !marked(&n)).then_some(()))
            }
        },
    )
    .await
}

pub fn taint_added(node: &Node, key: &str) -> Option<(String, Option<SystemTime>)> {
    node.spec
        .as_ref()?
        .taints
        .as_ref()?
        .iter()
        .find(|t| t.key == key)
        .map(|t| {
            (
                t.value.clone().unwrap_or_default(),
                t.time_added.as_ref().map(system_time),
            )
        })
}

/// Waits for bulwark's unhealthy taint on `node`: its value and `timeAdded`.
pub async fn until_tainted(
    ctx: &Ctx,
    node: &str,
    limit: Duration,
) -> anyhow::Result<(String, Option<SystemTime>)> {
    let api = nodes(ctx);
    eventually(limit, "the unhealthy taint", || {
        let api = api.clone();
        async move { Ok(taint_added(&api.get(node).await?, UNHEALTHY_TAINT)) }
    })
    .await
}

pub fn marked(node: &Node) -> bool {
    node.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MARKED))
}

pub async fn events(ctx: &Ctx, node: &str, reason: &str) -> anyhow::Result<Vec<CoreEvent>> {
    let api: Api<CoreEvent> = Api::all(ctx.client.clone());
    let lp = ListParams::default().fields(&format!(
        "involvedObject.kind=Node,involvedObject.name={node},reason={reason}"
    ));
    Ok(api.list(&lp).await?.items)
}

/// Runs `body`, then heals `broken` whatever happened, and waits until bulwark has restored
/// them, so the next test starts from healthy nodes.
pub async fn with_broken<F, Fut>(
    ctx: &Ctx,
    broken: &[(&str, Option<&str>)],
    body: F,
) -> anyhow::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let result = body().await;
    for (name, condition) in broken {
        heal_node(ctx, name, *condition).await?;
    }
    for (name, _) in broken {
        until_restored(ctx, name).await?;
    }
    result
}

pub async fn unhealthy_node_is_tainted_marked_and_restored(ctx: &mut Ctx) -> anyhow::Result<()> {
    let ctx = &*ctx;
    let node = "kwok-node-4";
    let total = f64::from(ctx.state().nodes);
    ensure!(
        ctx.metric("bulwark_schedulable_nodes", &[])? == total,
        "not all nodes schedulable"
    );
    with_broken(ctx, &[(node, Some("KernelDeadlock"))], || async {
        let broken = break_node(ctx, node, Some("KernelDeadlock")).await?;
        let (value, added) = until_tainted(ctx, node, Duration::from_secs(15)).await?;
        let api = nodes(ctx);
        let seen = SystemTime::now();
        ensure!(value.contains("KernelDeadlock"), "taint value {value}");
        let took = seen.duration_since(broken).unwrap_or_default();
        println!(
            "    KernelDeadlock to taint: {:.1}s (grace {}s)",
            took.as_secs_f64(),
            GRACE.as_secs()
        );
        ensure!(
            took <= GRACE + Duration::from_secs(2),
            "tainted {took:?} after the signal"
        );

        // The webhook's cluster pending cap now counts one node fewer.
        eventually(
            Duration::from_secs(3),
            "the webhook to see one node fewer",
            || async {
                Ok((ctx.metric("bulwark_schedulable_nodes", &[])? == total - 1.0).then_some(()))
            },
        )
        .await?;

        let added = added.context("taint without timeAdded")?;
        eventually(Duration::from_secs(15), "the removal mark", || {
            let api = api.clone();
            async move { Ok(marked(&api.get(node).await?).then_some(())) }
        })
        .await?;
        let marked_after = SystemTime::now().duration_since(added).unwrap_or_default();
        println!(
            "    taint to removal mark: {:.1}s (removeAfter {}s)",
            marked_after.as_secs_f64(),
            REMOVE_AFTER.as_secs()
        );
        ensure!(
            marked_after >= REMOVE_AFTER - Duration::from_secs(1),
            "marked too early: {marked_after:?}"
        );
        for reason in ["Tainted", "MarkedForRemoval"] {
            ensure!(
                !events(ctx, node, reason).await?.is_empty(),
                "no {reason} Event"
            );
        }
        Ok(())
    })
    .await?;
    // The controller removes the taint, then publishes the Event: the taint can be seen first.
    eventually(Duration::from_secs(5), "a Recovered Event", || async {
        Ok((!events(ctx, node, "Recovered").await?.is_empty()).then_some(()))
    })
    .await?;
    eventually(
        Duration::from_secs(3),
        "the webhook to count the node again",
        || async { Ok((ctx.metric("bulwark_schedulable_nodes", &[])? == total).then_some(())) },
    )
    .await?;
    Ok(())
}

/// A node with a kubelet of its own: the test renews its Lease, as a kubelet does, and then
/// stops. (kwok keeps renewing the leases of every node it ever managed, so its nodes cannot
/// show a dead kubelet.) A taint keeps other tests' pods off it.
const LEASE_NODE: &str = "lease-node";

async fn create_lease_node(ctx: &Ctx) -> anyhow::Result<()> {
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": LEASE_NODE},
        "spec": {"taints": [{"key": "e2e.bulwark.io/no-pods", "effect": "NoSchedule"}]},
        // Nothing reserved for the kubelet: the protect-nodes audit reports it.
        "status": {
            "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110"},
            "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110"},
            "conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady", "message": "e2e",
            "lastTransitionTime": now_rfc3339(), "lastHeartbeatTime": now_rfc3339(),
        }]},
    }))?;
    nodes(ctx).create(&Default::default(), &node).await?;
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": LEASE_NODE},
        "spec": {"holderIdentity": LEASE_NODE, "leaseDurationSeconds": 8, "renewTime": now_micro()},
    }))?;
    Api::<Lease>::namespaced(ctx.client.clone(), "kube-node-lease")
        .create(&Default::default(), &lease)
        .await?;
    Ok(())
}

fn now_micro() -> String {
    Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

/// Renews the lease node's Lease once a second for `how_long`; returns the last renewal.
async fn heartbeat(ctx: &Ctx, how_long: Duration) -> anyhow::Result<SystemTime> {
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), "kube-node-lease");
    let start = Instant::now();
    loop {
        let renewed = SystemTime::now();
        let patch = json!({"spec": {"renewTime": now_micro()}});
        leases
            .patch(LEASE_NODE, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        if start.elapsed() >= how_long {
            return Ok(renewed);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub async fn stale_lease_taints_the_node(ctx: &mut Ctx) -> anyhow::Result<()> {
    let ctx = &*ctx;
    create_lease_node(ctx).await?;
    let result = stale_lease_body(ctx).await;
    let _ = nodes(ctx).delete(LEASE_NODE, &Default::default()).await;
    let _ = Api::<Lease>::namespaced(ctx.client.clone(), "kube-node-lease")
        .delete(LEASE_NODE, &Default::default())
        .await;
    result
}

async fn stale_lease_body(ctx: &Ctx) -> anyhow::Result<()> {
    let last = heartbeat(ctx, Duration::from_secs(3)).await?;
    let audit = events(ctx, LEASE_NODE, "NodeNotProtected").await?;
    let note = audit
        .first()
        .and_then(|e| e.message.clone())
        .unwrap_or_default();
    ensure!(
        note.starts_with("allocatable CPU and memory equal capacity"),
        "no protect-nodes audit Event for a node without reservations: {note:?}"
    );
    // The kubelet dies.
    let (value, added) = until_tainted(ctx, LEASE_NODE, Duration::from_secs(20)).await?;
    let seen = SystemTime::now();
    ensure!(value == "LeaseStale", "taint value {value}");
    let stale = last + LEASE_STALE_AFTER;
    let took = seen.duration_since(stale).unwrap_or_default();
    println!(
        "    lease stale to taint: {:.1}s (grace {}s)",
        took.as_secs_f64(),
        GRACE.as_secs()
    );
    ensure!(
        took <= GRACE + Duration::from_secs(2),
        "tainted {took:?} after the lease went stale"
    );
    ensure!(added.is_some(), "taint without timeAdded");
    // The kubelet comes back; the taint goes after recoverAfter.
    let beating = heartbeat(ctx, Duration::from_secs(30));
    tokio::select! {
        r = beating => { r?; anyhow::bail!("not restored while the lease was renewed"); }
        r = until_restored(ctx, LEASE_NODE) => r,
    }
}

pub async fn many_unhealthy_nodes_hold_remediation(ctx: &mut Ctx) -> anyhow::Result<()> {
    let ctx = &*ctx;
    // 3 of 5 nodes (60%), spread over both zones so no zone is wholly down.
    let bad = ["kwok-node-0", "kwok-node-1", "kwok-node-2"];
    let broken: Vec<_> = bad.iter().map(|n| (*n, Some("KernelDeadlock"))).collect();
    with_broken(ctx, &broken, || async {
        for n in bad {
            break_node(ctx, n, Some("KernelDeadlock")).await?;
        }
        let held = eventually(
            Duration::from_secs(15),
            "the RemediationHeld Event",
            || async {
                Ok(events(ctx, bad[0], "RemediationHeld")
                    .await?
                    .into_iter()
                    .next())
            },
        )
        .await?;
        let note = held.message.unwrap_or_default();
        ensure!(
            note.contains("3 of 5 nodes are unhealthy, more than max-unhealthy 40% allows"),
            "{note}"
        );
        ensure!(ctx.node_controller_metric("bulwark_node_remediation_hold")? == 1.0);
        // Well past the grace: still nothing tainted.
        tokio::time::sleep(GRACE + Duration::from_secs(2)).await;
        for n in bad {
            ensure!(
                taint_added(&nodes(ctx).get(n).await?, UNHEALTHY_TAINT).is_none(),
                "{n} tainted during the hold"
            );
        }
        Ok(())
    })
    .await?;
    // After the storm the controller holds on a little; later tests expect it acting.
    tokio::time::sleep(STORM_COOLDOWN).await;
    Ok(())
}
