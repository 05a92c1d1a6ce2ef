//! Hold mode on the real cluster: pods over a namespace's pending cap are created behind
//! bulwark's scheduling gate instead of refused, and the releaser lets them go while the cap
//! has room; switching the namespace off lets everything go, and someone else's gate stays.

use std::{
    collections::{BTreeMap, HashSet},
    time::Duration,
};

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::{
    batch::v1::Job,
    core::v1::{Event as CoreEvent, Pod},
};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use serde_json::json;

use crate::{
    refusal_forms::audited_refusals,
    support::{Ctx, eventually, job, job_succeeded, pod, unschedulable},
};

const GATE: &str = "bulwark.io/pending-cap";
const HELD: &str = "bulwark.io/held";

fn gates(p: &Pod) -> Vec<String> {
    p.spec
        .as_ref()
        .and_then(|s| s.scheduling_gates.as_ref())
        .map(|g| g.iter().map(|g| g.name.clone()).collect())
        .unwrap_or_default()
}

/// A namespace in hold mode with `max-pending-pods` at `cap`.
async fn holding_namespace(ctx: &mut Ctx, prefix: &str, cap: &str) -> anyhow::Result<String> {
    ctx.namespace(
        prefix,
        &[
            ("bulwark.io/max-pending-pods", cap),
            ("bulwark.io/pending-action", "hold"),
        ],
    )
    .await
}

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

pub async fn a_job_over_the_pending_cap_is_held_and_completes_without_a_refusal(
    ctx: &mut Ctx,
) -> anyhow::Result<()> {
    const PODS: i32 = 60;
    const CAP: usize = 10;
    let ns = holding_namespace(ctx, "hold", "10").await?;
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    jobs.create(&PostParams::default(), &job("held", PODS, json!({}))?)
        .await?;
    let pods = ctx.pods(&ns);
    let (mut peak_ungated, mut peak_held) = (0usize, 0usize);
    let mut annotated = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let list = pods.list(&ListParams::default()).await?;
        let mut ungated_pending = 0;
        let mut held = 0;
        for p in &list.items {
            let gated = gates(p).iter().any(|g| g == GATE);
            if gated {
                held += 1;
            } else if phase(p) == "Pending" {
                ungated_pending += 1;
            }
            if p.metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(HELD))
            {
                annotated.insert(p.metadata.name.clone().unwrap_or_default());
            }
        }
        peak_ungated = peak_ungated.max(ungated_pending);
        peak_held = peak_held.max(held);
        ensure!(
            ungated_pending <= CAP,
            "{ungated_pending} pods past the gate and not yet running, above max-pending-pods {CAP}"
        );
        let succeeded = job_succeeded(&jobs, "held").await?;
        if succeeded >= PODS {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the Job did not complete in 300 s: {succeeded} of {PODS} succeeded, {held} held"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let refusals = audited_refusals(ctx, &ns)?;
    println!(
        "    Job of {PODS} under max-pending-pods {CAP}, hold: peak {peak_ungated} pending past \
         the gate, {peak_held} held, {} annotated as over the cap, {} refusals",
        annotated.len(),
        refusals.len()
    );
    ensure!(
        refusals.is_empty(),
        "{} pod creations were refused with 429 in hold mode",
        refusals.len()
    );
    ensure!(
        peak_held > 0 && !annotated.is_empty(),
        "no pod was ever held over the cap"
    );
    let released = ctx.metric(
        "bulwark_pod_releases_total",
        &[("why", "room"), ("result", "released")],
    )?;
    ensure!(
        released >= f64::from(PODS),
        "bulwark_pod_releases_total says {released} released, expected at least {PODS}"
    );
    Ok(())
}

pub async fn held_pods_go_when_the_namespace_stops_holding_and_other_gates_stay(
    ctx: &mut Ctx,
) -> anyhow::Result<()> {
    let ns = holding_namespace(ctx, "hold-off", "1").await?;
    // The blocker takes the one slot and never leaves it (no node matches it).
    ctx.create(&ns, &unschedulable("blocker"))
        .await?
        .admitted()?;
    eventually(
        Duration::from_secs(10),
        "the blocker released into the slot",
        || async {
            let p = ctx.pods(&ns).get("blocker").await?;
            Ok(gates(&p).is_empty().then_some(()))
        },
    )
    .await?;
    // A fully specified pod, which the defaults webhook is never called for, is held too.
    let amounts = json!({"cpu": "100m", "memory": "64Mi"});
    let full = pod(
        "full",
        json!({"spec": {"containers": [{"name": "work", "image": "registry.k8s.io/pause:3.10",
            "resources": {"requests": amounts, "limits": amounts}}]}}),
    );
    let created = ctx.create(&ns, &full).await?.admitted()?;
    ensure!(
        gates(&created) == [GATE],
        "fully specified pod over the cap: gates {:?}",
        gates(&created)
    );
    let note = created
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(HELD))
        .context("no bulwark.io/held annotation on a pod over the cap")?;
    ensure!(
        note.contains("max-pending-pods 1"),
        "held annotation {note:?}"
    );
    let other = pod(
        "other",
        json!({"spec": {"schedulingGates": [{"name": "example.com/quota"}]}}),
    );
    let created = ctx.create(&ns, &other).await?.admitted()?;
    ensure!(
        gates(&created) == ["example.com/quota", GATE],
        "gates {:?}",
        gates(&created)
    );
    // A pod bound at creation cannot wait behind a gate: refused as in refuse mode.
    let bound = pod("bound", json!({"spec": {"nodeName": "kwok-node-0"}}));
    let status = ctx.create(&ns, &bound).await?.refused()?;
    ensure!(
        status.code == 429,
        "bound pod: {} {}",
        status.code,
        status.message
    );

    // A tenant who may edit pods still cannot take bulwark's gate off (it would be past the cap).
    let bind = ctx
        .kubectl(
            &[
                "-n",
                ns.as_str(),
                "create",
                "rolebinding",
                "tenant-edit",
                "--clusterrole=edit",
                "--user=tenant",
            ],
            None,
        )
        .await?;
    ensure!(bind.success, "rolebinding: {}", bind.stderr);
    let removal = ctx
        .kubectl(
            &[
                "-n",
                ns.as_str(),
                "--as=tenant",
                "patch",
                "pod",
                "full",
                "--type=json",
                "-p",
                r#"[{"op":"remove","path":"/spec/schedulingGates/0"}]"#,
            ],
            None,
        )
        .await?;
    ensure!(
        !removal.success && removal.stderr.contains("only bulwark's releaser removes"),
        "a tenant removed bulwark's gate: {} {}",
        removal.stdout,
        removal.stderr
    );
    // Still held a few releaser passes later: the cap has no room.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for name in ["full", "other"] {
        let p = ctx.pods(&ns).get(name).await?;
        ensure!(
            gates(&p).iter().any(|g| g == GATE),
            "{name} released with no room"
        );
    }
    ctx.annotate(&ns, "bulwark.io/mode", "off").await?;
    eventually(
        Duration::from_secs(15),
        "held pods released once the namespace is off",
        || async {
            let full = ctx.pods(&ns).get("full").await?;
            let other = ctx.pods(&ns).get("other").await?;
            Ok((gates(&full).is_empty() && gates(&other) == ["example.com/quota"]).then_some(()))
        },
    )
    .await?;
    Ok(())
}

/// A pod of `workflow`, past the gate or not, that no node takes: it stays pending once released.
fn waiting(name: &str, workflow: &str) -> Pod {
    let mut p = unschedulable(name);
    p.metadata.labels = Some([("bulwark.io/workflow".to_owned(), workflow.to_owned())].into());
    p
}

fn is_gated(p: &Pod) -> bool {
    gates(p).iter().any(|g| g == GATE)
}

/// Which of `names` still carry bulwark's gate.
async fn still_held(ctx: &Ctx, ns: &str, names: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut held = Vec::new();
    for &name in names {
        if is_gated(&ctx.pods(ns).get(name).await?) {
            held.push(name.to_owned());
        }
    }
    Ok(held)
}

/// Waits until, of the pods `all`, exactly `held` carry bulwark's gate.
async fn held_are(
    ctx: &Ctx,
    ns: &str,
    all: &[&str],
    held: &[&str],
    what: &str,
) -> anyhow::Result<()> {
    eventually(Duration::from_secs(15), what, || async {
        Ok((still_held(ctx, ns, all).await? == held).then_some(()))
    })
    .await
}

pub async fn a_started_workflows_pods_are_released_before_a_new_workflows(
    ctx: &mut Ctx,
) -> anyhow::Result<()> {
    let ns = holding_namespace(ctx, "hold-order", "3").await?;
    // Workflow "build" starts: its first pod passes the gate. Two blockers fill the cap.
    for p in [
        waiting("build-0", "build"),
        unschedulable("blocker-0"),
        unschedulable("blocker-1"),
    ] {
        ctx.create(&ns, &p).await?.admitted()?;
    }
    let first = ["build-0", "blocker-0", "blocker-1"];
    held_are(
        ctx,
        &ns,
        &first,
        &[],
        "the first three pods released into the cap",
    )
    .await?;
    // The new workflow's pod is older than the started one's, so age alone would put it first.
    ctx.create(&ns, &waiting("deploy-0", "deploy"))
        .await?
        .admitted()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    ctx.create(&ns, &waiting("build-1", "build"))
        .await?
        .admitted()?;
    let line = ["deploy-0", "build-1"];
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(
        still_held(ctx, &ns, &line).await? == line,
        "a pod was released with the cap full: held {:?}",
        still_held(ctx, &ns, &line).await?
    );
    ctx.pods(&ns)
        .delete("blocker-0", &Default::default())
        .await?;
    held_are(
        ctx,
        &ns,
        &line,
        &["deploy-0"],
        "one slot free: the started workflow's pod released, the new workflow's still held",
    )
    .await?;
    // Stays so: the one slot went to build-1, which is still pending.
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(
        still_held(ctx, &ns, &line).await? == ["deploy-0"],
        "the new workflow's pod was released with no room"
    );
    ctx.pods(&ns)
        .delete("blocker-1", &Default::default())
        .await?;
    held_are(
        ctx,
        &ns,
        &line,
        &[],
        "the next slot goes to the new workflow's pod",
    )
    .await?;
    println!("    cap 3: started workflow's build-1 released first, then the older deploy-0");
    Ok(())
}

pub async fn a_webhook_restarted_mid_line_loses_and_duplicates_nothing(
    ctx: &mut Ctx,
) -> anyhow::Result<()> {
    let ns = holding_namespace(ctx, "hold-restart", "2").await?;
    let blockers = ["blocker-0", "blocker-1"];
    for name in blockers {
        ctx.create(&ns, &unschedulable(name)).await?.admitted()?;
    }
    held_are(
        ctx,
        &ns,
        &blockers,
        &[],
        "the blockers released into the cap",
    )
    .await?;
    let line: Vec<String> = (0..6).map(|i| format!("w-{i}")).collect();
    for name in &line {
        ctx.create(&ns, &pod(name, json!({}))).await?.admitted()?;
    }
    let names: Vec<&str> = line.iter().map(String::as_str).collect();
    held_are(
        ctx,
        &ns,
        &names,
        &names,
        "six pods held behind the full cap",
    )
    .await?;

    ensure!(
        crate::faults::stop(ctx, "bulwark-webhook"),
        "the cluster's webhook was not running"
    );
    // While it is down a held pod goes away: the rebuilt line must not wait for it.
    ctx.pods(&ns).delete("w-0", &Default::default()).await?;
    ctx.cluster
        .start_component(bulwark_e2e::cluster::Component::Webhook)?;
    crate::faults::wait_ready(ctx.state().ports.webhook_metrics, "the webhook back").await?;
    let names = &names[1..];
    // Rebuilt from the gated pods, the line still waits for room.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        still_held(ctx, &ns, names).await? == names,
        "pods were released after the restart with the cap full: still held {:?}",
        still_held(ctx, &ns, names).await?
    );
    for name in blockers {
        ctx.pods(&ns).delete(name, &Default::default()).await?;
    }
    // They run as soon as released (kwok), so room stays: all five go.
    held_are(
        ctx,
        &ns,
        names,
        &[],
        "the rebuilt line released once the blockers left",
    )
    .await?;
    let pods = ctx.pods(&ns).list(&ListParams::default()).await?.items;
    ensure!(
        pods.len() == names.len(),
        "{} pods in the namespace after the restart, expected the {} created and not deleted",
        pods.len(),
        names.len()
    );
    // Each released exactly once: one Released Event per pod (summed counts).
    let events: Api<CoreEvent> = Api::namespaced(ctx.client.clone(), &ns);
    let listed = events
        .list(&ListParams::default().fields("reason=Released"))
        .await?
        .items;
    let mut released: BTreeMap<String, i32> = BTreeMap::new();
    for e in &listed {
        let name = e.involved_object.name.clone().unwrap_or_default();
        *released.entry(name).or_default() += e.count.unwrap_or(1);
    }
    for name in names.iter().chain(&blockers) {
        ensure!(
            released.get(*name) == Some(&1),
            "{name} released {:?} times: {released:?}",
            released.get(*name)
        );
    }
    ensure!(
        !released.contains_key("w-0"),
        "the pod deleted while held was released: {released:?}"
    );
    println!(
        "    webhook restarted with 6 pods held: the one deleted meanwhile left the line, the other 5 released once each"
    );
    Ok(())
}
