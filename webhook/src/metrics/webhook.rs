//! The webhook's metrics, in groups handed to the parts that set them.

use std::time::Duration;

use prometheus::{
    Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use super::{Scrape, conn::ConnMetrics, counter, encode, register, registry};

/// Everything `bulwark webhook` exports.
pub struct WebhookMetrics {
    registry: Registry,
    pub admission: AdmissionMetrics,
    pub policy: PolicyMetrics,
    pub tls: TlsMetrics,
    pub cache: CacheGauges,
    pub connections: ConnMetrics,
    pub release: ReleaseMetrics,
    pub peers: PeerMetrics,
    /// 1 when reviews need a client certificate with a checked name (set by the server).
    pub reviews_authenticated: IntGauge,
}

/// How reviews were answered (set by the server and the answers).
#[derive(Clone)]
pub struct AdmissionMetrics {
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub refusals: IntCounterVec,
    pub bad_requests: IntCounterVec,
    refusal_forms: IntCounterVec,
    retry_after: prometheus::Histogram,
}

/// Hold mode's releaser (set by the releaser).
#[derive(Clone)]
pub struct ReleaseMetrics {
    releases: IntCounterVec,
    held_seconds: prometheus::Histogram,
    pub leader: IntGauge,
}

/// The exchange of consumption between replicas (set by the exchange and the peer listener).
#[derive(Clone)]
pub struct PeerMetrics {
    peers: IntGaugeVec,
    share: Gauge,
    pub sync: prometheus::Histogram,
    pub bytes_sent: prometheus::IntCounter,
    pub sends: IntCounterVec,
    pub received: IntCounterVec,
    pub fallbacks: prometheus::IntCounter,
}

/// Invalid namespace annotations (set by the namespace watch).
#[derive(Clone)]
pub struct PolicyMetrics {
    problems: IntCounterVec,
}

/// The serving certificate (set by the reloader and the self-managed certificate sync).
#[derive(Clone)]
pub struct TlsMetrics {
    pub reloads: IntCounterVec,
    pub cert_writes: IntCounterVec,
    pub cert_not_after: Gauge,
}

/// The state of the caches and the ledger, set at scrape time by whoever wires them.
#[derive(Clone)]
pub struct CacheGauges {
    pods: IntGaugeVec,
    reservations: IntGauge,
    replicas: IntGauge,
    schedulable_nodes: IntGauge,
    age: GaugeVec,
    failing: GaugeVec,
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    register(
        r,
        GaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn int_gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    register(r, IntGauge::new(name, help).expect("valid metric"))
}

impl WebhookMetrics {
    pub fn new() -> Self {
        let registry = registry();
        let r = &registry;
        let admission = AdmissionMetrics {
            requests: counter(
                r,
                "admission_requests_total",
                "Admission reviews answered",
                &["endpoint", "verdict", "reason"],
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
            refusals: counter(
                r,
                "refusals_total",
                "Pod creations refused (mode=enforce), warned (mode=warn) or refused in dry-run",
                &["reason", "mode"],
            ),
            bad_requests: counter(
                r,
                "bad_requests_total",
                "Requests answered with HTTP 400",
                &["endpoint", "error"],
            ),
            refusal_forms: counter(
                r,
                "refusal_forms_total",
                "Enforced refusals by form: retry_after (retryAfterSeconds, the client waits \
                 inside its call) or immediate (none: the client's own queue retries)",
                &["form"],
            ),
            retry_after: register(
                r,
                prometheus::Histogram::with_opts(
                    HistogramOpts::new(
                        "retry_after_seconds",
                        "The wait each enforced refusal named (sent as retryAfterSeconds in the \
                         retry_after form, in the message only in the immediate form)",
                    )
                    .buckets(vec![1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 45.0]),
                )
                .expect("valid metric"),
            ),
        };
        let policy = PolicyMetrics {
            problems: counter(
                r,
                "policy_problems_total",
                "Invalid namespace annotations seen (namespace keeps the default)",
                &["annotation"],
            ),
        };
        let tls = TlsMetrics {
            reloads: counter(
                r,
                "tls_reloads_total",
                "Serving certificate reloads",
                &["result"],
            ),
            cert_writes: counter(
                r,
                "certificate_secret_writes_total",
                "Writes of the self-managed certificate Secret, by why",
                &["why"],
            ),
            cert_not_after: register(
                r,
                Gauge::new(
                    "serving_certificate_expiry_timestamp_seconds",
                    "When the self-managed serving certificate expires (Unix seconds)",
                )
                .expect("valid metric"),
            ),
        };
        let cache = CacheGauges {
            pods: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "pods",
                        "Pods in the watch cache, cluster-wide: live, pending (past any gate \
                         of bulwark's, not yet running), held (behind bulwark's gate)",
                    ),
                    &["state"],
                )
                .expect("valid metric"),
            ),
            reservations: int_gauge(
                r,
                "reservations",
                "Admitted pods not yet seen by the watch (counted against quotas)",
            ),
            replicas: int_gauge(
                r,
                "rate_share_replicas",
                "Ready webhook replicas each namespace's rate is shared among",
            ),
            schedulable_nodes: int_gauge(
                r,
                "schedulable_nodes",
                "Ready, untainted, schedulable nodes",
            ),
            age: gauge_vec(
                r,
                "cache_age_seconds",
                "Seconds since the watch of a resource last delivered anything",
                &["resource"],
            ),
            failing: gauge_vec(
                r,
                "cache_watch_failing_seconds",
                "Seconds the watch of a resource has been failing (0 while it works); \
                 past cacheStaleLimitSeconds pod-count quotas fail open",
                &["resource"],
            ),
        };
        let connections = ConnMetrics::new(r);
        let release = ReleaseMetrics {
            releases: counter(
                r,
                "pod_releases_total",
                "Pods let past bulwark's scheduling gate (hold mode), by why (room: the caps \
                 have room; not_enforced: the namespace no longer enforces) and result",
                &["why", "result"],
            ),
            held_seconds: register(
                r,
                prometheus::Histogram::with_opts(
                    HistogramOpts::new(
                        "pod_held_seconds",
                        "How long each released pod waited behind the gate, creation to release",
                    )
                    .buckets(vec![
                        0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
                    ]),
                )
                .expect("valid metric"),
            ),
            leader: int_gauge(
                r,
                "releaser_leader",
                "1 while this replica holds the releaser's Lease and releases held pods",
            ),
        };
        let peers = PeerMetrics {
            peers: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "peers",
                        "Other webhook replicas: seen (ready endpoints of the Service) and \
                         reachable (sharing consumption with this one both ways)",
                    ),
                    &["state"],
                )
                .expect("valid metric"),
            ),
            share: register(
                r,
                Gauge::new(
                    "rate_share",
                    "The part of each namespace's rate this replica may use: 1 when it shares \
                     consumption with every ready replica, 1/N when it reaches none",
                )
                .expect("valid metric"),
            ),
            sync: register(
                r,
                prometheus::Histogram::with_opts(
                    HistogramOpts::new(
                        "peer_sync_seconds",
                        "Round trip of one report to one peer: how late a peer learns of this \
                         replica's consumption, past the batching",
                    )
                    .buckets(vec![
                        0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0,
                    ]),
                )
                .expect("valid metric"),
            ),
            bytes_sent: register(
                r,
                prometheus::IntCounter::new(
                    "peer_report_bytes_sent_total",
                    "Bytes of reports sent to peers",
                )
                .expect("valid metric"),
            ),
            sends: counter(
                r,
                "peer_reports_sent_total",
                "Reports sent to peers, by result (ok, error)",
                &["result"],
            ),
            received: counter(
                r,
                "peer_reports_received_total",
                "Reports received from peers, by result (accepted; own: this replica's own, reached \
                 through its Service; or why refused: malformed, bounds, replay, too_many_peers)",
                &["result"],
            ),
            fallbacks: register(
                r,
                prometheus::IntCounter::new(
                    "peer_fallbacks_total",
                    "Times this replica stopped sharing with some ready replica and fell back \
                     to its own part of each rate",
                )
                .expect("valid metric"),
            ),
        };
        let reviews_authenticated = int_gauge(
            r,
            "reviews_authenticated",
            "1 when reviews need a client certificate of --client-ca (and a --client-name), \
             0 when anyone who reaches the port may send them",
        );
        let up_since = register(
            r,
            Gauge::new(
                "start_time_seconds",
                "Process start, seconds since the epoch",
            )
            .expect("valid metric"),
        );
        if let Ok(since) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            up_since.set(since.as_secs_f64());
        }
        WebhookMetrics {
            registry,
            admission,
            policy,
            tls,
            cache,
            connections,
            release,
            peers,
            reviews_authenticated,
        }
    }
}

impl Default for WebhookMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Scrape for WebhookMetrics {
    fn scrape(&self) -> String {
        encode(&self.registry)
    }
}

impl AdmissionMetrics {
    /// An enforced refusal in `form`, naming a wait of `retry_after` seconds.
    pub fn refused(&self, form: &str, retry_after: u32) {
        self.refusal_forms.with_label_values(&[form]).inc();
        self.retry_after.observe(f64::from(retry_after));
    }

    pub fn observe(&self, endpoint: &str, verdict: &str, reason: &str, took: Duration) {
        self.requests
            .with_label_values(&[endpoint, verdict, reason])
            .inc();
        self.duration
            .with_label_values(&[endpoint])
            .observe(took.as_secs_f64());
    }
}

impl ReleaseMetrics {
    /// One release attempt; `held` is the pod's time behind the gate when it succeeded.
    pub fn released(&self, why: &str, result: &str, held: Option<Duration>) {
        self.releases.with_label_values(&[why, result]).inc();
        if let Some(held) = held {
            self.held_seconds.observe(held.as_secs_f64());
        }
    }
}

impl PeerMetrics {
    /// The other replicas seen and reachable, and so this replica's part of each rate.
    pub fn set_group(&self, seen: u32, reachable: u32) {
        self.peers.with_label_values(&["seen"]).set(i64::from(seen));
        self.peers
            .with_label_values(&["reachable"])
            .set(i64::from(reachable));
        self.share
            .set(f64::from(reachable + 1) / f64::from(seen + 1).max(1.0));
    }
}

impl PolicyMetrics {
    pub fn problem(&self, annotation: &str) {
        self.problems.with_label_values(&[annotation]).inc();
    }
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl CacheGauges {
    pub fn set_pods(&self, live: u64, pending: u64, held: u64) {
        self.pods.with_label_values(&["live"]).set(clamp(live));
        self.pods
            .with_label_values(&["pending"])
            .set(clamp(pending));
        self.pods.with_label_values(&["held"]).set(clamp(held));
    }

    pub fn set_reservations(&self, n: u64) {
        self.reservations.set(clamp(n));
    }

    pub fn set_replicas(&self, n: u32) {
        self.replicas.set(i64::from(n));
    }

    pub fn set_schedulable_nodes(&self, n: u32) {
        self.schedulable_nodes.set(i64::from(n));
    }

    /// The watch of `resource`: time since it last delivered (if ever), and how long it has
    /// been failing (`None` while it works).
    pub fn set_watch(&self, resource: &str, age: Option<Duration>, failing: Option<Duration>) {
        if let Some(age) = age {
            self.age
                .with_label_values(&[resource])
                .set(age.as_secs_f64());
        }
        self.failing
            .with_label_values(&[resource])
            .set(failing.map_or(0.0, |d| d.as_secs_f64()));
    }
}
