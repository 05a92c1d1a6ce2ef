//! The limits bulwark enforces: live and pending pods per namespace, the cluster's pending cap
//! that follows schedulable nodes, the share kept for started workflows, dry runs that consume
//! nothing, exempt namespaces and critical pods, and a Job of 300 pods under a pending cap.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use futures::StreamExt;
use k8s_openapi::api::{
    batch::v1::Job,
    core::v1::{Node, Pod},
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
    runtime::watcher,
};
use serde_json::json;

use crate::support::{Ctx, eventually, job, pairs, pod, resources, unschedulable};

pub async fn max_pods_counts_live_pods(ctx: &mut Ctx) -> anyhow::Result<()> {
    let ns = ctx
        .namespace("maxpods", &[("bulwark.io/max-pods", "3")])
        .await?;
    for name in ["a", "b", "c"] {
        ctx.create(&ns, &pod(name, json!({}))).await?.admitted()?;
    }
    let refused = ctx.create(&ns, &pod("d", json!({}))).await?.refused()?;
    ensure!(
        refused
            .message
            .contains("has 3 live pods, at its limit of 3"),
        "{}",
        refused.message
    );
    ctx.delete_pod(&ns, "a").await?;
    ctx.create_when_room(
        &ns,
        &pod("d", json!({})),
        Duration::from_secs(10),
        "room after a deletion",
    )
    .await?;
    Ok(())
}

pub async fn max_pending_counts_unscheduled_pods(ctx: &mut Ctx) -> anyhow::Result<()> {
    let ns = ctx
        .namespace("maxpending", &[("bulwark.io/max-pending-pods", "3")])
        .await?;
    for i in 0..3 {
        ctx.create(&ns, &unschedulable(&format!("stuck-{i}")))
            .await?
            .admitted()?;
    }
    for candidate in [unschedulable("stuck-3"), pod("schedulable", json!({}))] {
        let refused = ctx.create(&ns, &candidate).await?.refused()?;
        ensure!(
            refused
                .message
                .contains("has 3 pods not yet running, at its limit of 3; retry in"),
            "{}",
            refused.message
        );
    }
    assert_eq!(ctx.pending(Some(&ns)).await?, 3);
    ctx.delete_pod(&ns, "stuck-0").await?;
    ctx.create_when_room(
        &ns,
        &unschedulable("stuck-3"),
        Duration::from_secs(10),
        "room after a deletion",
    )
    .await?;
    Ok(())
}

async fn set_cordon(ctx: &Ctx, node: &str, cordoned: bool) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let patch = json!({"spec": {"unschedulable": cordoned}});
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("cordoning {node}"))?;
    Ok(())
}

pub async fn cluster_pending_cap_follows_schedulable_nodes(ctx: &mut Ctx) -> anyhow::Result<()> {
    eventually(
        Duration::from_secs(30),
        "no pending pods in the cluster",
        || async { Ok((ctx.pending(None).await? == 0).then_some(())) },
    )
    .await?;
    let nodes = ctx.state().nodes;
    for i in 1..nodes {
        set_cordon(ctx, &format!("kwok-node-{i}"), true).await?;
    }
    let result = cluster_cap_with_one_node(ctx).await;
    for i in 1..nodes {
        set_cordon(ctx, &format!("kwok-node-{i}"), false).await?;
    }
    result
}

async fn cluster_cap_with_one_node(ctx: &mut Ctx) -> anyhow::Result<()> {
    eventually(
        Duration::from_secs(5),
        "bulwark sees one schedulable node",
        || async { Ok((ctx.metric("bulwark_schedulable_nodes", &[])? == 1.0).then_some(())) },
    )
    .await?;
    let ns = ctx
        .namespace(
            "backlog",
            &[
                ("bulwark.io/max-pending-pods", "unlimited"),
                ("bulwark.io/pod-rate", "unlimited"),
                ("bulwark.io/max-pods", "unlimited"),
            ],
        )
        .await?;
    // pendingPerHealthyNode 30 x 1 schedulable node.
    for i in 0..30 {
        ctx.create(&ns, &unschedulable(&format!("wait-{i}")))
            .await?
            .admitted()?;
    }
    let refused = ctx
        .create(&ns, &unschedulable("wait-30"))
        .await?
        .refused()?;
    ensure!(
        refused.message.contains(
            "the cluster has 30 pods not yet running, at its limit of 30 (30 per schedulable node x 1 node)"
        ),
        "{}",
        refused.message
    );
    for i in 1..ctx.state().nodes {
        set_cordon(ctx, &format!("kwok-node-{i}"), false).await?;
    }
    ctx.create_when_room(
        &ns,
        &unschedulable("wait-30"),
        Duration::from_secs(5),
        "a larger cap once nodes return",
    )
    .await?;
    Ok(())
}

fn in_workflow(name: &str, workflow: &str) -> Pod {
    let mut p = unschedulable(name);
    p.metadata.labels = Some([("bulwark.io/workflow".to_owned(), workflow.to_owned())].into());
    p
}

pub async fn started_workflows_go_first(ctx: &mut Ctx) -> anyhow::Result<()> {
    // 20% of 10 (workflowReservedShare) is kept for workflows that already have pods.
    let ns = ctx
        .namespace("workflows", &[("bulwark.io/max-pending-pods", "10")])
        .await?;
    for i in 0..8 {
        ctx.create(&ns, &in_workflow(&format!("wf-{i}-0"), &format!("wf-{i}")))
            .await?
            .admitted()?;
    }
    let refused = ctx
        .create(&ns, &in_workflow("wf-8-0", "wf-8"))
        .await?
        .refused()?;
    ensure!(
        refused.message.contains(
            "the last 2 of its limit of 10 are kept for workflows already running, so new workflow bulwark.io/workflow=wf-8 waits"
        ),
        "{}",
        refused.message
    );
    ctx.create(&ns, &in_workflow("wf-0-1", "wf-0"))
        .await?
        .admitted()?;
    ctx.create(&ns, &in_workflow("wf-1-1", "wf-1"))
        .await?
        .admitted()?;
    let full = ctx
        .create(&ns, &in_workflow("wf-2-1", "wf-2"))
        .await?
        .refused()?;
    ensure!(
        full.message
            .contains("has 10 pods not yet running, at its limit of 10"),
        "{}",
        full.message
    );
    Ok(())
}

pub async fn dry_run_consumes_nothing(ctx: &mut Ctx) -> anyhow::Result<()> {
    let ns = ctx
        .namespace(
            "dryrun",
            &[
                ("bulwark.io/max-pods", "1"),
                ("bulwark.io/pod-rate", "1/m"),
                ("bulwark.io/pod-burst", "1"),
            ],
        )
        .await?;
    let manifest = serde_json::to_string(&pod("trial", json!({})))?;
    for _ in 0..5 {
        let out = ctx
            .kubectl(
                &[
                    "-n",
                    &ns,
                    "create",
                    "--dry-run=server",
                    "-o",
                    "json",
                    "-f",
                    "-",
                ],
                Some(&manifest),
            )
            .await?;
        ensure!(out.success, "dry run refused: {}", out.stderr);
        let answered: Pod = serde_json::from_str(&out.stdout)?;
        ensure!(
            resources(&answered, "work").0 == pairs(&[("cpu", "100m"), ("memory", "128Mi")]),
            "dry run not defaulted: {}",
            out.stdout
        );
    }
    // Five dry runs later the single rate token and the single pod slot are still there.
    ctx.create(&ns, &pod("real", json!({}))).await?.admitted()?;
    let refused = ctx
        .dry_run(&ns, &pod("trial", json!({})))
        .await?
        .refused()?;
    ensure!(
        refused.message.contains("at its limit of 1"),
        "{}",
        refused.message
    );
    Ok(())
}

pub async fn exempt_namespaces_and_critical_pods(ctx: &mut Ctx) -> anyhow::Result<()> {
    // kube-system is outside the webhooks' namespaceSelector: nothing is defaulted.
    let system = ctx
        .create("kube-system", &pod("bulwark-e2e-system", json!({})))
        .await?
        .admitted()?;
    let system_res = resources(&system, "work");
    ctx.delete_pod("kube-system", "bulwark-e2e-system").await?;
    ensure!(
        system_res == (Vec::new(), Vec::new()),
        "kube-system pod got {system_res:?}"
    );

    let ns = ctx
        .namespace("critical", &[("bulwark.io/max-pods", "1")])
        .await?;
    ctx.create(&ns, &pod("filler", json!({})))
        .await?
        .admitted()?;
    ctx.create(&ns, &pod("plain", json!({}))).await?.refused()?;
    // A system-critical priority exempts a pod only in a system namespace (kube-system and
    // bulwark's own, both outside the registration here): see
    // a_tenants_system_critical_pod_is_throttled_like_any_other.

    let off = ctx.namespace("off", &[("bulwark.io/mode", "off")]).await?;
    let untouched = ctx
        .create(&off, &pod("free", json!({})))
        .await?
        .admitted()?;
    ensure!(
        resources(&untouched, "work") == (Vec::new(), Vec::new()),
        "mode=off pod was defaulted"
    );
    Ok(())
}

#[derive(Default)]
struct PendingWatch {
    pending: std::collections::HashSet<String>,
    max: usize,
}

fn is_pending(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
        == "Pending"
}

pub async fn job_of_300_completes_under_pending_cap(ctx: &mut Ctx) -> anyhow::Result<()> {
    const CAP: usize = 20;
    const PODS: i32 = 300;
    let ns = ctx
        .namespace("batch", &[("bulwark.io/max-pending-pods", "20")])
        .await?;
    let seen = Arc::new(Mutex::new(PendingWatch::default()));
    let watch = {
        let seen = seen.clone();
        let mut events = watcher(ctx.pods(&ns), watcher::Config::default()).boxed();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                let Ok(mut s) = seen.lock() else { break };
                match event {
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                        let name = p.metadata.name.clone().unwrap_or_default();
                        if is_pending(&p) {
                            s.pending.insert(name);
                        } else {
                            s.pending.remove(&name);
                        }
                        s.max = s.max.max(s.pending.len());
                    }
                    Ok(watcher::Event::Delete(p)) => {
                        s.pending.remove(&p.metadata.name.unwrap_or_default());
                    }
                    _ => {}
                }
            }
        })
    };
    let refusals_before = ctx.metric("bulwark_refusals_total", &[("reason", "max_pending")])?;
    let job = job("burst", PODS, json!({}))?;
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let start = Instant::now();
    jobs.create(&PostParams::default(), &job).await?;
    let done = eventually(Duration::from_secs(240), "the Job to complete", || async {
        let j = jobs.get("burst").await?;
        let status = j.status.unwrap_or_default();
        if status.failed.unwrap_or(0) > 0 {
            bail!("Job has failed pods");
        }
        Ok((status.succeeded.unwrap_or(0) >= PODS).then_some(()))
    })
    .await;
    let took = start.elapsed();
    watch.abort();
    let max = seen.lock().map(|s| s.max).unwrap_or(usize::MAX);
    let refusals =
        ctx.metric("bulwark_refusals_total", &[("reason", "max_pending")])? - refusals_before;
    println!(
        "    Job of {PODS} pods: {:.1}s to complete, at most {max} pending (cap {CAP}), {refusals} creations refused for max-pending",
        took.as_secs_f64()
    );
    done?;
    ensure!(max <= CAP, "{max} pods were pending at once, cap {CAP}");
    ensure!(refusals > 0.0, "the cap never held the Job controller back");
    Ok(())
}
