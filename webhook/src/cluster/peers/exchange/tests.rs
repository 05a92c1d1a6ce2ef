//! Two replicas in one process, each with its own ledger, cache and peer listener over real
//! mutual TLS: they find themselves among the endpoints, form one group, and share one rate;
//! a caller with another key is refused at the handshake.

use std::collections::BTreeMap;

use tokio::net::TcpListener;

use super::*;
use crate::{
    metrics::webhook::WebhookMetrics,
    policy::{Policy, pod::PodRules},
    quota::{
        ClusterLimits,
        decide::{Ask, Limits},
        ledger::{Commit, Request},
    },
    serve::{
        conn::{self, Limits as ConnLimits, Listener, Transport},
        peer_tls,
        tls::CertStore,
    },
};

struct Replica {
    ledger: Arc<Ledger>,
    cache: Arc<Cache>,
    metrics: WebhookMetrics,
    exchange: Arc<Exchange>,
    addr: SocketAddr,
    _stop: watch::Sender<bool>,
}

fn certs(ca: &bulwark_certs::Ca) -> Arc<CertStore> {
    let pair = ca
        .server(&["bulwark-webhook.bulwark-system.svc".to_owned()], &[])
        .unwrap();
    CertStore::from_pem(&pair.cert_pem, &pair.key_pem).unwrap()
}

/// A replica serving its peer listener with `certs`, not yet sending.
async fn replica(certs: &Arc<CertStore>) -> Replica {
    let ledger = Arc::new(Ledger::new(Duration::from_secs(30), Instant::now()));
    let cache = Arc::new(Cache::new(Policy::default(), PodRules::default()));
    let annotations = BTreeMap::from([
        ("bulwark.io/pod-rate".to_owned(), "1/m".to_owned()),
        ("bulwark.io/pod-burst".to_owned(), "4".to_owned()),
    ]);
    cache.apply_namespace("ci", Some(&annotations), Instant::now());
    let metrics = WebhookMetrics::new();
    let exchange = Exchange::new(ledger.clone(), cache.clone(), metrics.peers.clone());
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let listener = Listener {
        tcp,
        transport: Transport::Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(peer_tls::server_config(certs).unwrap()),
            clients: None,
        },
        router: exchange.router(),
        limits: ConnLimits::peers(),
        metrics: metrics.connections.listener("peers"),
    };
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(conn::serve(listener, stopped, Duration::from_secs(1)));
    Replica {
        ledger,
        cache,
        metrics,
        exchange,
        addr,
        _stop: stop,
    }
}

impl Replica {
    fn admit(&self) -> bool {
        let info = self.cache.namespace("ci").unwrap();
        let req = Request {
            namespace: "ci",
            name: None,
            policy: &info.policy,
            ask: Ask::default(),
            commit: Commit::Enforce,
            joins_line: false,
            unknown_namespace: false,
        };
        let limits = Limits {
            cluster: ClusterLimits {
                max_pending_pods: None,
                pending_per_healthy_node: None,
            },
            workflow_reserved_percent: 0,
            count_quotas: true,
        };
        self.ledger
            .admit(self.cache.as_ref(), &req, &limits, Instant::now())
            .is_ok()
    }

    fn metric(&self, line: &str) -> bool {
        use crate::metrics::Scrape;
        self.metrics.scrape().lines().any(|l| l == line)
    }
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn two_replicas_share_one_rate_over_mutual_tls() {
    let ca = bulwark_certs::Ca::new("webhook", 1).unwrap();
    let served = certs(&ca);
    let (a, b) = (replica(&served).await, replica(&served).await);
    // Both endpoints listed for both, as the Service's EndpointSlice lists them.
    let listed = vec![a.addr, b.addr];
    let mut senders = Vec::new();
    for r in [&a, &b] {
        r.ledger.set_replicas(2);
        let (tx, rx) = watch::channel(listed.clone());
        senders.push(tx);
        r.exchange
            .spawn(rx, peer_tls::client_config(&served).unwrap());
    }
    until("one group of two", || {
        a.ledger.part().is_whole() && b.ledger.part().is_whole()
    })
    .await;
    assert!(a.metric("bulwark_peers{state=\"reachable\"} 1"));
    assert!(
        a.metric("bulwark_peers{state=\"seen\"} 1"),
        "itself is not a peer"
    );
    assert!(a.metric("bulwark_rate_share 1"));

    // The whole burst of 4 on a; b learns of it and refuses, though it admitted nothing.
    for _ in 0..4 {
        assert!(a.admit());
    }
    assert!(!a.admit());
    until("b has a's hits", || !b.admit()).await;

    // b's endpoint goes away: a stops sending to it, and it ages out of a's group.
    senders[0].send_replace(vec![a.addr]);
    a.ledger.set_replicas(1);
    until("a alone", || {
        a.metric("bulwark_peers{state=\"seen\"} 0") && a.ledger.part().is_whole()
    })
    .await;
}

#[tokio::test]
async fn a_replica_cut_off_keeps_its_part_and_another_key_is_refused() {
    let ca = bulwark_certs::Ca::new("webhook", 1).unwrap();
    let served = certs(&ca);
    let a = replica(&served).await;
    // Same CA, same names, another key: not a peer.
    let other = certs(&ca);
    let stranger = replica(&other).await;
    a.ledger.set_replicas(2);
    let (_tx, rx) = watch::channel(vec![a.addr, stranger.addr]);
    a.exchange
        .spawn(rx, peer_tls::client_config(&served).unwrap());
    let (_tx2, rx2) = watch::channel(vec![stranger.addr, a.addr]);
    stranger
        .exchange
        .spawn(rx2, peer_tls::client_config(&other).unwrap());
    until("a's reports refused by the stranger", || {
        a.metrics.peers.sends.with_label_values(&["error"]).get() >= 5
    })
    .await;
    // a never forms a group with it: half the rate and burst (2 of 4).
    assert_eq!(a.ledger.part(), crate::quota::peers::Part::new(1, 2));
    assert!(a.metric("bulwark_peers{state=\"reachable\"} 0"));
    assert!(a.admit() && a.admit());
    assert!(!a.admit(), "a alone has half the burst");
    // Nothing from the stranger reached a's book.
    assert_eq!(
        a.metrics
            .peers
            .received
            .with_label_values(&["accepted"])
            .get(),
        0
    );
}
