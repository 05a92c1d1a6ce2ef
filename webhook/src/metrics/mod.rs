//! Prometheus metrics, a leaf: each subsystem gets a group of handles ([`webhook`],
//! [`nodes`]) and sets them itself; gauges that describe another part's state are set by
//! whoever wires the parts together, at scrape time. Every label takes values from a fixed set
//! (endpoints, verdicts, refusal reasons, annotation names), never namespaces or pod names, so
//! cardinality is bounded. Both programs serve their registry with [`router`], through the webhook's bounded
//! connection path (`serve::serve_metrics`).

pub mod conn;
pub mod nodes;
pub mod webhook;

use std::sync::Arc;

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus::{Encoder, IntCounterVec, Opts, Registry, TextEncoder};

/// What a metrics endpoint answers, rendered at scrape time.
pub trait Scrape: Send + Sync + 'static {
    fn scrape(&self) -> String;
}

/// A registry whose metrics are all named `bulwark_*`.
fn registry() -> Registry {
    Registry::new_custom(Some("bulwark".into()), None).expect("a valid prefix")
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: T) -> T {
    // Names are fixed and unique in this module, so registration only fails on a programming
    // error that every test run would show.
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

/// A counter vector, registered.
fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        r,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

/// The Prometheus text of everything in `registry`.
fn encode(registry: &Registry) -> String {
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut buf) {
        tracing::warn!(error = %e, "encoding metrics");
    }
    String::from_utf8(buf).unwrap_or_default()
}

/// `GET /metrics` (Prometheus text) and `GET /healthz`, over plain HTTP.
pub fn router(scrape: Arc<dyn Scrape>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(scrape)
}

async fn metrics(State(scrape): State<Arc<dyn Scrape>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        scrape.scrape(),
    )
}
