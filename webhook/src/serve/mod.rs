//! Serving: the HTTPS review and probe routes ([`http`]), connections and drain ([`conn`]),
//! the served certificate and its reload ([`tls`]), self-managed certificates kept in a
//! Secret ([`managed`]), and the plain-HTTP metrics listener.

pub mod conn;
pub mod http;
pub mod managed;
pub mod tls;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};
use tokio_rustls::TlsAcceptor;

use crate::metrics::{Scrape, webhook::TlsMetrics};
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
}

/// A started server: its bound addresses and the way to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
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
    tls_metrics: TlsMetrics,
    opts: ServeOptions,
) -> Result<Running, ServerError> {
    let bind_err = |addr| move |source| ServerError::Bind { addr, source };
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(bind_err(opts.listen))?;
    let addr = listener.local_addr().map_err(bind_err(opts.listen))?;
    let acceptor = TlsAcceptor::from(opts.certs.server_config(opts.client_ca.as_ref())?);
    let mtls = opts.client_ca.is_some();
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    let mut metrics_addr = None;
    if let Some(m) = opts.metrics_listen {
        let mut rx = stop_rx.clone();
        let shutdown = async move { conn::stopped(&mut rx).await };
        let (bound, task) = crate::metrics::serve(m, scrape, shutdown)
            .await
            .map_err(bind_err(m))?;
        metrics_addr = Some(bound);
        tasks.push(task);
    }

    let reload = tokio::spawn(opts.certs.clone().watch(opts.reload_interval, tls_metrics));
    let router = http::router(service.clone());
    let drain_timeout = opts.drain_timeout;
    tasks.push(tokio::spawn(async move {
        conn::serve_tls(listener, acceptor, router, mtls, stop_rx, drain_timeout).await;
        reload.abort();
    }));
    tracing::info!(%addr, ?metrics_addr, "webhook listening");
    Ok(Running {
        addr,
        metrics_addr,
        service,
        stop,
        tasks,
    })
}
