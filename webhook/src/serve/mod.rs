//! Serving: the HTTPS review and probe routes ([`http`]), connections and drain ([`conn`]),
//! the served certificate and its reload ([`tls`]), self-managed certificates kept in a
//! Secret ([`managed`]), the plain-HTTP metrics listener and the peer listener (TLS between
//! replicas, [`peer_tls`]), each served by the same connection path with its own limits.

pub mod conn;
pub mod http;
pub mod managed;
pub mod peer_tls;
pub mod tls;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};
use tokio_rustls::TlsAcceptor;

use prometheus::IntGauge;

use crate::metrics::{
    Scrape,
    conn::{ConnMetrics, ListenerMetrics},
    webhook::TlsMetrics,
};
use conn::{Limits, Listener, Transport};
use http::Service;
use tls::{CertStore, ClientCa};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

pub struct ServeOptions {
    pub listen: SocketAddr,
    /// `None`: no metrics listener.
    pub metrics_listen: Option<SocketAddr>,
    pub certs: Arc<CertStore>,
    /// Require a client certificate from this CA for /mutate and /validate (mTLS).
    pub client_ca: Option<ClientCa>,
    pub reload_interval: Duration,
    /// How long in-flight requests may take to finish after shutdown starts.
    pub drain_timeout: Duration,
    /// What the HTTPS listener allows (the metrics listener has [`Limits::metrics`]).
    pub limits: Limits,
    /// The listener other replicas report their consumption to, and what it serves.
    pub peers: Option<(SocketAddr, axum::Router)>,
}

/// A started server: its bound addresses and the way to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub peers_addr: Option<SocketAddr>,
    service: Arc<Service>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (up to the drain timeout), and returns.
    pub async fn shutdown(self) {
        self.service.drain();
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Binds both listeners and serves until [`Running::shutdown`].
pub async fn start(
    service: Arc<Service>,
    scrape: Arc<dyn Scrape>,
    metrics: (TlsMetrics, ConnMetrics, IntGauge),
    opts: ServeOptions,
) -> Result<Running, ServerError> {
    let (tls_metrics, conn_metrics, authenticated) = metrics;
    let (tcp, addr) = bind(opts.listen).await?;
    let acceptor = TlsAcceptor::from(opts.certs.server_config(opts.client_ca.as_ref())?);
    announce_authentication(opts.client_ca.as_ref(), &authenticated);
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    let mut metrics_addr = None;
    if let Some(m) = opts.metrics_listen {
        let (bound, task) = serve_metrics(
            m,
            scrape,
            conn_metrics.listener("metrics"),
            stop_rx.clone(),
            opts.drain_timeout,
        )
        .await?;
        metrics_addr = Some(bound);
        tasks.push(task);
    }

    let mut peers_addr = None;
    if let Some((addr, router)) = opts.peers {
        let (tcp, bound) = bind(addr).await?;
        let listener = Listener {
            tcp,
            transport: Transport::Tls {
                acceptor: TlsAcceptor::from(peer_tls::server_config(&opts.certs)?),
                clients: None,
            },
            router,
            limits: Limits::peers(),
            metrics: conn_metrics.listener("peers"),
        };
        peers_addr = Some(bound);
        tasks.push(tokio::spawn(conn::serve(
            listener,
            stop_rx.clone(),
            opts.drain_timeout,
        )));
    }

    let reload = tokio::spawn(opts.certs.clone().watch(opts.reload_interval, tls_metrics));
    let listener = Listener {
        tcp,
        transport: Transport::Tls {
            acceptor,
            clients: opts.client_ca,
        },
        router: http::router(service.clone()),
        limits: opts.limits,
        metrics: conn_metrics.listener("https"),
    };
    let drain_timeout = opts.drain_timeout;
    tasks.push(tokio::spawn(async move {
        conn::serve(listener, stop_rx, drain_timeout).await;
        reload.abort();
    }));
    tracing::info!(%addr, ?metrics_addr, ?peers_addr, "webhook listening");
    Ok(Running {
        addr,
        metrics_addr,
        peers_addr,
        service,
        stop,
        tasks,
    })
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServerError> {
    let bind_err = |source| ServerError::Bind { addr, source };
    let tcp = TcpListener::bind(addr).await.map_err(bind_err)?;
    let bound = tcp.local_addr().map_err(bind_err)?;
    Ok((tcp, bound))
}

/// Binds `addr` and serves `GET /metrics` and `/healthz` of `scrape` over plain HTTP until
/// `stop`, through the same bounded connection path as reviews with [`Limits::metrics`]: a
/// scraper's port is reachable by more than the scraper. Both programs' metrics listener.
pub async fn serve_metrics(
    addr: SocketAddr,
    scrape: Arc<dyn Scrape>,
    metrics: ListenerMetrics,
    stop: watch::Receiver<bool>,
    drain_timeout: Duration,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), ServerError> {
    let (tcp, bound) = bind(addr).await?;
    let listener = Listener {
        tcp,
        transport: Transport::Plain,
        router: crate::metrics::router(scrape),
        limits: Limits::metrics(),
        metrics,
    };
    Ok((
        bound,
        tokio::spawn(conn::serve(listener, stop, drain_timeout)),
    ))
}

/// Says, in the log and in `bulwark_reviews_authenticated`, whether reviews are known to come
/// from the API server: without it, anyone who reaches the port can send them.
fn announce_authentication(clients: Option<&ClientCa>, authenticated: &IntGauge) {
    match clients {
        None => {
            authenticated.set(0);
            tracing::warn!(
                "reviews are not authenticated (no --client-ca): anyone who reaches the port \
                 can send them; a forged review cannot raise a limit but can use up a \
                 namespace's rate and hold its reservations for reservationTtlSeconds"
            );
        }
        Some(ca) if ca.names().is_empty() => {
            authenticated.set(0);
            tracing::warn!(
                "reviews need a certificate of --client-ca but no --client-name is checked: \
                 any certificate that CA signed may send them"
            );
        }
        Some(ca) => {
            authenticated.set(1);
            tracing::info!(names = ?ca.names(), "reviews only from client certificates naming these");
        }
    }
}
