//! Prometheus metrics. Every label takes values from a fixed set (endpoints, verdicts,
//! refusal reasons, annotation names), never namespaces or pod names, so cardinality is bounded.

use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::{
    cache::{Cache, ClusterView, Resource},
    ledger::Ledger,
};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub refusals: IntCounterVec,
    pub bad_requests: IntCounterVec,
    pub policy_problems: IntCounterVec,
    pub tls_reloads: IntCounterVec,
    pub cert_writes: IntCounterVec,
    pub cert_not_after: Gauge,
    pods: IntGaugeVec,
    reservations: IntGauge,
    replicas: IntGauge,
    schedulable_nodes: IntGauge,
    cache_age: prometheus::GaugeVec,
    cache_broken: prometheus::GaugeVec,
    up_since: Gauge,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: T) -> T {
    // Names are fixed and unique in this file, so registration only fails on a programming
    // error that every test run would show.
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("bulwark".into()), None).expect("valid prefix");
        let r = &registry;
        Metrics {
            requests: register(
                r,
                IntCounterVec::new(
                    Opts::new("admission_requests_total", "Admission reviews answered"),
                    &["endpoint", "verdict", "reason"],
                )
                .expect("valid metric"),
            ),
            duration: register(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "admission_duration_seconds",
                        "Time to decide one review, body read to response encoded",
                    )
                    .buckets(vec![
                        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
                        0.1, 0.5,
                    ]),
                    &["endpoint"],
                )
                .expect("valid metric"),
            ),
            refusals: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "refusals_total",
                        "Pod creations refused (mode=enforce), warned (mode=warn) or refused in dry-run",
                    ),
                    &["reason", "mode"],
                )
                .expect("valid metric"),
            ),
            bad_requests: register(
                r,
                IntCounterVec::new(
                    Opts::new("bad_requests_total", "Requests answered with HTTP 400"),
                    &["endpoint", "error"],
                )
                .expect("valid metric"),
            ),
            policy_problems: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "policy_problems_total",
                        "Invalid namespace annotations seen (namespace keeps the default)",
                    ),
                    &["annotation"],
                )
                .expect("valid metric"),
            ),
            tls_reloads: register(
                r,
                IntCounterVec::new(
                    Opts::new("tls_reloads_total", "Serving certificate reloads"),
                    &["result"],
                )
                .expect("valid metric"),
            ),
            cert_writes: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "certificate_secret_writes_total",
                        "Writes of the self-managed certificate Secret, by why",
                    ),
                    &["why"],
                )
                .expect("valid metric"),
            ),
            cert_not_after: register(
                r,
                Gauge::new(
                    "serving_certificate_expiry_timestamp_seconds",
                    "When the self-managed serving certificate expires (Unix seconds)",
                )
                .expect("valid metric"),
            ),
            pods: register(
                r,
                IntGaugeVec::new(
                    Opts::new("pods", "Pods in the watch cache, cluster-wide"),
                    &["state"],
                )
                .expect("valid metric"),
            ),
            reservations: register(
                r,
                IntGauge::new(
                    "reservations",
                    "Admitted pods not yet seen by the watch (counted against quotas)",
                )
                .expect("valid metric"),
            ),
            replicas: register(
                r,
                IntGauge::new(
                    "rate_share_replicas",
                    "Ready webhook replicas each namespace's rate is shared among",
                )
                .expect("valid metric"),
            ),
            schedulable_nodes: register(
                r,
                IntGauge::new("schedulable_nodes", "Ready, untainted, schedulable nodes")
                    .expect("valid metric"),
            ),
            cache_age: register(
                r,
                prometheus::GaugeVec::new(
                    Opts::new(
                        "cache_age_seconds",
                        "Seconds since the watch of a resource last delivered anything",
                    ),
                    &["resource"],
                )
                .expect("valid metric"),
            ),
            cache_broken: register(
                r,
                prometheus::GaugeVec::new(
                    Opts::new(
                        "cache_watch_failing_seconds",
                        "Seconds the watch of a resource has been failing (0 while it works); \
                         past cacheStaleLimitSeconds pod-count quotas fail open",
                    ),
                    &["resource"],
                )
                .expect("valid metric"),
            ),
            up_since: register(
                r,
                Gauge::new("start_time_seconds", "Process start, seconds since the epoch")
                    .expect("valid metric"),
            ),
            registry,
        }
    }

    pub fn observe(&self, endpoint: &str, verdict: &str, reason: &str, took: Duration) {
        self.requests
            .with_label_values(&[endpoint, verdict, reason])
            .inc();
        self.duration
            .with_label_values(&[endpoint])
            .observe(took.as_secs_f64());
    }

    pub fn set_start_time(&self, seconds_since_epoch: f64) {
        self.up_since.set(seconds_since_epoch);
    }

    /// Prometheus text, with the gauges read from the cache at scrape time.
    pub fn render(&self, cache: &Cache, ledger: &Ledger, now: Instant) -> String {
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.pods
            .with_label_values(&["live"])
            .set(clamp(cache.live_pods()));
        self.pods
            .with_label_values(&["pending"])
            .set(clamp(cache.cluster_pending()));
        self.reservations.set(clamp(ledger.reserved()));
        self.replicas.set(i64::from(ledger.replicas()));
        if let Some(n) = cache.schedulable_nodes() {
            self.schedulable_nodes.set(i64::from(n));
        }
        for resource in Resource::ALL {
            if let Some(age) = cache.age(resource, now) {
                self.cache_age
                    .with_label_values(&[resource.name()])
                    .set(age.as_secs_f64());
            }
            self.cache_broken.with_label_values(&[resource.name()]).set(
                cache
                    .broken_for(resource, now)
                    .map_or(0.0, |d| d.as_secs_f64()),
            );
        }
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
