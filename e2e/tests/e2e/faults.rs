//! Faults: under steady load, a webhook replica stopped and restarted behind a balancer; a
//! webhook whose watches lose the API server while the API server still reaches it; and
//! kube-apiserver itself restarted, after which the webhook's watches must resume.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use bulwark_e2e::{
    cluster::{BULWARK_CONFIG, Component, free_port, register_webhooks},
    pki::{Identity, kubeconfig_path},
    proxy::Proxy,
};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use serde_json::json;

use crate::support::{Ctx, eventually, metric_at, pod, steady_load, unschedulable, until_decision};

/// Points both registrations at `base_url` and gives kube-apiserver's configuration informer a
/// moment to see it.
pub async fn route_webhooks(ctx: &Ctx, base_url: &str) -> anyhow::Result<()> {
    register_webhooks(&ctx.client, base_url).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(())
}

/// Waits until the webhook whose metrics are on `metrics_port` has synced its caches.
pub async fn wait_ready(metrics_port: u16, what: &str) -> anyhow::Result<()> {
    eventually(Duration::from_secs(30), what, || async move {
        let sent = metric_at(metrics_port, "bulwark_start_time_seconds", &[]).unwrap_or(0.0);
        let synced = metric_at(metrics_port, "bulwark_schedulable_nodes", &[]).unwrap_or(0.0);
        Ok((sent > 0.0 && synced > 0.0).then_some(()))
    })
    .await
}

/// Stops a process of the cluster without stalling the load task on the same runtime.
pub(crate) fn stop(ctx: &mut Ctx, name: &str) -> bool {
    tokio::task::block_in_place(|| ctx.cluster.stop_named(name, false))
}

pub async fn webhook_restart_under_load_loses_no_admission(ctx: &mut Ctx) -> anyhow::Result<()> {
    // Two replicas behind a balancer, as a Service would put them; the API server reaches them
    // through it. Each replica in turn gets SIGTERM (drains, exits) and the other carries on.
    let (port_b, metrics_b) = (free_port()?, free_port()?);
    ctx.cluster.spawn_webhook_replica_with(
        "bulwark-webhook-b",
        port_b,
        &[&format!("--metrics-listen=127.0.0.1:{metrics_b}")],
    )?;
    wait_ready(metrics_b, "replica b ready").await?;
    let port_a = ctx.state().ports.webhook;
    let backends: Vec<SocketAddr> = vec![
        ([127, 0, 0, 1], port_a).into(),
        ([127, 0, 0, 1], port_b).into(),
    ];
    let balancer = Proxy::start(backends).await?;
    route_webhooks(ctx, &format!("https://127.0.0.1:{}", balancer.port)).await?;
    let result = restart_body(ctx, &balancer).await;
    route_webhooks(ctx, &ctx.state().webhook_url()).await?;
    stop(ctx, "bulwark-webhook-b");
    result
}

/// Relies on the balancer skipping a stopped replica at once (see `bulwark_e2e::proxy`): a
/// Service takes it out when its endpoint goes, a moment later.
async fn restart_body(ctx: &mut Ctx, balancer: &Proxy) -> anyhow::Result<()> {
    let load = steady_load(ctx, "restart").await?;

    ensure!(
        stop(ctx, "bulwark-webhook"),
        "the cluster's webhook was not running"
    );
    let a_down = load.counts();
    tokio::time::sleep(Duration::from_secs(2)).await;
    ctx.cluster.start_component(Component::Webhook)?;
    wait_ready(ctx.state().ports.webhook_metrics, "replica a back").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(stop(ctx, "bulwark-webhook-b"), "replica b was not running");
    let b_down = load.counts();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ok, failed, errors) = load.finish().await?;
    ensure!(
        failed == 0,
        "{failed} of {} creations failed: {errors:?}",
        ok + failed
    );
    ensure!(
        b_down.0 > a_down.0 && ok > b_down.0,
        "pods were not created while a ({a_down:?}), then b ({b_down:?}) was down; {ok} in all"
    );
    let forwarded = balancer.forwarded();
    ensure!(
        forwarded.iter().all(|&n| n > 0),
        "both replicas should have served: {forwarded:?}"
    );
    // The restarted replica answered reviews after b left.
    let a_reviews = ctx.metric(
        "bulwark_admission_requests_total",
        &[("endpoint", "validate")],
    )?;
    ensure!(
        a_reviews > 0.0,
        "replica a served nothing after its restart"
    );
    println!(
        "    {ok} pods created while each replica in turn was stopped and restarted, 0 failed; connections per replica {forwarded:?}"
    );
    Ok(())
}

pub async fn a_failing_watch_opens_count_quotas_after_the_limit(
    ctx: &mut Ctx,
) -> anyhow::Result<()> {
    // A replica whose own connection to the API server goes through a proxy that can be cut,
    // while the API server still reaches the replica: its watches fail, its snapshot ages.
    let apiserver: SocketAddr = ([127, 0, 0, 1], ctx.state().ports.apiserver).into();
    let partition = Proxy::start(vec![apiserver]).await?;
    let dir = ctx.state().dir.clone();
    let kubeconfig = std::fs::read_to_string(kubeconfig_path(&dir, Identity::Webhook))?.replace(
        &format!("127.0.0.1:{}", apiserver.port()),
        &format!("127.0.0.1:{}", partition.port),
    );
    let kubeconfig_file = dir.join("webhook-partitioned.kubeconfig");
    std::fs::write(&kubeconfig_file, kubeconfig)?;
    let config_file = dir.join("bulwark-stale-limit.yaml");
    std::fs::write(
        &config_file,
        format!("{BULWARK_CONFIG}cacheStaleLimitSeconds: 5\n"),
    )?;
    let (port, metrics) = (free_port()?, free_port()?);
    ctx.cluster.spawn_webhook_replica_with(
        "bulwark-webhook-partitioned",
        port,
        &[
            &format!("--metrics-listen=127.0.0.1:{metrics}"),
            &format!("--kubeconfig={}", kubeconfig_file.display()),
            &format!("--config={}", config_file.display()),
        ],
    )?;
    wait_ready(metrics, "the partitioned replica ready").await?;
    route_webhooks(ctx, &format!("https://127.0.0.1:{port}")).await?;
    let result = stale_body(ctx, &partition, metrics).await;
    partition.heal();
    route_webhooks(ctx, &ctx.state().webhook_url()).await?;
    stop(ctx, "bulwark-webhook-partitioned");
    result
}

async fn stale_body(ctx: &mut Ctx, partition: &Proxy, metrics: u16) -> anyhow::Result<()> {
    let ns = ctx
        .namespace("stale", &[("bulwark.io/max-pods", "1")])
        .await?;
    ctx.create(&ns, &pod("first", json!({})))
        .await?
        .admitted()?;
    let refused = ctx
        .create(&ns, &pod("second", json!({})))
        .await?
        .refused()?;
    ensure!(refused.message.contains("max-pods"), "{}", refused.message);

    partition.cut();
    let cut = std::time::Instant::now();
    let failing = |m| {
        metric_at(
            m,
            "bulwark_cache_watch_failing_seconds",
            &[("resource", "pods")],
        )
    };
    eventually(
        Duration::from_secs(20),
        "the pod watch failing",
        || async move { Ok((failing(metrics)? > 0.0).then_some(())) },
    )
    .await?;
    // Within the limit the last snapshot still decides.
    let refused = ctx.create(&ns, &pod("third", json!({}))).await?.refused()?;
    ensure!(refused.message.contains("max-pods"), "{}", refused.message);
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(cut.elapsed())).await;
    let run = ctx
        .kubectl(
            &[
                "-n",
                &ns,
                "run",
                "fourth",
                "--image=registry.k8s.io/pause:3.10",
            ],
            None,
        )
        .await?;
    ensure!(
        run.success && run.stderr.contains("the watch of") && run.stderr.contains("not enforced"),
        "past the limit the pod is admitted with a warning: {} {}",
        run.stdout,
        run.stderr
    );
    let opened_after = cut.elapsed();

    partition.heal();
    // Each watch delivers again: a namespace change, a node change and a pod.
    ctx.annotate(&ns, "example.com/touch", "1").await?;
    let nodes = Api::<Node>::all(ctx.client.clone());
    let node = nodes
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .next()
        .and_then(|n| n.metadata.name)
        .context("no node")?;
    let label = json!({"metadata": {"labels": {"example.com/touch": "1"}}});
    nodes
        .patch(&node, &Default::default(), &kube::api::Patch::Merge(&label))
        .await?;
    let elsewhere = ctx.namespace("stale-other", &[]).await?;
    ctx.create(&elsewhere, &pod("wake", json!({})))
        .await?
        .admitted()?;
    let refused = eventually(Duration::from_secs(20), "counts enforced again", || {
        let ns = ns.clone();
        let ctx = &*ctx;
        async move {
            let created = ctx.create(&ns, &pod("fifth", json!({}))).await?;
            match created {
                crate::support::Created::Refused(s) => Ok(Some(s)),
                crate::support::Created::Pod(_) => {
                    ctx.delete_pod(&ns, "fifth").await?;
                    Ok(None)
                }
            }
        }
    })
    .await?;
    ensure!(refused.message.contains("max-pods"), "{}", refused.message);
    let mut unlabel = json!({"metadata": {"labels": {}}});
    unlabel["metadata"]["labels"]["example.com/touch"] = serde_json::Value::Null;
    nodes
        .patch(
            &node,
            &Default::default(),
            &kube::api::Patch::Merge(&unlabel),
        )
        .await?;
    println!(
        "    watch cut: refusals from the snapshot, then admitted with a warning {:.1}s after the cut (limit 5s); counted again once the watches delivered",
        opened_after.as_secs_f64()
    );
    Ok(())
}

pub async fn watches_resume_after_apiserver_restart(ctx: &mut Ctx) -> anyhow::Result<()> {
    let ns = ctx
        .namespace("restart", &[("bulwark.io/max-pending-pods", "2")])
        .await?;
    for name in ["held-0", "held-1"] {
        ctx.create(&ns, &unschedulable(name)).await?.admitted()?;
    }
    // Only what the webhook logs from here on tells whether it noticed this restart (an earlier
    // test's outage left the same line).
    let log_path = ctx.cluster.log(Component::Webhook);
    let logged_before = std::fs::metadata(&log_path).map_or(0, |m| m.len());
    let restart = ctx
        .cluster
        .restart_apiserver(Duration::from_secs(5))
        .await?;
    let ready = restart.ready;
    println!(
        "    kube-apiserver: {:.1}s from SIGTERM to exit, down {:.1}s, ready again",
        (restart.stopped - restart.signalled).as_secs_f64(),
        (restart.ready - restart.stopped).as_secs_f64()
    );
    // The snapshot from before the restart still decides: the namespace is full.
    ctx.dry_run(&ns, &pod("probe", json!({})))
        .await?
        .refused()?;
    ctx.delete_pod(&ns, "held-0").await?;
    let deleted = Instant::now();
    let caught_up = until_decision(ctx, &ns, true, Duration::from_secs(45)).await?;
    println!(
        "    after the restart, decisions reflected a deletion {:.1}s later ({:.1}s after the API server was ready)",
        caught_up.as_secs_f64(),
        (deleted + caught_up - ready).as_secs_f64()
    );
    let log = std::fs::read(&log_path)?;
    let since = usize::try_from(logged_before).unwrap_or(usize::MAX);
    let after_restart = String::from_utf8_lossy(log.get(since..).unwrap_or(&log));
    ensure!(
        after_restart.contains("watch failed; retrying with back-off"),
        "the webhook never noticed the API server going away"
    );
    // And the webhook keeps counting correctly afterwards.
    ctx.create(&ns, &unschedulable("held-2"))
        .await?
        .admitted()?;
    ctx.create(&ns, &unschedulable("held-3")).await?.refused()?;
    Ok(())
}
