//! HTTPS serving: routing, body limits and timeouts, TLS with reload, graceful drain.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::watch};
use tokio_rustls::TlsAcceptor;

use crate::{
    admission::{self, MAX_BODY_BYTES, ReviewError},
    admit::Admitter,
    cache::Cache,
    ledger::Ledger,
    metrics::Metrics,
    tls::{CertStore, ClientCa},
};

/// Time allowed for a TLS handshake, for request headers, and for a request body.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 streams per connection; kube-apiserver opens few, a flood of them is hostile.
const MAX_STREAMS: u32 = 256;
/// Open connections at once; past this, new ones wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 4096;

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

/// Everything the handlers share.
pub struct App {
    pub admitter: Admitter,
    pub cache: Arc<Cache>,
    pub ledger: Arc<Ledger>,
    pub metrics: Arc<Metrics>,
    /// Without an API server there is nothing to sync: ready at once.
    pub offline: bool,
    pub draining: AtomicBool,
}

impl App {
    /// Wires the decision parts together around an empty cache.
    pub fn new(config: Arc<crate::config::Config>, offline: bool) -> Arc<App> {
        let now = Instant::now();
        let cache = Arc::new(Cache::new(
            config.defaults.clone(),
            config.workflow_labels.clone(),
        ));
        let ledger = Arc::new(Ledger::new(config.reservation_ttl, now));
        let metrics = Arc::new(Metrics::new());
        if let Ok(since) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            metrics.set_start_time(since.as_secs_f64());
        }
        let admitter = Admitter::new(config, cache.clone(), ledger.clone(), metrics.clone());
        Arc::new(App {
            admitter,
            cache,
            ledger,
            metrics,
            offline,
            draining: AtomicBool::new(false),
        })
    }

    fn ready(&self) -> Result<(), &'static str> {
        if self.draining.load(Ordering::Acquire) {
            Err("shutting down")
        } else if !self.offline && !self.cache.is_synced() {
            Err("watch caches not synced yet")
        } else {
            Ok(())
        }
    }
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
    app: Arc<App>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (up to the drain timeout), and returns.
    pub async fn shutdown(self) {
        self.app.draining.store(true, Ordering::Release);
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/validate", post(validate))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(app)
}

fn metrics_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(app)
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    match app.ready() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let text = app.metrics.render(&app.cache, &app.ledger, Instant::now());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn mutate(State(app): State<Arc<App>>, req: Request) -> Response {
    review(app, Endpoint::Mutate, req).await
}

async fn validate(State(app): State<Arc<App>>, req: Request) -> Response {
    review(app, Endpoint::Validate, req).await
}

#[derive(Clone, Copy)]
enum Endpoint {
    Mutate,
    Validate,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Mutate => "mutate",
            Endpoint::Validate => "validate",
        }
    }
}

fn declared_too_large(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_BODY_BYTES as u64)
}

async fn read_body(headers: &HeaderMap, body: Body) -> Result<bytes::Bytes, ReviewError> {
    if declared_too_large(headers) {
        return Err(ReviewError::TooLarge);
    }
    let collect = Limited::new(body, MAX_BODY_BYTES).collect();
    match tokio::time::timeout(BODY_TIMEOUT, collect).await {
        Err(_) => Err(ReviewError::BodyTimeout(BODY_TIMEOUT.as_secs())),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ReviewError::TooLarge),
        Ok(Err(e)) => Err(ReviewError::Body(e.to_string())),
    }
}

async fn review(app: Arc<App>, endpoint: Endpoint, req: Request) -> Response {
    let start = Instant::now();
    let (parts, body) = req.into_parts();
    let decoded = if parts.extensions.get::<ClientCert>() == Some(&ClientCert::Absent) {
        Err(ReviewError::Unauthenticated)
    } else {
        match read_body(&parts.headers, body).await {
            Ok(bytes) => admission::decode(&bytes),
            Err(e) => Err(e),
        }
    };
    let review = match decoded {
        Ok(r) => r,
        Err(e) => {
            app.metrics
                .bad_requests
                .with_label_values(&[endpoint.name(), e.label()])
                .inc();
            tracing::warn!(endpoint = endpoint.name(), error = %e, "bad request");
            return e.into_response();
        }
    };
    let (response, outcome) = match endpoint {
        Endpoint::Mutate => app.admitter.mutate(&review),
        Endpoint::Validate => app.admitter.validate(&review, Instant::now()),
    };
    let body = admission::encode(response);
    app.metrics.observe(
        endpoint.name(),
        outcome.verdict,
        outcome.reason,
        start.elapsed(),
    );
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Binds both listeners and serves until [`Running::shutdown`].
pub async fn start(app: Arc<App>, opts: ServeOptions) -> Result<Running, ServerError> {
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })
    };
    let listener = bind(opts.listen).await?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: opts.listen,
        source,
    })?;
    let acceptor = TlsAcceptor::from(opts.certs.server_config(opts.client_ca.as_ref())?);
    let mtls = opts.client_ca.is_some();
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    let mut metrics_addr = None;
    if let Some(m) = opts.metrics_listen {
        let ml = bind(m).await?;
        metrics_addr = ml
            .local_addr()
            .map_err(|source| ServerError::Bind { addr: m, source })
            .map(Some)?;
        let mut rx = stop_rx.clone();
        let router = metrics_router(app.clone());
        tasks.push(tokio::spawn(async move {
            let serve = axum::serve(ml, router)
                .with_graceful_shutdown(async move { stopped(&mut rx).await });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "metrics server");
            }
        }));
    }

    let reload = tokio::spawn(
        opts.certs
            .clone()
            .watch(opts.reload_interval, app.metrics.clone()),
    );
    let router = router(app.clone());
    let drain_timeout = opts.drain_timeout;
    tasks.push(tokio::spawn(async move {
        serve_tls(listener, acceptor, router, mtls, stop_rx, drain_timeout).await;
        reload.abort();
    }));
    tracing::info!(%addr, ?metrics_addr, "webhook listening");
    Ok(Running {
        addr,
        metrics_addr,
        app,
        stop,
        tasks,
    })
}

/// Resolves once shutdown is requested (or the sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    // Map the guard away inside: holding it across an await would make the task !Send.
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}

/// Whether the connection a request came on presented a verified client certificate, when
/// client certificates are required for reviews.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientCert {
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

async fn serve_tls(
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
