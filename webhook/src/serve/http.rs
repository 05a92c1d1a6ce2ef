//! The HTTPS routes: `/mutate`, `/validate` and `/hold` read a bounded body, answer it and
//! count it; `/healthz` and `/readyz` are the probes. Everything wrong with a request becomes one
//! [`RequestError`], turned into an HTTP status in one place.

use std::{
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
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::tls::ClientCert;
use crate::{
    metrics::webhook::AdmissionMetrics,
    review::{
        answer::{Admitter, Answered},
        wire::{self, ReviewError},
    },
};

/// kube-apiserver's own request size limit; an AdmissionReview carries one object.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// Time allowed for a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request got no review answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{0}")]
    Review(#[from] ReviewError),
    #[error("request body is larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("request body was not received within {0} seconds")]
    BodyTimeout(u64),
    #[error("reading request body: {0}")]
    Body(String),
    #[error("a client certificate signed by the --client-ca is required for reviews")]
    Unauthenticated,
    #[error("the client certificate names {0}, none of the --client-name reviews may come from")]
    WrongClient(String),
    #[error("too many request bodies being read; retry")]
    Busy,
}

impl RequestError {
    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            RequestError::Review(e) => e.label(),
            RequestError::TooLarge => "too_large",
            RequestError::BodyTimeout(_) => "body_timeout",
            RequestError::Body(_) => "body",
            RequestError::Unauthenticated => "unauthenticated",
            RequestError::WrongClient(_) => "wrong_client",
            RequestError::Busy => "busy",
        }
    }
}

impl IntoResponse for RequestError {
    fn into_response(self) -> Response {
        let (status, text) = match self {
            RequestError::Unauthenticated => (StatusCode::UNAUTHORIZED, format!("{self}\n")),
            RequestError::WrongClient(_) => (StatusCode::FORBIDDEN, format!("{self}\n")),
            RequestError::Busy => (StatusCode::SERVICE_UNAVAILABLE, format!("{self}\n")),
            _ => (
                StatusCode::BAD_REQUEST,
                format!("bad AdmissionReview: {self}\n"),
            ),
        };
        (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            text,
        )
            .into_response()
    }
}

/// The review endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Mutate,
    Validate,
    /// Hold mode's gate (a second mutating webhook, registered where hold is enabled).
    Hold,
}

impl Endpoint {
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Mutate => "mutate",
            Endpoint::Validate => "validate",
            Endpoint::Hold => "hold",
        }
    }
}

/// Whether the webhook may take reviews yet, and if not why.
pub type Readiness = Box<dyn Fn() -> Result<(), &'static str> + Send + Sync>;

/// What the HTTPS routes serve.
pub struct Service {
    admitter: Admitter,
    metrics: AdmissionMetrics,
    ready: Readiness,
    draining: AtomicBool,
}

impl Service {
    pub fn new(admitter: Admitter, metrics: AdmissionMetrics, ready: Readiness) -> Self {
        Service {
            admitter,
            metrics,
            ready,
            draining: AtomicBool::new(false),
        }
    }

    /// From now on `/readyz` fails, so endpoints stop sending reviews here.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    fn ready(&self) -> Result<(), &'static str> {
        if self.draining.load(Ordering::Acquire) {
            Err("shutting down")
        } else {
            (self.ready)()
        }
    }

    /// Decodes a review body, answers it and encodes the answer: what a review request
    /// gets, without the HTTP around it.
    pub fn answer(
        &self,
        endpoint: Endpoint,
        body: &[u8],
        now: Instant,
    ) -> Result<(Vec<u8>, Answered), ReviewError> {
        let review = wire::decode(body)?;
        let (response, answered) = match endpoint {
            Endpoint::Mutate => self.admitter.mutate(&review),
            Endpoint::Validate => self.admitter.validate(&review, now),
            Endpoint::Hold => self.admitter.hold(&review, now),
        };
        Ok((wire::encode(response), answered))
    }

    fn refused(&self, endpoint: Endpoint, e: RequestError) -> Response {
        self.metrics
            .bad_requests
            .with_label_values(&[endpoint.name(), e.label()])
            .inc();
        tracing::warn!(endpoint = endpoint.name(), error = %e, "bad request");
        e.into_response()
    }
}

pub fn router(service: Arc<Service>) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/validate", post(validate))
        .route("/hold", post(hold))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(service)
}

async fn readyz(State(service): State<Arc<Service>>) -> Response {
    match service.ready() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

async fn mutate(State(service): State<Arc<Service>>, req: Request) -> Response {
    review(&service, Endpoint::Mutate, req).await
}

async fn validate(State(service): State<Arc<Service>>, req: Request) -> Response {
    review(&service, Endpoint::Validate, req).await
}

async fn hold(State(service): State<Arc<Service>>, req: Request) -> Response {
    review(&service, Endpoint::Hold, req).await
}

fn declared_too_large(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_BODY_BYTES as u64)
}

/// The bytes of request bodies being read at once: over all connections, so bodies arriving
/// together (up to 3 MiB each, at most as many as there are streams) cannot take more memory
/// than the process has, and from one client address, so one caller that sends bodies and
/// stalls cannot hold all of it. A body holds its share until its review is answered.
#[derive(Clone)]
pub struct BodyBudget {
    shared: Arc<Semaphore>,
    client: Option<Arc<Semaphore>>,
}

impl BodyBudget {
    pub fn new(bytes: usize) -> Self {
        BodyBudget {
            shared: semaphore(bytes),
            client: None,
        }
    }

    /// The same budget, with `client`'s share (see [`client_share`]) taken first.
    pub fn for_client(&self, client: Arc<Semaphore>) -> Self {
        BodyBudget {
            shared: self.shared.clone(),
            client: Some(client),
        }
    }

    /// Whether a body would have to wait for its share now.
    fn exhausted(&self) -> bool {
        self.shared.available_permits() == 0
            || self
                .client
                .as_ref()
                .is_some_and(|c| c.available_permits() == 0)
    }
}

fn semaphore(bytes: usize) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS)))
}

/// One client address's share of the budget.
pub fn client_share(bytes: usize) -> Arc<Semaphore> {
    semaphore(bytes)
}

/// A body read whole, and its share of the budget.
struct Read {
    bytes: bytes::Bytes,
    _held: Vec<OwnedSemaphorePermit>,
}

/// Takes `n` bytes from `from`, adding them to what `held` already has from it.
async fn take(
    from: &Arc<Semaphore>,
    n: u32,
    held: &mut Option<OwnedSemaphorePermit>,
) -> Result<(), RequestError> {
    let permit = from
        .clone()
        .acquire_many_owned(n)
        .await
        .map_err(|_| RequestError::Busy)?;
    match held {
        Some(h) => h.merge(permit),
        None => *held = Some(permit),
    }
    Ok(())
}

/// Reads a body of at most [`MAX_BODY_BYTES`], frame by frame, taking each frame's size from
/// the budget before keeping it: a chunked body is cut off where it passes the limit, however
/// it was declared.
async fn collect(body: Body, budget: Option<BodyBudget>) -> Result<Read, RequestError> {
    let mut body = body;
    let mut bytes = bytes::BytesMut::new();
    let (mut client, mut shared) = (None, None);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| RequestError::Body(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if bytes.len() + data.len() > MAX_BODY_BYTES {
            return Err(RequestError::TooLarge);
        }
        if let Some(budget) = &budget {
            let n = u32::try_from(data.len()).map_err(|_| RequestError::TooLarge)?;
            // The client's own share first: a caller at its share waits on itself only.
            if let Some(own) = &budget.client {
                take(own, n, &mut client).await?;
            }
            take(&budget.shared, n, &mut shared).await?;
        }
        bytes.extend_from_slice(&data);
    }
    Ok(Read {
        bytes: bytes.freeze(),
        _held: client.into_iter().chain(shared).collect(),
    })
}

async fn read_body(
    headers: &HeaderMap,
    body: Body,
    budget: Option<BodyBudget>,
) -> Result<Read, RequestError> {
    if declared_too_large(headers) {
        return Err(RequestError::TooLarge);
    }
    let watched = budget.clone();
    match tokio::time::timeout(BODY_TIMEOUT, collect(body, budget)).await {
        Err(_) if watched.is_some_and(|b| b.exhausted()) => Err(RequestError::Busy),
        Err(_) => Err(RequestError::BodyTimeout(BODY_TIMEOUT.as_secs())),
        Ok(read) => read,
    }
}

async fn review(service: &Service, endpoint: Endpoint, req: Request) -> Response {
    let start = Instant::now();
    let (parts, body) = req.into_parts();
    // Refused before the body is read: a caller that is not the API server consumes nothing.
    match parts.extensions.get::<ClientCert>() {
        None | Some(ClientCert::Verified) => {}
        Some(ClientCert::Absent) => {
            return service.refused(endpoint, RequestError::Unauthenticated);
        }
        Some(ClientCert::WrongName(names)) => {
            return service.refused(endpoint, RequestError::WrongClient(names.clone()));
        }
    }
    let budget = parts.extensions.get::<BodyBudget>().cloned();
    let body = match read_body(&parts.headers, body, budget).await {
        Ok(read) => read,
        Err(e) => return service.refused(endpoint, e),
    };
    let (answer, answered) = match service.answer(endpoint, &body.bytes, Instant::now()) {
        Ok(done) => done,
        Err(e) => return service.refused(endpoint, e.into()),
    };
    service.metrics.observe(
        endpoint.name(),
        answered.verdict,
        answered.reason,
        start.elapsed(),
    );
    ([(header::CONTENT_TYPE, "application/json")], answer).into_response()
}
