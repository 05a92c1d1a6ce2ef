//! Connections: one serving path for both listeners (TLS for reviews, plain for metrics),
//! HTTP/1.1 and h2 with their limits, and graceful drain on shutdown.
//!
//! Anyone who reaches a port can open connections, and with `failurePolicy: Ignore` a webhook
//! whose slots are all held admits everything, so every connection is bounded ([`Limits`]):
//! handshakes have their own slots, so silent TCP connections cannot keep established ones
//! from being made, and at capacity the oldest handshake is cancelled; each client address
//! has its own bound in both phases (past it that address's new handshakes are refused, and
//! its own longest-idle connection makes room for a new one); at the established bound the
//! connection idle longest is closed for the new one (kube-apiserver reuses its most recently used connection, so its
//! longest-idle one is the least likely to be wanted); idle connections close after
//! [`Limits::idle_timeout`].

use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex, PoisonError, Weak},
    time::{Duration, Instant},
};

use axum::{Router, extract::Request, response::Response};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::{Notify, Semaphore, watch},
    task::JoinSet,
};
use tokio_rustls::TlsAcceptor;

use super::{
    http::{self, BodyBudget},
    tls::{ClientCa, ClientCert},
};
use crate::metrics::webhook::ListenerMetrics;

/// What one listener allows. The defaults are sized for a webhook replica with a 256 MiB
/// memory limit called by kube-apiserver (up to 25 pooled HTTP/1.1 connections per webhook
/// per API server instance, idle for at most 90 s, reviews of tens of kB).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time allowed for a TLS handshake.
    pub handshake_timeout: Duration,
    /// A connection with no request in progress for this long is closed. HTTP/1.1 headers
    /// must arrive within it too. Longer than Go's 90 s idle timeout, so kube-apiserver
    /// always closes its pooled connections first and never reuses one as it is closed.
    pub idle_timeout: Duration,
    /// Handshakes in progress at once; at the bound the oldest is cancelled.
    pub max_handshakes: usize,
    /// Handshakes in progress from one address; past it the new connection is closed.
    pub max_handshakes_per_client: usize,
    /// Established connections; at the bound the one idle longest is closed, or the new one
    /// if none is idle.
    pub max_connections: usize,
    /// Established connections from one address; at the bound that address's connection
    /// idle longest is closed, or the new one if none is idle.
    pub max_connections_per_client: usize,
    /// h2 streams per connection; kube-apiserver speaks HTTP/1.1 to webhooks.
    pub max_streams: u32,
    /// Bytes of request bodies being read at once, over all connections.
    pub body_budget: usize,
    /// Of those, what the connections from one address may hold.
    pub body_budget_per_client: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            max_handshakes: 256,
            // kube-apiserver dials a connection per concurrent call beyond its idle pool, so
            // a burst of pod creations can start dozens of handshakes at once.
            max_handshakes_per_client: 64,
            max_connections: 512,
            // kube-apiserver's default of 200 mutating requests in flight, each calling one
            // webhook at a time, with room to spare for a second instance behind one address
            // (a konnectivity agent, SNAT) or its idle pool.
            max_connections_per_client: 256,
            max_streams: 32,
            // 21 of the largest bodies kube-apiserver sends (3 MiB), or thousands of pods.
            body_budget: 64 * 1024 * 1024,
            // Five of the largest bodies, or hundreds of ordinary reviews in flight from one
            // API server; four addresses are needed to take the whole budget.
            body_budget_per_client: 16 * 1024 * 1024,
        }
    }
}

impl Limits {
    /// The metrics listener: a scraper or two, no request bodies.
    pub fn metrics() -> Limits {
        Limits {
            max_handshakes: 16,
            max_handshakes_per_client: 8,
            max_connections: 32,
            max_connections_per_client: 8,
            max_streams: 8,
            body_budget: 0,
            body_budget_per_client: 0,
            ..Limits::default()
        }
    }
}

/// Resolves once shutdown is requested (or the sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    // Map the guard away inside: holding it across an await would make the task !Send.
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}

/// How a listener's connections begin: a TLS handshake (with client certificates checked
/// against `clients`, if given), or nothing (plain HTTP).
#[derive(Clone)]
pub enum Transport {
    Tls {
        acceptor: TlsAcceptor,
        clients: Option<ClientCa>,
    },
    Plain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Handshake,
    Established { in_flight: u32 },
}

#[derive(Debug)]
struct Entry {
    client: IpAddr,
    phase: Phase,
    /// When the handshake began, or the last request on the connection ended.
    since: Instant,
    close: Arc<Notify>,
}

/// Why a connection was not let in, or closed by the server: a metric label.
type Why = &'static str;

/// Every connection of one listener, by id: what the bounds are checked against.
#[derive(Default)]
struct Table {
    next: u64,
    entries: HashMap<u64, Entry>,
}

impl Table {
    fn count(&self, phase: fn(&Phase) -> bool, client: Option<IpAddr>) -> usize {
        self.entries
            .values()
            .filter(|e| phase(&e.phase) && client.is_none_or(|c| e.client == c))
            .count()
    }

    /// Closes (and forgets at once, freeing its slot) the entry `pick` chooses.
    fn evict(&mut self, pick: impl Fn(&Entry) -> bool) -> bool {
        let oldest = self
            .entries
            .iter()
            .filter(|(_, e)| pick(e))
            .min_by_key(|(_, e)| e.since)
            .map(|(id, _)| *id);
        match oldest.and_then(|id| self.entries.remove(&id)) {
            Some(gone) => {
                gone.close.notify_one();
                true
            }
            None => false,
        }
    }
}

fn handshaking(p: &Phase) -> bool {
    *p == Phase::Handshake
}

fn established(p: &Phase) -> bool {
    matches!(p, Phase::Established { .. })
}

/// The connections of one listener and its bounds.
struct Registry {
    limits: Limits,
    table: Mutex<Table>,
    metrics: ListenerMetrics,
    /// Each client address's share of the body budget, while it has connections.
    shares: Mutex<HashMap<IpAddr, Weak<Semaphore>>>,
}

impl Registry {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // Every update of the table completes before anything can panic, so a poisoned one
        // is consistent.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lets a new connection from `client` start its handshake, or says why not.
    fn begin_handshake(&self, client: IpAddr, now: Instant) -> Result<(u64, Arc<Notify>), Why> {
        let mut t = self.table();
        if t.count(handshaking, Some(client)) >= self.limits.max_handshakes_per_client {
            return Err("client_handshakes");
        }
        if t.count(handshaking, None) >= self.limits.max_handshakes
            && t.evict(|e| e.phase == Phase::Handshake)
        {
            self.metrics.handshaking.dec();
            self.metrics.closed("handshake_capacity");
        }
        t.next += 1;
        let id = t.next;
        let close = Arc::new(Notify::new());
        t.entries.insert(
            id,
            Entry {
                client,
                phase: Phase::Handshake,
                since: now,
                close: close.clone(),
            },
        );
        self.metrics.handshaking.inc();
        Ok((id, close))
    }

    /// The handshake is done: takes an established slot, or says why there is none.
    fn establish(&self, id: u64, now: Instant) -> Result<(), Why> {
        let mut t = self.table();
        let Some(client) = t.entries.get(&id).map(|e| e.client) else {
            return Err("handshake_capacity");
        };
        let refuse = |t: &mut Table, why| {
            t.entries.remove(&id);
            self.metrics.handshaking.dec();
            Err(why)
        };
        if t.count(established, Some(client)) >= self.limits.max_connections_per_client {
            if !t.evict(|e| e.client == client && e.phase == Phase::Established { in_flight: 0 }) {
                return refuse(&mut t, "client_connections");
            }
            self.metrics.established.dec();
            self.metrics.closed("client_evicted_idle");
        }
        if t.count(established, None) >= self.limits.max_connections {
            if !t.evict(|e| e.phase == Phase::Established { in_flight: 0 }) {
                return refuse(&mut t, "capacity");
            }
            self.metrics.established.dec();
            self.metrics.closed("evicted_idle");
        }
        if let Some(e) = t.entries.get_mut(&id) {
            e.phase = Phase::Established { in_flight: 0 };
            e.since = now;
        }
        self.metrics.handshaking.dec();
        self.metrics.established.inc();
        Ok(())
    }

    /// The body budget share of `client`, the same for all its connections.
    fn share(&self, client: IpAddr) -> Arc<Semaphore> {
        let mut shares = self.shares.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(share) = shares.get(&client).and_then(Weak::upgrade) {
            return share;
        }
        // Addresses without connections left hold nothing: forget them.
        shares.retain(|_, s| s.strong_count() > 0);
        let share = http::client_share(self.limits.body_budget_per_client);
        shares.insert(client, Arc::downgrade(&share));
        share
    }

    /// A request on connection `id` started (`+1`) or ended (`-1`).
    fn request(&self, id: u64, started: bool) {
        let mut t = self.table();
        if let Some(Entry {
            phase: Phase::Established { in_flight },
            since,
            ..
        }) = t.entries.get_mut(&id)
        {
            *in_flight = if started {
                in_flight.saturating_add(1)
            } else {
                in_flight.saturating_sub(1)
            };
            *since = Instant::now();
        }
        if started {
            self.metrics.in_flight.inc();
        } else {
            self.metrics.in_flight.dec();
        }
    }

    /// When connection `id` passes its idle timeout if nothing happens before; `None` while a
    /// request is in progress.
    fn idle_deadline(&self, id: u64) -> Option<Instant> {
        match self.table().entries.get(&id) {
            Some(Entry {
                phase: Phase::Established { in_flight: 0 },
                since,
                ..
            }) => Some(*since + self.limits.idle_timeout),
            _ => None,
        }
    }

    /// The connection's task ended: forget it, unless an eviction already did.
    fn forget(&self, id: u64) {
        if let Some(e) = self.table().entries.remove(&id) {
            match e.phase {
                Phase::Handshake => self.metrics.handshaking.dec(),
                Phase::Established { .. } => self.metrics.established.dec(),
            }
        }
    }
}

/// Forgets the connection when its task ends, however it ends.
struct Registered {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.forget(self.id);
    }
}

/// The router, with what the connection's handshake showed attached to each request, and
/// each request counted on its connection while it runs.
#[derive(Clone)]
struct Tagged {
    router: Router,
    cert: Option<ClientCert>,
    budget: BodyBudget,
    registry: Arc<Registry>,
    id: u64,
}

/// Counts a request as running until its response is ready (or it is dropped).
struct InFlight {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.registry.request(self.id, false);
    }
}

impl tower::Service<Request<hyper::body::Incoming>> for Tagged {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Self::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tower::Service::<Request<hyper::body::Incoming>>::poll_ready(&mut self.router, cx)
    }

    fn call(&mut self, mut req: Request<hyper::body::Incoming>) -> Self::Future {
        if let Some(cert) = &self.cert {
            req.extensions_mut().insert(cert.clone());
        }
        req.extensions_mut().insert(self.budget.clone());
        self.registry.request(self.id, true);
        let in_flight = InFlight {
            registry: self.registry.clone(),
            id: self.id,
        };
        let answer = self.router.call(req);
        Box::pin(async move {
            let answered = answer.await;
            drop(in_flight);
            answered
        })
    }
}

/// One listener: what it accepts connections with, serves on them, and allows.
pub struct Listener {
    pub tcp: TcpListener,
    pub transport: Transport,
    pub router: Router,
    pub limits: Limits,
    pub metrics: ListenerMetrics,
}

/// Accepts connections and serves the listener's router on them until `stop`, then lets
/// in-flight requests finish for up to `drain_timeout`.
pub async fn serve(listener: Listener, mut stop: watch::Receiver<bool>, drain_timeout: Duration) {
    let Listener {
        tcp,
        transport,
        router,
        limits,
        metrics,
    } = listener;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper's header timer also runs while a kept-alive connection waits for its next
        // request, so it is the HTTP/1.1 idle timeout: anything shorter would close
        // kube-apiserver's pooled connections under it.
        .header_read_timeout(limits.idle_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let registry = Arc::new(Registry {
        limits,
        table: Mutex::default(),
        metrics,
        shares: Mutex::default(),
    });
    let budget = BodyBudget::new(limits.body_budget);
    let mut tasks = JoinSet::new();
    loop {
        let (tcp_stream, peer) = tokio::select! {
            accepted = tcp.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            _ = stopped(&mut stop) => break,
        };
        let (id, close) = match registry.begin_handshake(peer.ip(), Instant::now()) {
            Ok(slot) => slot,
            Err(why) => {
                registry.metrics.closed(why);
                tracing::debug!(%peer, why, "connection refused");
                continue;
            }
        };
        let conn = Connection {
            registered: Registered {
                registry: registry.clone(),
                id,
            },
            close,
            peer,
            stop: stop.clone(),
            drain_timeout,
        };
        let service = Tagged {
            router: router.clone(),
            cert: None,
            budget: budget.clone(),
            registry: registry.clone(),
            id,
        };
        tasks.spawn(conn.run(tcp_stream, transport.clone(), service, builder.clone()));
    }
    drop(tcp);
    tracing::info!("draining in-flight requests");
    let drained = tokio::time::timeout(drain_timeout, async {
        while tasks.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        tracing::warn!(
            ?drain_timeout,
            "drain timed out; closing remaining connections"
        );
    }
}

/// One accepted connection, from its handshake to its close.
struct Connection {
    registered: Registered,
    close: Arc<Notify>,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
    drain_timeout: Duration,
}

impl Connection {
    fn why_closed(&self, why: Why) {
        self.registered.registry.metrics.closed(why);
        tracing::debug!(peer = %self.peer, why, "connection closed");
    }

    async fn run(
        mut self,
        tcp: TcpStream,
        transport: Transport,
        mut service: Tagged,
        builder: auto::Builder<TokioExecutor>,
    ) {
        let _ = tcp.set_nodelay(true);
        let registry = self.registered.registry.clone();
        service.budget = service.budget.for_client(registry.share(self.peer.ip()));
        match transport {
            Transport::Plain => {
                if self.established(&registry) {
                    self.serve(tcp, service, builder).await;
                }
            }
            Transport::Tls { acceptor, clients } => {
                let timeout = registry.limits.handshake_timeout;
                let handshake = tokio::time::timeout(timeout, acceptor.accept(tcp));
                let tls = tokio::select! {
                    done = handshake => match done {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed");
                            return self.why_closed("handshake_failed");
                        }
                        Err(_) => return self.why_closed("handshake_timeout"),
                    },
                    // Cancelled for a newer handshake; counted by whoever cancelled it.
                    _ = self.close.notified() => return,
                    _ = stopped(&mut self.stop) => return,
                };
                // The verifier has checked the chain of any certificate presented; who it
                // names is checked here, once per connection.
                service.cert = clients
                    .as_ref()
                    .map(|ca| ca.check(tls.get_ref().1.peer_certificates()));
                if self.established(&registry) {
                    self.serve(tls, service, builder).await;
                }
            }
        }
    }

    fn established(&self, registry: &Registry) -> bool {
        match registry.establish(self.registered.id, Instant::now()) {
            Ok(()) => true,
            Err(why) => {
                self.why_closed(why);
                false
            }
        }
    }

    async fn serve<I>(mut self, io: I, service: Tagged, builder: auto::Builder<TokioExecutor>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let registry = self.registered.registry.clone();
        let id = self.registered.id;
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service));
        let mut conn = std::pin::pin!(conn);
        let idle = registry.limits.idle_timeout;
        // How long a connection asked to close may take to finish what it is doing.
        let mut grace = registry.limits.handshake_timeout;
        loop {
            let deadline = registry
                .idle_deadline(id)
                .unwrap_or_else(|| Instant::now() + idle);
            tokio::select! {
                done = conn.as_mut() => {
                    if let Err(e) = done {
                        tracing::debug!(peer = %self.peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                // Evicted for a new connection; counted by whoever evicted it.
                _ = self.close.notified() => break,
                _ = stopped(&mut self.stop) => {
                    grace = self.drain_timeout;
                    break;
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    if registry.idle_deadline(id).is_some_and(|d| d <= Instant::now()) {
                        self.why_closed("idle_timeout");
                        break;
                    }
                }
            }
        }
        conn.as_mut().graceful_shutdown();
        if tokio::time::timeout(grace, conn).await.is_err() {
            tracing::debug!(peer = %self.peer, "connection did not finish in time; dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::webhook::WebhookMetrics;

    fn registry(limits: Limits) -> Registry {
        Registry {
            limits,
            table: Mutex::default(),
            metrics: WebhookMetrics::new().connections.listener("https"),
            shares: Mutex::default(),
        }
    }

    #[test]
    fn the_idle_timeout_outlasts_the_api_servers_own() {
        // Go's http.Transport closes idle connections after 90 s; closing sooner races reuse.
        assert!(Limits::default().idle_timeout > Duration::from_secs(90));
    }

    #[test]
    fn at_capacity_the_longest_idle_connection_makes_room_and_busy_ones_stay() {
        let r = registry(Limits {
            max_connections: 2,
            ..Limits::default()
        });
        let t = Instant::now();
        let ip = |n| IpAddr::from([127, 0, 0, n]);
        let open = |n, at| {
            let (id, close) = r.begin_handshake(ip(n), at).expect("handshake slot");
            r.establish(id, at).map(|()| (id, close))
        };
        let (old, old_close) = open(2, t).unwrap();
        let (busy, _) = open(3, t + Duration::from_secs(1)).unwrap();
        r.request(busy, true);
        // Full: the idle one goes, and is told to close.
        let (_new, _) = open(4, t + Duration::from_secs(2)).unwrap();
        assert!(r.idle_deadline(old).is_none(), "evicted");
        assert!(
            futures::FutureExt::now_or_never(old_close.notified()).is_some(),
            "told to close"
        );
        // With every connection busy, the new one is refused instead.
        let (fifth, _) = open(5, t + Duration::from_secs(3)).unwrap();
        r.request(fifth, true);
        assert_eq!(open(6, t + Duration::from_secs(4)).err(), Some("capacity"));
        assert!(r.table().entries.contains_key(&busy));
    }

    #[test]
    fn one_address_cannot_take_every_handshake_slot() {
        let r = registry(Limits {
            max_handshakes: 4,
            max_handshakes_per_client: 2,
            ..Limits::default()
        });
        let t = Instant::now();
        let flood = IpAddr::from([127, 0, 0, 2]);
        assert!(r.begin_handshake(flood, t).is_ok());
        assert!(r.begin_handshake(flood, t).is_ok());
        assert_eq!(r.begin_handshake(flood, t).err(), Some("client_handshakes"));
        // Others get in; at the total bound the oldest handshake is cancelled.
        for n in 3..6 {
            assert!(r.begin_handshake(IpAddr::from([127, 0, 0, n]), t).is_ok());
        }
        assert_eq!(r.table().count(handshaking, None), 4);
    }
}
