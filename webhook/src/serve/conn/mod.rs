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
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
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
    sync::{Notify, watch},
    task::JoinSet,
};
use tokio_rustls::TlsAcceptor;

use super::{
    http::BodyBudget,
    tls::{ClientCa, ClientCert},
};
use crate::metrics::conn::ListenerMetrics;

mod registry;
pub use registry::Limits;
use registry::{Registered, Registry, Why};

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
    let registry = Arc::new(Registry::new(limits, metrics));
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
