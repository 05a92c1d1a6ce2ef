//! Three webhook replicas enforcing one namespace's limits together (docs/architecture.md,
//! "Replicas share one limit"): the cluster's own webhook (a) and two more (b, c), each taking
//! the others' reports on its own loopback address (127.0.0.1-3, the Service's `peers` port),
//! c's behind a proxy that can cut it off. The reviews of the rate phases are sent straight to
//! the replicas with kube-apiserver's client identity, so the spread of calls is exactly the
//! one asked for; the max-pods burst goes through kube-apiserver and a balancer.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use bulwark_e2e::{
    cluster::free_port,
    objects::BULWARK_NAMESPACE,
    pki::{Pki, WEBHOOK_CLIENT_NAME},
    proxy::Proxy,
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{Api, api::PostParams};
use serde_json::{Value, json};

use crate::{
    certs::{https_exchange_as, stored},
    faults::{route_webhooks, stop, wait_ready},
    support::{Created, Ctx, eventually, metric_at, pod},
};

/// The namespaces' rate in the rate phases, and the demand: twice the rate.
const RATE: f64 = 5.0;
const BURST: u32 = 5;
const DEMAND_PER_SECOND: f64 = 10.0;
/// Admitted over limit, within the 10 %.
const TOLERANCE: f64 = 0.10;
/// The max-pods burst: creations at once, against a cap of MAX_PODS.
const MAX_PODS: usize = 20;
const CONCURRENT: usize = 60;
/// Documented in docs/architecture.md ("Replicas share one limit"): a capped namespace's
/// reservations go to the peers at once, so the other two replicas can each overshoot by
/// what they admit during one report's delay; on loopback that is a few creations.
const MAX_PODS_OVERSHOOT: usize = 8;

#[derive(Clone, Copy)]
struct Replica {
    name: &'static str,
    https: u16,
    metrics: u16,
}

const SERVICE: &str = "bulwark-webhook";
const SLICE: &str = "bulwark-webhook-e2e";

pub async fn replicas_hold_one_limit_however_calls_are_spread(ctx: &mut Ctx) -> anyhow::Result<()> {
    // The webhook asks its Service's endpoints what they serve only while older CAs wait to be
    // retired; none may wait, or it would probe the endpoints below.
    let cas = stored(ctx).await?.ca;
    ensure!(
        cas.matches("BEGIN CERTIFICATE").count() == 1,
        "older CAs still wait to be retired: the webhook would probe the endpoints"
    );
    let peer_port = ctx.state().ports.webhook_peers;
    let a = Replica {
        name: "bulwark-webhook",
        https: ctx.state().ports.webhook,
        metrics: ctx.state().ports.webhook_metrics,
    };
    let b = Replica {
        name: "bulwark-webhook-b",
        https: free_port()?,
        metrics: free_port()?,
    };
    let c = Replica {
        name: "bulwark-webhook-c",
        https: free_port()?,
        metrics: free_port()?,
    };
    let c_peer: SocketAddr = ([127, 0, 0, 3], free_port()?).into();
    ctx.cluster.spawn_webhook_replica_with(
        b.name,
        b.https,
        &[
            &format!("--metrics-listen=127.0.0.1:{}", b.metrics),
            &format!("--peer-listen=127.0.0.2:{peer_port}"),
        ],
    )?;
    ctx.cluster.spawn_webhook_replica_with(
        c.name,
        c.https,
        &[
            &format!("--metrics-listen=127.0.0.1:{}", c.metrics),
            &format!("--peer-listen={c_peer}"),
        ],
    )?;
    // c's peer port as the others reach it: cutting this proxy partitions c.
    let c_link = Proxy::start_at(([127, 0, 0, 3], peer_port).into(), vec![c_peer]).await?;
    wait_ready(b.metrics, "replica b ready").await?;
    wait_ready(c.metrics, "replica c ready").await?;

    let services = Api::<Service>::namespaced(ctx.client.clone(), BULWARK_NAMESPACE);
    let slices = Api::<EndpointSlice>::namespaced(ctx.client.clone(), BULWARK_NAMESPACE);
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": SERVICE, "namespace": BULWARK_NAMESPACE},
        "spec": {"ports": [
            {"name": "https", "port": 443, "targetPort": 8443},
            {"name": "peers", "port": peer_port, "targetPort": peer_port}
        ]}
    }))?;
    services.create(&PostParams::default(), &service).await?;
    slices
        .create(&PostParams::default(), &slice(peer_port, true)?)
        .await?;
    let result = body(ctx, [a, b, c], &c_link, &slices, peer_port).await;
    let _ = slices.delete(SLICE, &Default::default()).await;
    let _ = services.delete(SERVICE, &Default::default()).await;
    route_webhooks(ctx, &ctx.state().webhook_url()).await?;
    stop(ctx, b.name);
    stop(ctx, c.name);
    eventually(
        Duration::from_secs(10),
        "the cluster's webhook alone again",
        || async { Ok((ctx.metric("bulwark_rate_share_replicas", &[])? == 1.0).then_some(())) },
    )
    .await?;
    result
}

/// The three replicas as the EndpointSlice controller would publish them; `b_ready` false
/// once b is gone.
fn slice(peer_port: u16, b_ready: bool) -> anyhow::Result<EndpointSlice> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": SLICE, "namespace": BULWARK_NAMESPACE, "labels": {
            "kubernetes.io/service-name": SERVICE,
            "endpointslice.kubernetes.io/managed-by": "bulwark-e2e"
        }},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["127.0.0.1"], "conditions": {"ready": true}},
            {"addresses": ["127.0.0.2"], "conditions": {"ready": b_ready}},
            {"addresses": ["127.0.0.3"], "conditions": {"ready": true}}
        ],
        "ports": [
            {"name": "https", "port": 8443, "protocol": "TCP"},
            {"name": "peers", "port": peer_port, "protocol": "TCP"}
        ]
    }))?)
}

fn reachable(r: Replica) -> f64 {
    metric_at(r.metrics, "bulwark_peers", &[("state", "reachable")]).unwrap_or(-1.0)
}

async fn wait_reachable(replicas: &[Replica], n: f64, what: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    eventually(Duration::from_secs(20), what, || async {
        Ok(replicas.iter().all(|r| reachable(*r) == n).then_some(()))
    })
    .await?;
    Ok(started.elapsed())
}

async fn body(
    ctx: &mut Ctx,
    [a, b, c]: [Replica; 3],
    c_link: &Proxy,
    slices: &Api<EndpointSlice>,
    peer_port: u16,
) -> anyhow::Result<()> {
    wait_reachable(&[a, b, c], 2.0, "every replica sharing with the two others").await?;
    let driver = Driver::new(ctx).await?;

    // Counts: a burst through kube-apiserver, spread over the three by a balancer.
    let overshoot = max_pods_burst(ctx, [a, b, c]).await?;

    // The rate, 60 s above it, three spreads at once in three namespaces.
    let rated = [
        ("bulwark.io/pod-rate", "5/s"),
        ("bulwark.io/pod-burst", "5"),
    ];
    let one = ctx.namespace("ha-one", &rated).await?;
    let split = ctx.namespace("ha-split", &rated).await?;
    let rr = ctx.namespace("ha-rr", &rated).await?;
    let minute = Duration::from_secs(60);
    let runs = [
        (one.as_str(), vec![a.https]),
        (
            split.as_str(),
            [vec![a.https; 7], vec![b.https; 3]].concat(),
        ),
        (rr.as_str(), vec![a.https, b.https, c.https]),
    ];
    let results = futures::future::try_join_all(
        runs.iter()
            .map(|(ns, spread)| driver.drive(ns, spread.clone(), minute)),
    )
    .await?;
    let mut lines = Vec::new();
    for ((ns, _), admitted) in runs.iter().zip(&results) {
        let ratio = ratio(admitted.total(), minute, true);
        lines.push(format!("{ns}: {ratio:.3} ({:?})", admitted.by_replica));
        ensure!(
            (ratio - 1.0).abs() <= TOLERANCE,
            "{ns}: admitted {ratio:.3} of the rate, per replica {:?}",
            admitted.by_replica
        );
    }

    // b killed; its endpoint leaves the slice, as the EndpointSlice controller would do.
    let killed = Instant::now();
    ensure!(
        tokio::task::block_in_place(|| ctx.cluster.stop_named(b.name, true)),
        "replica b was not running"
    );
    slices
        .replace(SLICE, &PostParams::default(), &{
            let mut s = slice(peer_port, false)?;
            s.metadata.resource_version = slices.get(SLICE).await?.metadata.resource_version;
            s
        })
        .await?;
    let regrouped = wait_reachable(&[a, c], 1.0, "a and c sharing after b is gone").await?;
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(killed.elapsed())).await;
    let window = Duration::from_secs(20);
    let after_kill = driver.drive(&rr, vec![a.https, c.https], window).await?;
    let kill_ratio = ratio(after_kill.total(), window, false);
    ensure!(
        (kill_ratio - 1.0).abs() <= TOLERANCE,
        "after b was killed a and c admitted {kill_ratio:.3} of the rate ({:?})",
        after_kill.by_replica
    );

    // c partitioned: neither side hears the other; each keeps its 1/2 part.
    c_link.cut();
    wait_reachable(&[a, c], 0.0, "a and c apart").await?;
    let apart = driver.drive(&rr, vec![a.https, c.https], window).await?;
    let apart_ratio = ratio(apart.total(), window, false);
    let c_share = f64::from(apart.by_replica[1]) / (RATE / 2.0 * window.as_secs_f64());
    ensure!(
        (apart_ratio - 1.0).abs() <= TOLERANCE && (c_share - 1.0).abs() <= 0.2,
        "partitioned: {apart_ratio:.3} of the rate in all, c {c_share:.3} of its half ({:?})",
        apart.by_replica
    );
    let fallbacks = metric_at(c.metrics, "bulwark_peer_fallbacks_total", &[])?;
    ensure!(fallbacks >= 1.0, "c's fallback counted: {fallbacks}");

    c_link.heal();
    let healed_in = wait_reachable(&[a, c], 1.0, "a and c together again").await?;
    let healed = driver.drive(&rr, vec![a.https, c.https], window).await?;
    let healed_ratio = ratio(healed.total(), window, false);
    ensure!(
        (healed_ratio - 1.0).abs() <= TOLERANCE,
        "healed: {healed_ratio:.3} of the rate ({:?})",
        healed.by_replica
    );
    let sent = metric_at(a.metrics, "bulwark_peer_report_bytes_sent_total", &[])?;
    let refused = metric_at(
        a.metrics,
        "bulwark_peer_reports_received_total",
        &[("result", "replay")],
    )
    .unwrap_or(0.0);
    println!(
        "    3 replicas, 60 s at twice the rate {RATE}/s, admitted / limit: {}",
        lines.join(", ")
    );
    println!(
        "    max-pods {MAX_PODS}, {CONCURRENT} at once through kube-apiserver: overshoot {overshoot}"
    );
    println!(
        "    b killed: a and c regrouped in {:.1}s, then {kill_ratio:.3} of the rate ({:?}); c cut off: {apart_ratio:.3} in all, c {c_share:.3} of its half ({:?}); healed in {:.1}s: {healed_ratio:.3} ({:?}); a sent {sent} report bytes, {refused} replays refused",
        regrouped.as_secs_f64(),
        after_kill.by_replica,
        apart.by_replica,
        healed_in.as_secs_f64(),
        healed.by_replica,
    );
    Ok(())
}

/// Admitted over what the rate allows in `window`; `burst`: the namespace started with a
/// full bucket, which is not part of the rate.
fn ratio(admitted: u32, window: Duration, burst: bool) -> f64 {
    let admitted = f64::from(admitted) - if burst { f64::from(BURST) } else { 0.0 };
    admitted / (RATE * window.as_secs_f64())
}

/// `CONCURRENT` creations at once against max-pods `MAX_PODS`, through kube-apiserver and a
/// balancer over the three replicas: how many were admitted past the cap.
async fn max_pods_burst(ctx: &mut Ctx, replicas: [Replica; 3]) -> anyhow::Result<usize> {
    let backends = replicas
        .iter()
        .map(|r| SocketAddr::from(([127, 0, 0, 1], r.https)))
        .collect();
    let balancer = Proxy::start(backends).await?;
    route_webhooks(ctx, &format!("https://127.0.0.1:{}", balancer.port)).await?;
    let cap = MAX_PODS.to_string();
    let ns = ctx
        .namespace(
            "ha-cap",
            &[
                ("bulwark.io/max-pods", cap.as_str()),
                ("bulwark.io/pod-rate", "1000/s"),
                ("bulwark.io/pod-burst", "1000"),
            ],
        )
        .await?;
    let creations = (0..CONCURRENT).map(|i| {
        let ctx = &*ctx;
        let ns = ns.clone();
        async move { ctx.create(&ns, &pod(&format!("p{i}"), json!({}))).await }
    });
    let created = futures::future::try_join_all(creations).await?;
    let admitted = created
        .iter()
        .filter(|c| matches!(c, Created::Pod(_)))
        .count();
    let forwarded = balancer.forwarded();
    route_webhooks(ctx, &ctx.state().webhook_url()).await?;
    ensure!(
        admitted >= MAX_PODS,
        "only {admitted} of {CONCURRENT} admitted under max-pods {MAX_PODS}"
    );
    ensure!(
        forwarded.iter().filter(|&&n| n > 0).count() >= 2,
        "the burst reached fewer than two replicas: {forwarded:?}"
    );
    let overshoot = admitted - MAX_PODS;
    ensure!(
        overshoot <= MAX_PODS_OVERSHOOT,
        "{admitted} admitted under max-pods {MAX_PODS} (connections {forwarded:?})"
    );
    Ok(overshoot)
}

/// Sends reviews to the replicas as kube-apiserver does, with its client certificate.
struct Driver {
    ca: String,
    identity: bulwark_certs::Pair,
}

#[derive(Debug)]
struct Admitted {
    /// In the order of the distinct ports of the spread.
    by_replica: Vec<u32>,
}

impl Admitted {
    fn total(&self) -> u32 {
        self.by_replica.iter().sum()
    }
}

impl Driver {
    async fn new(ctx: &Ctx) -> anyhow::Result<Driver> {
        let pki = Pki::in_dir(&ctx.state().dir);
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        let client_ca = bulwark_certs::Ca::from_pem(
            &read(&pki.webhook_client_ca)?,
            &read(&pki.webhook_client_ca_key)?,
            1,
            bulwark_certs::KeyAlgorithm::default(),
        )?;
        Ok(Driver {
            ca: stored(ctx).await?.ca,
            identity: client_ca.client(WEBHOOK_CLIENT_NAME, &[])?,
        })
    }

    /// Pod creations in `namespace` at [`DEMAND_PER_SECOND`] for `window`, the n-th to
    /// `spread[n % len]`; counts what each replica admitted.
    async fn drive(
        &self,
        namespace: &str,
        spread: Vec<u16>,
        window: Duration,
    ) -> anyhow::Result<Admitted> {
        let (ca, identity, ns) = (self.ca.clone(), self.identity.clone(), namespace.to_owned());
        tokio::task::spawn_blocking(move || {
            let mut ports: Vec<u16> = Vec::new();
            for p in &spread {
                if !ports.contains(p) {
                    ports.push(*p);
                }
            }
            let mut by_replica = vec![0; ports.len()];
            let pause = Duration::from_secs_f64(1.0 / DEMAND_PER_SECOND);
            let started = Instant::now();
            let mut n = 0usize;
            while started.elapsed() < window {
                let due = started + pause * u32::try_from(n).unwrap_or(u32::MAX);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                let port = spread[n % spread.len()];
                let body = review(&ns, &format!("d{n}"));
                let request = format!(
                    "POST /validate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let (_, reply) = https_exchange_as(port, &ca, Some(&identity), request.as_bytes())?;
                ensure!(reply.starts_with("HTTP/1.1 200"), "replica on {port}: {reply}");
                if reply.contains("\"allowed\":true") {
                    let i = ports.iter().position(|p| *p == port).unwrap_or(0);
                    by_replica[i] += 1;
                }
                n += 1;
            }
            Ok(Admitted { by_replica })
        })
        .await?
    }
}

/// A pod CREATE review as kube-apiserver sends it.
fn review(namespace: &str, name: &str) -> String {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": format!("ha-{namespace}-{name}"),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": name,
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "ci-bot"},
            "object": serde_json::to_value(pod(name, json!({}))).unwrap_or(Value::Null),
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    })
    .to_string()
}
