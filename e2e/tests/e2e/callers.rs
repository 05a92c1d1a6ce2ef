//! Hostile callers against the real control plane: forged reviews sent straight to the
//! webhook (without a client certificate, and with one of the right CA naming someone else),
//! thousands of idle connections, and a tenant that names a system-critical priority class.
//! After each, the pods kube-apiserver sends are still decided as before.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use serde_json::json;

use crate::{
    certs::{https_exchange_as, stored},
    support::{Ctx, pod, pod_create_review, webhook_client_ca},
};

fn post(body: &str) -> String {
    format!(
        "POST /validate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

pub async fn forged_reviews_are_refused_and_consume_nothing(ctx: &mut Ctx) -> anyhow::Result<()> {
    // One pod an hour: a single forged review that counted would take the namespace's whole
    // burst, and the real pod below would be refused.
    let ns = ctx
        .namespace(
            "forged",
            &[
                ("bulwark.io/pod-rate", "1/h"),
                ("bulwark.io/pod-burst", "1"),
            ],
        )
        .await?;
    let port = ctx.state().ports.webhook;
    let ca = stored(ctx).await?.ca;
    // A certificate of the right CA (the one kube-apiserver's certificate comes from) that
    // names a kubelet, as a cluster CA used as --client-ca would let any node present.
    let client_ca = webhook_client_ca(ctx.state())?;
    let kubelet = client_ca.client("system:node:kwok-node-0", &["system:nodes"])?;
    for n in 0..20 {
        let body = pod_create_review(&ns, &format!("forged-{n}"), "mallory");
        let (_, anonymous) = https_exchange_as(port, &ca, None, post(&body).as_bytes())?;
        ensure!(
            anonymous.starts_with("HTTP/1.1 401"),
            "a review without a client certificate: {anonymous}"
        );
        let (_, named) = https_exchange_as(port, &ca, Some(&kubelet), post(&body).as_bytes())?;
        ensure!(
            named.starts_with("HTTP/1.1 403") && named.contains("system:node:kwok-node-0"),
            "a review with a kubelet's certificate of the right CA: {named}"
        );
    }
    let wrong = ctx.metric("bulwark_bad_requests_total", &[("error", "wrong_client")])?;
    ensure!(wrong >= 20.0, "wrong_client refusals counted: {wrong}");
    ensure!(
        ctx.metric("bulwark_reviews_authenticated", &[])? == 1.0,
        "reviews are authenticated by name"
    );
    // The real pod, through kube-apiserver: the burst of 1 is still there, and it is 1.
    ctx.create(&ns, &pod("real", json!({})))
        .await?
        .admitted()
        .context("the first real pod after 40 forged reviews")?;
    ctx.create(&ns, &pod("second", json!({})))
        .await?
        .refused()?;
    Ok(())
}

/// Keeps up to `n` TCP connections from `source` to the webhook open, never sending a byte:
/// as the server closes some, new ones take their place, until `stop`. Returns how many
/// connections it opened in all.
async fn flood(
    source: std::net::IpAddr,
    port: u16,
    n: usize,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<usize> {
    let mut held = std::collections::VecDeque::with_capacity(n);
    let mut opened = 0;
    while !stop.load(Ordering::Relaxed) {
        if held.len() >= n {
            held.pop_front();
        }
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind((source, 0).into())?;
        let connect = socket.connect(([127, 0, 0, 1], port).into());
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(1), connect).await {
            held.push_back(s);
            opened += 1;
        }
    }
    Ok(opened)
}

pub async fn thousands_of_idle_connections_leave_pod_creation_working(
    ctx: &mut Ctx,
) -> anyhow::Result<()> {
    // Dry runs: kube-apiserver calls both webhooks for them as for real creations, and they
    // leave nothing behind to fill a cap.
    let ns = ctx
        .namespace("flooded", &[("bulwark.io/pod-rate", "unlimited")])
        .await?;
    let port = ctx.state().ports.webhook;
    let stop = Arc::new(AtomicBool::new(false));
    let flooding = tokio::spawn(flood([127, 0, 0, 2].into(), port, 5000, stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Rounds of 30 creations at once, so kube-apiserver needs more connections than it keeps
    // pooled and dials new ones through the flood; 12 s in all, longer than any server-side
    // timeout a flooding connection could be held for.
    let mut slowest = Duration::ZERO;
    let mut created = 0;
    let until = Instant::now() + Duration::from_secs(12);
    let mut round = 0;
    let (ctx, ns) = (&*ctx, ns.as_str());
    while Instant::now() < until {
        let creations = (0..30).map(|i| {
            let name = format!("r{round}-p{i}");
            async move {
                let t = Instant::now();
                let outcome = ctx.dry_run(ns, &pod(&name, json!({}))).await;
                (name, outcome, t.elapsed())
            }
        });
        for (name, outcome, took) in futures::future::join_all(creations).await {
            outcome
                .with_context(|| format!("{name} while the webhook is flooded"))?
                .admitted()
                .with_context(|| format!("{name} while the webhook is flooded"))?;
            slowest = slowest.max(took);
            created += 1;
        }
        round += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let opened = flooding.await??;
    println!(
        "    {created} pod creations (dry run) admitted while 127.0.0.2 opened {opened} idle connections (up to 5000 held); the slowest in {slowest:?}"
    );
    // The API server calls each webhook with a 3 s timeout (failurePolicy Fail here): a
    // create that took that long would have failed, not been admitted.
    ensure!(
        slowest < Duration::from_secs(3),
        "a pod creation took {slowest:?}"
    );
    let refused = ctx.metric(
        "bulwark_connections_closed_total",
        &[("listener", "https"), ("reason", "client_handshakes")],
    )?;
    println!("    refused for the address's handshake bound: {refused}");
    ensure!(refused > 0.0, "the flood was not bounded per address");
    Ok(())
}

pub async fn a_tenants_system_critical_pod_is_throttled_like_any_other(
    ctx: &mut Ctx,
) -> anyhow::Result<()> {
    let ns = ctx
        .namespace("self-exempt", &[("bulwark.io/max-pods", "1")])
        .await?;
    ctx.create(&ns, &pod("filler", json!({})))
        .await?
        .admitted()?;
    // Any namespace may use the class (since Kubernetes 1.17); it must not lift the limit.
    let critical = pod(
        "critical",
        json!({"spec": {"priorityClassName": "system-cluster-critical"}}),
    );
    let status = ctx.create(&ns, &critical).await?.refused()?;
    ensure!(
        status.message.contains("max-pods"),
        "refused for the wrong reason: {}",
        status.message
    );
    // Nor a forged DaemonSet owner lift the pending limits.
    let pending = ctx
        .namespace("self-exempt-ds", &[("bulwark.io/max-pending-pods", "0")])
        .await?;
    let owned = pod(
        "owned",
        json!({"metadata": {"ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
            "name": "made-up", "uid": "00000000-0000-0000-0000-000000000001", "controller": true}]}}),
    );
    ctx.create(&pending, &owned).await?.refused()?;
    Ok(())
}
