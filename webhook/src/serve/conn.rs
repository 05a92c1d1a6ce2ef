//! Connections: TLS handshakes with a timeout, HTTP/1.1 and h2 with their limits, a cap on
//! open connections, and graceful drain on shutdown.

use std::{sync::Arc, time::Duration};

use axum::{Router, extract::Request, response::Response};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::watch};
use tokio_rustls::TlsAcceptor;

/// Time allowed for a TLS handshake and for request headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 streams per connection; kube-apiserver opens few, a flood of them is hostile.
const MAX_STREAMS: u32 = 256;
/// Open connections at once; past this, new ones wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 4096;

/// Resolves once shutdown is requested (or the sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    // Map the guard away inside: holding it across an await would make the task !Send.
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}

/// Whether the connection a request came on presented a verified client certificate, when
/// client certificates are required for reviews.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCert {
    Verified,
    Absent,
}

/// The router, with what the connection's TLS handshake showed attached to each request.
#[derive(Clone)]
struct Tagged {
    router: Router,
    cert: Option<ClientCert>,
}

impl tower::Service<Request<hyper::body::Incoming>> for Tagged {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = <Router as tower::Service<Request<hyper::body::Incoming>>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tower::Service::<Request<hyper::body::Incoming>>::poll_ready(&mut self.router, cx)
    }

    fn call(&mut self, mut req: Request<hyper::body::Incoming>) -> Self::Future {
        if let Some(cert) = self.cert {
            req.extensions_mut().insert(cert);
        }
        self.router.call(req)
    }
}

/// Accepts TLS connections and serves `router` on them until `stop`, then drains.
pub async fn serve_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: Router,
    mtls: bool,
    mut stop: watch::Receiver<bool>,
    drain_timeout: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stopped(&mut stop) => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            // The verifier has checked any certificate presented; only whether one was is left.
            let cert = mtls.then(|| {
                if tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .is_some_and(|c| !c.is_empty())
                {
                    ClientCert::Verified
                } else {
                    ClientCert::Absent
                }
            });
            let service = TowerToHyperService::new(Tagged { router, cert });
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("draining in-flight requests");
    if tokio::time::timeout(drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?drain_timeout,
            "drain timed out; closing remaining connections"
        );
    }
}
