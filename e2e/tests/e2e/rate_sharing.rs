//! Three webhook replicas enforcing one namespace's limits together (docs/architecture.md,
//! "Replicas share one limit"). kube-apiserver refuses loopback addresses in EndpointSlices, so
//! the replicas run in a network namespace of the test's own whose loopback carries
//! 198.18.0.1-3 (a benchmarking range; nothing in the namespace routes anywhere else), one
//! address each for its peer port, published in an EndpointSlice as the EndpointSlice
//! controller would. The API server, their HTTPS and metrics ports are forwarded in and out.
//! The reviews of the rate phases are sent straight to the replicas with kube-apiserver's client
//! identity, so the spread of calls is exactly the one asked for; the max-pods burst goes
//! through kube-apiserver and a balancer.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use bulwark_e2e::{
    cluster::BULWARK_CONFIG,
    netns::{self, Netns},
    objects::BULWARK_NAMESPACE,
    pki::WEBHOOK_CLIENT_NAME,
    proxy::Proxy,
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{Api, api::PostParams};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::{
    certs::stored,
    faults::{route_webhooks, stop, wait_ready},
    support::{Created, Ctx, eventually, metric_at, pod, pod_create_review, webhook_client_ca},
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
/// Documented in docs/architecture.md ("Replicas share one limit"): replicas admitting at
/// once each take at most their share of the slots left, rounded up, so three can exceed a
/// cap by two.
const MAX_PODS_OVERSHOOT: usize = 2;

/// One replica: its name, the test's ports for its HTTPS and metrics (forwarded into the
/// namespace) and its peer address there.
#[derive(Clone, Copy)]
struct Replica {
    name: &'static str,
    https: u16,
    metrics: u16,
    peer: Ipv4Addr,
}

const NETNS: &str = "bulwark-e2e-ha";
const SERVICE: &str = "bulwark-ha-e2e";
const SLICE: &str = "bulwark-ha-e2e-1";
/// Inside the namespace every port is free: the three replicas' own.
const PEER_PORT: u16 = 8444;
const NAMES: [&str; 3] = ["bulwark-ha-1", "bulwark-ha-2", "bulwark-ha-3"];

pub async fn replicas_hold_one_limit_however_calls_are_spread(ctx: &mut Ctx) -> anyhow::Result<()> {
    let addresses = [1, 2, 3].map(|i| Ipv4Addr::new(198, 18, 0, i));
    let ns = Arc::new(Netns::create(NETNS, &addresses)?);
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    let result = async {
        let apiserver: SocketAddr = ([127, 0, 0, 1], ctx.state().ports.apiserver).into();
        // The rate phases' reviews are of pods that are never created: their reservations
        // would stay the full 30 s and fill the cluster's pending cap. 2 s keeps them few.
        let ttl = "reservationTtlSeconds: 30\n";
        ensure!(
            BULWARK_CONFIG.contains(ttl),
            "the e2e config has no `{}`",
            ttl.trim()
        );
        let config = ctx.state().dir.join("bulwark-ha.yaml");
        std::fs::write(
            &config,
            BULWARK_CONFIG.replace(ttl, "reservationTtlSeconds: 2\n"),
        )?;
        tasks.push(netns::forward_out(&ns, apiserver, apiserver).await?);
        let mut replicas = Vec::new();
        for (i, (name, peer)) in NAMES.iter().zip(addresses).enumerate() {
            let (https_in, metrics_in) = (9443 + i as u16 * 10, 9090 + i as u16 * 10);
            let (https, t) =
                netns::forward_in(ns.clone(), ([127, 0, 0, 1], https_in).into()).await?;
            tasks.push(t);
            let (metrics, t) =
                netns::forward_in(ns.clone(), ([127, 0, 0, 1], metrics_in).into()).await?;
            tasks.push(t);
            ctx.cluster.spawn_webhook_replica_in(
                &ns,
                name,
                &[
                    &format!("--listen=127.0.0.1:{https_in}"),
                    &format!("--metrics-listen=127.0.0.1:{metrics_in}"),
                    &format!("--peer-listen={peer}:{PEER_PORT}"),
                    &format!("--peers-service={SERVICE}"),
                    &format!("--config={}", config.display()),
                ],
            )?;
            replicas.push(Replica {
                name,
                https,
                metrics,
                peer,
            });
        }
        let [a, b, c] = [replicas[0], replicas[1], replicas[2]];
        for r in [a, b, c] {
            wait_ready(r.metrics, r.name).await?;
        }
        let services = Api::<Service>::namespaced(ctx.client.clone(), BULWARK_NAMESPACE);
        let slices = Api::<EndpointSlice>::namespaced(ctx.client.clone(), BULWARK_NAMESPACE);
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": SERVICE, "namespace": BULWARK_NAMESPACE},
            "spec": {"ports": [
                {"name": "https", "port": 443, "targetPort": 8443},
                {"name": "peers", "port": PEER_PORT, "targetPort": PEER_PORT}
            ]}
        }))?;
        // Before the replicas know of each other (no EndpointSlice yet): each alone holds its
        // own reservations, as every replica did before they shared them. Shown, not judged:
        // how far it goes past the cap depends on how fast the watches are.
        let alone = max_pods_burst(ctx, [a, b, c]).await?;
        println!(
            "    replicas not sharing: max-pods {MAX_PODS}, {CONCURRENT} at once, then 10 one at a time: admitted {alone:?}"
        );
        services.create(&PostParams::default(), &service).await?;
        slices
            .create(&PostParams::default(), &slice(&[a, b, c], true)?)
            .await?;
        let result = body(ctx, [a, b, c], &ns, &slices).await;
        let _ = slices.delete(SLICE, &Default::default()).await;
        let _ = services.delete(SERVICE, &Default::default()).await;
        result
    }
    .await;
    route_webhooks(ctx, &ctx.state().webhook_url()).await?;
    for name in NAMES {
        stop(ctx, name);
    }
    for t in tasks {
        t.abort();
    }
    result
}

/// The three replicas as the EndpointSlice controller would publish them; `b_ready` false
/// once b is gone.
fn slice(replicas: &[Replica; 3], b_ready: bool) -> anyhow::Result<EndpointSlice> {
    let ready = [true, b_ready, true];
    let endpoints: Vec<Value> = replicas
        .iter()
        .zip(ready)
        .map(
            |(r, ready)| json!({"addresses": [r.peer.to_string()], "conditions": {"ready": ready}}),
        )
        .collect();
    Ok(serde_json::from_value(json!({
        "metadata": {"name": SLICE, "namespace": BULWARK_NAMESPACE, "labels": {
            "kubernetes.io/service-name": SERVICE,
            "endpointslice.kubernetes.io/managed-by": "bulwark-e2e"
        }},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [
            {"name": "https", "port": 8443, "protocol": "TCP"},
            {"name": "peers", "port": PEER_PORT, "protocol": "TCP"}
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
    ns: &Netns,
    slices: &Api<EndpointSlice>,
) -> anyhow::Result<()> {
    wait_reachable(&[a, b, c], 2.0, "every replica sharing with the two others").await?;
    let driver = Driver::new(ctx).await?;

    // Counts: a burst through kube-apiserver, spread over the three by a balancer.
    let waves = max_pods_burst(ctx, [a, b, c]).await?;
    let total: usize = waves.iter().sum();
    ensure!(
        (MAX_PODS..=MAX_PODS + MAX_PODS_OVERSHOOT).contains(&total),
        "{waves:?} admitted by the burst and the retries under max-pods {MAX_PODS}"
    );

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
        lines.push(format!(
            "{ns}: {ratio:.3} ({:?} of {} sent)",
            admitted.by_replica, admitted.sent
        ));
        ensure!(
            (ratio - 1.0).abs() <= TOLERANCE,
            "{ns}: admitted {ratio:.3} of the rate, per replica {:?} of {} sent",
            admitted.by_replica,
            admitted.sent
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
            let mut s = slice(&[a, b, c], false)?;
            s.metadata.resource_version = slices.get(SLICE).await?.metadata.resource_version;
            s
        })
        .await?;
    let regrouped = wait_reachable(&[a, c], 1.0, "a and c sharing after b is gone").await?;
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(killed.elapsed())).await;
    let window = Duration::from_secs(20);
    let (after_kill, kill_ratio) = driver
        .judged(&rr, [a, c], window, "after b was killed")
        .await?;

    // c partitioned: its peer address taken away, a's reports no longer reach it (c's still
    // reach a); neither counts the other, and each keeps its 1/2 part.
    ns.remove_address(c.peer)?;
    wait_reachable(&[a, c], 0.0, "a and c apart").await?;
    let (apart, apart_ratio) = driver.judged(&rr, [a, c], window, "partitioned").await?;
    let c_share = f64::from(apart.by_replica[1]) / (RATE / 2.0 * window.as_secs_f64());
    ensure!(
        (c_share - 1.0).abs() <= 0.2,
        "partitioned: c admitted {c_share:.3} of its half ({:?})",
        apart.by_replica
    );
    let fallbacks = metric_at(c.metrics, "bulwark_peer_fallbacks_total", &[])?;
    ensure!(fallbacks >= 1.0, "c's fallback counted: {fallbacks}");

    ns.add_address(c.peer)?;
    let healed_in = wait_reachable(&[a, c], 1.0, "a and c together again").await?;
    let (healed, healed_ratio) = driver.judged(&rr, [a, c], window, "healed").await?;
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
        "    max-pods {MAX_PODS}, {CONCURRENT} at once through kube-apiserver, then 10 one at a time: admitted {waves:?}"
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
/// balancer over the three replicas, then ten one at a time: how many the burst and the
/// retries admitted (the caller judges them).
async fn max_pods_burst(ctx: &mut Ctx, replicas: [Replica; 3]) -> anyhow::Result<Vec<usize>> {
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
    // The burst, then one creation at a time, as clients that retry a refusal would: the
    // burst may leave a few slots that replicas holding more than their share refused, and the
    // retries find them once the reports are confirmed.
    let creations = (0..CONCURRENT).map(|i| {
        let ctx = &*ctx;
        let ns = ns.clone();
        async move {
            ctx.create(&ns, &pod(&format!("burst-{i}"), json!({})))
                .await
        }
    });
    let burst = futures::future::try_join_all(creations)
        .await?
        .iter()
        .filter(|c| matches!(c, Created::Pod(_)))
        .count();
    let mut retries = 0;
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Created::Pod(_) = ctx
            .create(&ns, &pod(&format!("retry-{i}"), json!({})))
            .await?
        {
            retries += 1;
        }
    }
    let admitted = vec![burst, retries];
    let forwarded = balancer.forwarded();
    route_webhooks(ctx, &ctx.state().webhook_url()).await?;
    ensure!(
        forwarded.iter().filter(|&&n| n > 0).count() >= 2,
        "the burst reached fewer than two replicas: {forwarded:?}"
    );
    Ok(admitted)
}

/// Sends reviews to the replicas as kube-apiserver does, with its client certificate, over
/// keep-alive connections (one per replica and drive).
struct Driver {
    config: Arc<rustls::ClientConfig>,
}

#[derive(Debug)]
struct Admitted {
    /// In the order of the distinct ports of the spread.
    by_replica: Vec<u32>,
    sent: u32,
}

impl Admitted {
    fn total(&self) -> u32 {
        self.by_replica.iter().sum()
    }
}

/// One keep-alive HTTPS connection to a replica.
struct Conn(rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>);

impl Conn {
    fn open(config: &Arc<rustls::ClientConfig>, port: u16) -> anyhow::Result<Conn> {
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?.to_owned();
        let tls = rustls::ClientConnection::new(config.clone(), name)?;
        let tcp = std::net::TcpStream::connect(("127.0.0.1", port))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        tcp.set_nodelay(true)?;
        Ok(Conn(rustls::StreamOwned::new(tls, tcp)))
    }

    /// Posts one review; the answer's body.
    fn validate(&mut self, body: &str) -> anyhow::Result<String> {
        use std::io::{Read, Write};
        let request = format!(
            "POST /validate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.0.write_all(request.as_bytes())?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            self.0.read_exact(&mut byte)?;
            head.push(byte[0]);
            ensure!(head.len() < 16 * 1024, "an answer's head past 16 KiB");
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .context("an answer without Content-Length")?;
        let mut answer = vec![0; length];
        self.0.read_exact(&mut answer)?;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }
}

impl Driver {
    /// [`Driver::drive`] round robin over `replicas` for `window`, after a pause: what they
    /// admitted, checked to be the rate within [`TOLERANCE`] (the bucket refilled in the pause
    /// included).
    async fn judged(
        &self,
        namespace: &str,
        replicas: [Replica; 2],
        window: Duration,
        what: &str,
    ) -> anyhow::Result<(Admitted, f64)> {
        let spread = replicas.iter().map(|r| r.https).collect();
        let admitted = self.drive(namespace, spread, window).await?;
        let ratio = ratio(admitted.total(), window, false);
        ensure!(
            (ratio - 1.0).abs() <= TOLERANCE,
            "{what}: admitted {ratio:.3} of the rate ({:?})",
            admitted.by_replica
        );
        Ok((admitted, ratio))
    }

    async fn new(ctx: &Ctx) -> anyhow::Result<Driver> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let identity = webhook_client_ca(ctx.state())?.client(WEBHOOK_CLIENT_NAME, &[])?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(stored(ctx).await?.ca.as_bytes()) {
            roots.add(cert?)?;
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
                    .collect::<Result<_, _>>()?,
                PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())?,
            )?;
        Ok(Driver {
            config: Arc::new(config),
        })
    }

    /// Pod creations in `namespace` at [`DEMAND_PER_SECOND`] for `window`, the n-th to
    /// `spread[n % len]`; counts what each replica admitted. Fails if it could not keep
    /// the demand up (the rate would then be judged on too few calls).
    async fn drive(
        &self,
        namespace: &str,
        spread: Vec<u16>,
        window: Duration,
    ) -> anyhow::Result<Admitted> {
        let (config, ns) = (self.config.clone(), namespace.to_owned());
        tokio::task::spawn_blocking(move || {
            let mut ports: Vec<u16> = Vec::new();
            for p in &spread {
                if !ports.contains(p) {
                    ports.push(*p);
                }
            }
            let mut conns: Vec<Option<Conn>> = ports.iter().map(|_| None).collect();
            let mut by_replica = vec![0; ports.len()];
            let pause = Duration::from_secs_f64(1.0 / DEMAND_PER_SECOND);
            let started = Instant::now();
            let mut n = 0u32;
            while started.elapsed() < window {
                std::thread::sleep((started + pause * n).saturating_duration_since(Instant::now()));
                let port = spread[n as usize % spread.len()];
                let i = ports.iter().position(|p| *p == port).unwrap_or(0);
                let body = pod_create_review(&ns, &format!("d{n}"), "ci-bot");
                let answer = match conns[i].as_mut() {
                    Some(conn) => conn.validate(&body),
                    None => Err(anyhow::anyhow!("not connected")),
                };
                // A connection the replica closed (idle, or restarted) is opened again once.
                let answer = match answer {
                    Ok(a) => a,
                    Err(_) => {
                        let conn = conns[i].insert(Conn::open(&config, port)?);
                        conn.validate(&body)
                            .with_context(|| format!("replica on {port}"))?
                    }
                };
                if answer.contains("\"allowed\":true") {
                    by_replica[i] += 1;
                }
                n += 1;
            }
            let wanted = DEMAND_PER_SECOND * window.as_secs_f64();
            ensure!(
                f64::from(n) >= 0.95 * wanted,
                "the driver sent {n} reviews in {window:?}, short of {wanted}: the machine is too busy for the figures to mean anything"
            );
            Ok(Admitted {
                by_replica,
                sent: n,
            })
        })
        .await?
    }
}
