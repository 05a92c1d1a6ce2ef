//! The exchange of consumption between replicas (docs/architecture.md, "Replicas share one
//! limit"): every [`SYNC_EVERY`], or at once when the ledger says a namespace is near a limit,
//! this replica sends its [`Report`] to every peer over mutual TLS, and takes theirs on
//! `POST /peers/v1/report`. From who answers and who reports it decides which replicas it
//! shares with (its group) and so the part of each rate it may use.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::{net::TcpStream, sync::Notify, sync::watch};
use tokio_rustls::TlsConnector;

use crate::{
    cluster::cache::Cache,
    metrics::webhook::PeerMetrics,
    quota::{
        ledger::Ledger,
        peers::{Ack, MAX_REPORT_BYTES, PEER_TIMEOUT, Report, ReportError, SYNC_EVERY},
        view::ClusterView,
    },
};

pub const REPORT_PATH: &str = "/peers/v1/report";

/// How long one report to one peer may take, connection included.
const SEND_TIMEOUT: Duration = Duration::from_millis(500);

/// What the sender and the peer listener share.
pub struct Exchange {
    ledger: Arc<Ledger>,
    cache: Arc<Cache>,
    metrics: PeerMetrics,
    /// Peers (by id) this replica's reports reached lately: their hits are folded in.
    reached: Mutex<HashMap<u64, Instant>>,
    nudge: Arc<Notify>,
    seq: AtomicU64,
}

impl Exchange {
    pub fn new(ledger: Arc<Ledger>, cache: Arc<Cache>, metrics: PeerMetrics) -> Arc<Exchange> {
        let nudge = Arc::new(Notify::new());
        let n = nudge.clone();
        ledger.on_near_limit(Box::new(move || n.notify_one()));
        Arc::new(Exchange {
            ledger,
            cache,
            metrics,
            reached: Mutex::new(HashMap::new()),
            nudge,
            seq: AtomicU64::new(0),
        })
    }

    fn reached(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Instant>> {
        self.reached.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `peer` answered one of this replica's reports within [`PEER_TIMEOUT`].
    fn reaches(&self, peer: u64, now: Instant) -> bool {
        self.reached()
            .get(&peer)
            .is_some_and(|t| now.saturating_duration_since(*t) < PEER_TIMEOUT)
    }

    /// Takes one peer's report in; the answer, and whether the report was this replica's own
    /// (it reached itself through its Service: the answer tells it so).
    pub fn receive(&self, body: &[u8], now: Instant) -> Result<(Ack, bool), ReportError> {
        let report = Report::decode(body)?;
        let own = self.ledger.id();
        if report.from == own {
            return Ok((Ack { id: own }, true));
        }
        let in_group = self.reaches(report.from, now);
        let cache = &self.cache;
        let rate_of = |ns: &str| {
            let info = cache.namespace(ns)?;
            info.policy.rate.map(|r| (r, info.policy.burst))
        };
        self.ledger.absorb(&report, in_group, rate_of, now)?;
        Ok((Ack { id: own }, false))
    }

    /// The peer listener's routes.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route(REPORT_PATH, post(receive))
            .with_state(self.clone())
    }

    /// Sends reports to the peers in `targets` until the process ends.
    pub fn spawn(
        self: &Arc<Self>,
        targets: watch::Receiver<Vec<SocketAddr>>,
        tls: Arc<rustls::ClientConfig>,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move { this.run(targets, TlsConnector::from(tls)).await })
    }

    async fn run(&self, targets: watch::Receiver<Vec<SocketAddr>>, tls: TlsConnector) {
        let mut peers: BTreeMap<SocketAddr, Peer> = BTreeMap::new();
        let mut grouped = Vec::new();
        let mut was_sending = false;
        loop {
            tokio::select! {
                () = self.nudge.notified() => {}
                () = tokio::time::sleep(SYNC_EVERY) => {}
            }
            let listed = targets.borrow().clone();
            peers.retain(|addr, _| listed.contains(addr));
            for addr in listed {
                peers.entry(addr).or_default();
            }
            // Alone (or only itself listed): nothing to send, and no hits kept for it; what
            // was kept before goes with one last report, to no one.
            let sending = peers.values().any(|p| !p.own);
            self.ledger.set_reporting(sending);
            let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
            if !sending {
                if was_sending {
                    let (_, sent) = self.ledger.report(seq);
                    self.ledger.confirm(&sent);
                }
                was_sending = false;
                grouped = self.regroup(&peers, Instant::now(), &grouped);
                continue;
            }
            was_sending = true;
            let (report, sent) = self.ledger.report(seq);
            let body = match serde_json::to_vec(&report) {
                Ok(b) => Bytes::from(b),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot encode a peer report");
                    continue;
                }
            };
            let own = self.ledger.id();
            let sends = peers
                .iter_mut()
                .filter(|(_, p)| !p.own)
                .map(|(addr, p)| p.send(*addr, &tls, body.clone(), &self.metrics));
            let answers: Vec<(SocketAddr, Ack)> = futures::future::join_all(sends)
                .await
                .into_iter()
                .flatten()
                .collect();
            // Every peer this replica shares with has the report: its reservations are
            // common knowledge now (see quota::decide, Snapshot::projected).
            if grouped.iter().all(|g| answers.iter().any(|(a, _)| a == g)) {
                self.ledger.confirm(&sent);
            }
            let now = Instant::now();
            for (addr, ack) in answers {
                if ack.id == own {
                    if let Some(p) = peers.get_mut(&addr) {
                        p.own = true;
                        p.conn = None;
                    }
                } else {
                    self.reached().insert(ack.id, now);
                }
            }
            self.reached()
                .retain(|_, t| now.saturating_duration_since(*t) < PEER_TIMEOUT);
            grouped = self.regroup(&peers, now, &grouped);
        }
    }

    /// Sets the group from who answered and who reported lately, and returns its members'
    /// addresses. One that left the group while still listed is a fallback: this replica no
    /// longer counts its hits and takes a smaller part of each rate.
    fn regroup(
        &self,
        peers: &BTreeMap<SocketAddr, Peer>,
        now: Instant,
        before: &[SocketAddr],
    ) -> Vec<SocketAddr> {
        let others = || peers.iter().filter(|(_, p)| !p.own);
        let seen = u32::try_from(others().count()).unwrap_or(u32::MAX);
        let grouped: Vec<SocketAddr> = others()
            .filter(|(_, p)| {
                p.id.is_some_and(|id| self.reaches(id, now) && self.ledger.heard_from(id, now))
            })
            .map(|(addr, _)| *addr)
            .collect();
        let reachable = u32::try_from(grouped.len()).unwrap_or(u32::MAX);
        self.ledger.set_group(reachable + 1);
        self.metrics.set_group(seen, reachable);
        let lost: Vec<&SocketAddr> = before
            .iter()
            .filter(|a| !grouped.contains(a) && peers.contains_key(a))
            .collect();
        if !lost.is_empty() {
            self.metrics.fallbacks.inc();
            tracing::warn!(
                ?lost,
                seen,
                reachable,
                replicas = self.ledger.replicas(),
                "peers stopped answering or reporting: this replica takes its part of each rate"
            );
        } else if grouped.len() > before.len() {
            tracing::info!(
                seen,
                reachable,
                replicas = self.ledger.replicas(),
                "sharing consumption with more peers"
            );
        }
        grouped
    }
}

/// One peer endpoint as the sender knows it.
#[derive(Default)]
struct Peer {
    /// Its id, from its last answer.
    id: Option<u64>,
    /// The endpoint is this replica itself (it answered with this replica's id).
    own: bool,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl Peer {
    /// Sends one report; the peer's answer, or `None` (the connection is dropped then).
    async fn send(
        &mut self,
        addr: SocketAddr,
        tls: &TlsConnector,
        body: Bytes,
        metrics: &PeerMetrics,
    ) -> Option<(SocketAddr, Ack)> {
        let started = Instant::now();
        let len = body.len();
        match tokio::time::timeout(SEND_TIMEOUT, self.exchange(addr, tls, body)).await {
            Ok(Ok(ack)) => {
                metrics.sync.observe(started.elapsed().as_secs_f64());
                metrics.bytes_sent.inc_by(len as u64);
                metrics.sends.with_label_values(&["ok"]).inc();
                self.id = Some(ack.id);
                Some((addr, ack))
            }
            Ok(Err(e)) => {
                tracing::debug!(%addr, error = %e, "peer report not delivered");
                self.fail(metrics)
            }
            Err(_) => {
                tracing::debug!(%addr, "peer report timed out");
                self.fail(metrics)
            }
        }
    }

    fn fail(&mut self, metrics: &PeerMetrics) -> Option<(SocketAddr, Ack)> {
        metrics.sends.with_label_values(&["error"]).inc();
        self.conn = None;
        None
    }

    async fn exchange(
        &mut self,
        addr: SocketAddr,
        tls: &TlsConnector,
        body: Bytes,
    ) -> Result<Ack, SendError> {
        let mut conn = match self.conn.take() {
            Some(c) if !c.is_closed() => c,
            _ => connect(addr, tls).await?,
        };
        conn.ready().await?;
        let request = http::Request::post(REPORT_PATH)
            .header(http::header::HOST, addr.to_string())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))?;
        let response = conn.send_request(request).await?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), 4096)
            .collect()
            .await
            .map_err(|e| SendError::Answer(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            return Err(SendError::Answer(format!(
                "{status}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        let ack = serde_json::from_slice(&body).map_err(|e| SendError::Answer(e.to_string()))?;
        self.conn = Some(conn);
        Ok(ack)
    }
}

#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("connect: {0}")]
    Connect(#[from] std::io::Error),
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("request: {0}")]
    Request(#[from] http::Error),
    #[error("answer: {0}")]
    Answer(String),
}

async fn connect(
    addr: SocketAddr,
    tls: &TlsConnector,
) -> Result<SendRequest<Full<Bytes>>, SendError> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let stream = tls
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

async fn receive(State(exchange): State<Arc<Exchange>>, body: Body) -> Response {
    let refused = |e: ReportError, metrics: &PeerMetrics| {
        metrics.received.with_label_values(&[e.label()]).inc();
        tracing::debug!(error = %e, "peer report refused");
        let status = match e {
            ReportError::Replay { .. } | ReportError::Own => StatusCode::CONFLICT,
            ReportError::TooManyPeers => StatusCode::SERVICE_UNAVAILABLE,
            ReportError::Malformed(_) | ReportError::Bounds(_) => StatusCode::BAD_REQUEST,
        };
        (status, format!("{e}\n")).into_response()
    };
    let metrics = &exchange.metrics;
    let bytes = match axum::body::to_bytes(body, MAX_REPORT_BYTES).await {
        Ok(b) => b,
        Err(e) => return refused(ReportError::Bounds(e.to_string()), metrics),
    };
    match exchange.receive(&bytes, Instant::now()) {
        Ok((ack, own)) => {
            let result = if own { "own" } else { "accepted" };
            metrics.received.with_label_values(&[result]).inc();
            match serde_json::to_vec(&ack) {
                Ok(body) => {
                    ([(http::header::CONTENT_TYPE, "application/json")], body).into_response()
                }
                Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
            }
        }
        Err(e) => refused(e, metrics),
    }
}

#[cfg(test)]
mod tests;
