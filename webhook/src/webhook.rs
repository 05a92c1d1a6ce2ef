//! `bulwark webhook` as a library: [`Webhook::new`] wires the decision parts around an empty
//! cache, and [`Webhook::start`] runs exactly what the command runs (the watch feeds, the
//! peers and the exchange of reports with them, the ledger sweeper, the served certificate,
//! the HTTPS, metrics and peer listeners). `main`, the integration tests, the fuzz target and
//! the benches all start the webhook through here.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    cluster::{self, cache::Cache, cache::Watched, peers::exchange::Exchange},
    metrics::{Scrape, webhook::WebhookMetrics},
    quota::{ledger::Ledger, throttled::Throttled, view::ClusterView},
    release::{self, Budget, ReleaserOptions},
    review::{self, answer::Admitter, answer::Answered, wire::ReviewError},
    serve::{
        self, Running, ServeOptions, ServerError,
        conn::Limits,
        http::{Endpoint, Service},
        managed::sync::{ManagedOptions, SyncError},
        tls::{CertStore, ClientCa, TlsError},
    },
};

/// How often expired reservations and idle namespaces are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("self-managed certificate: {0}")]
    Certificates(#[from] SyncError),
    #[error("{0}")]
    Serve(#[from] ServerError),
    #[error("peer TLS: {0}")]
    PeerTls(#[from] rustls::Error),
    #[error("--cert-secret needs the API server; use --tls-cert and --tls-key with --offline")]
    ManagedNeedsApiServer,
}

/// Where the serving certificate comes from.
pub enum Certificates {
    /// PEM files, reloaded when they change on disk.
    Files { cert: PathBuf, key: PathBuf },
    /// A Secret bulwark keeps current, with the webhook configurations' caBundle.
    Managed(ManagedOptions),
}

/// Everything `bulwark webhook` is started with.
pub struct WebhookOptions {
    pub settings: review::Settings,
    /// The API server; `None` runs offline (policy from the settings, counts from this
    /// process's own admissions).
    pub client: Option<kube::Client>,
    /// The webhook's own namespace: always exempt and a system namespace, and where its
    /// peers' Service is.
    pub own_namespace: Option<String>,
    /// This replica's name in Events (its pod's).
    pub identity: Option<String>,
    /// The ready endpoints of this Service are the replicas that share each namespace's
    /// limits.
    pub peers_service: Option<String>,
    /// Where to take the other replicas' reports (with `peers_service`); without it this
    /// replica takes its 1/N part of each rate.
    pub peer_listen: Option<SocketAddr>,
    pub certificates: Certificates,
    pub client_ca: Option<ClientCa>,
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub reload_interval: Duration,
    pub drain_timeout: Duration,
    /// Connection limits of the HTTPS listener; the default in production.
    pub limits: Limits,
    /// Run hold mode's releaser (with the API server only): on one replica at a time, it lets
    /// pods past bulwark's scheduling gate while the caps have room, spending at most this.
    pub releaser: Option<Budget>,
}

/// The webhook's decision parts, wired together.
#[derive(Clone)]
pub struct Webhook {
    cache: Arc<Cache>,
    ledger: Arc<Ledger>,
    metrics: Arc<WebhookMetrics>,
    service: Arc<Service>,
    /// The admitter's refusals per namespace, drained into Throttled Events.
    throttled: Arc<Throttled>,
}

impl Webhook {
    /// The parts around an empty cache. `offline`: nothing will feed the cache, so the
    /// webhook is ready at once.
    pub fn new(settings: review::Settings, offline: bool) -> Webhook {
        let settings = Arc::new(settings);
        let cache = Arc::new(Cache::new(settings.defaults.clone(), settings.pods.clone()));
        let ledger = Arc::new(Ledger::new(settings.quota.reservation_ttl, Instant::now()));
        let metrics = Arc::new(WebhookMetrics::new());
        let admitter = Admitter::new(
            settings,
            cache.clone(),
            ledger.clone(),
            metrics.admission.clone(),
        );
        let throttled = admitter.throttled().clone();
        let synced = cache.clone();
        let ready = Box::new(move || {
            if offline || synced.is_synced() {
                Ok(())
            } else {
                Err("watch caches not synced yet")
            }
        });
        let service = Arc::new(Service::new(admitter, metrics.admission.clone(), ready));
        Webhook {
            cache,
            ledger,
            metrics,
            service,
            throttled,
        }
    }

    /// What a review request to `endpoint` is answered: the handler's work without HTTP.
    pub fn answer(
        &self,
        endpoint: Endpoint,
        body: &[u8],
        now: Instant,
    ) -> Result<(Vec<u8>, Answered), ReviewError> {
        self.service.answer(endpoint, body, now)
    }

    /// Drops expired reservations and idle namespaces (the sweeper does this every second).
    pub fn sweep(&self, now: Instant) {
        self.ledger.sweep(now);
    }

    pub fn metrics(&self) -> &WebhookMetrics {
        &self.metrics
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Starts everything `bulwark webhook` runs; it serves until [`Started::shutdown`].
    pub async fn start(opts: WebhookOptions) -> Result<Started, StartError> {
        let mut settings = opts.settings;
        if let Some(ns) = &opts.own_namespace {
            settings.pods.own_namespace(ns);
        }
        // The releaser runs as the webhook's ServiceAccount (deploy/base).
        settings.releaser = Some(format!(
            "system:serviceaccount:{}:bulwark-webhook",
            opts.own_namespace.as_deref().unwrap_or("bulwark-system")
        ));
        let quota = settings.quota.clone();
        let webhook = Webhook::new(settings, opts.client.is_none());
        let certs = match (opts.certificates, &opts.client) {
            (Certificates::Files { cert, key }, _) => CertStore::load(cert, key)?,
            (Certificates::Managed(managed), Some(client)) => {
                tracing::info!(secret = %format!("{}/{}", managed.namespace, managed.secret), names = ?managed.wanted.dns_names, "self-managed serving certificate");
                serve::managed::sync::start(client.clone(), managed, webhook.metrics.tls.clone())
                    .await?
            }
            (Certificates::Managed(_), None) => return Err(StartError::ManagedNeedsApiServer),
        };
        // Offline, the reports are only logged.
        let throttled = cluster::throttled::spawn(
            opts.client.clone(),
            opts.identity.clone(),
            webhook.throttled.clone(),
        );
        let mut releaser = None;
        let mut peers = None;
        match &opts.client {
            None => tracing::info!(
                "offline: no API server; policy from config, counts from own admissions"
            ),
            Some(client) => {
                if let Some(service) = &opts.peers_service {
                    let namespace = opts.own_namespace.as_deref().unwrap_or("bulwark-system");
                    let (targets, listed) = tokio::sync::watch::channel(Vec::new());
                    let exchange = opts.peer_listen.map(|addr| {
                        let exchange = Exchange::new(
                            webhook.ledger.clone(),
                            webhook.cache.clone(),
                            webhook.metrics.peers.clone(),
                        );
                        (addr, exchange)
                    });
                    cluster::peers::spawn(
                        client.clone(),
                        namespace,
                        service,
                        webhook.ledger.clone(),
                        exchange.as_ref().map(|(addr, _)| (targets, addr.port())),
                    );
                    if let Some((addr, exchange)) = exchange {
                        let sender =
                            exchange.spawn(listed, serve::peer_tls::client_config(&certs)?);
                        peers = Some((addr, exchange.router(), sender));
                    }
                }
                if let Some(budget) = opts.releaser {
                    let identity = opts
                        .identity
                        .clone()
                        .unwrap_or_else(|| format!("bulwark-webhook-{}", std::process::id()));
                    releaser = Some(release::spawn(
                        client.clone(),
                        webhook.cache.clone(),
                        quota,
                        ReleaserOptions {
                            namespace: opts
                                .own_namespace
                                .clone()
                                .unwrap_or_else(|| "bulwark-system".to_owned()),
                            identity,
                            budget,
                        },
                        webhook.metrics.release.clone(),
                    ));
                }
                cluster::feeds::spawn(
                    client.clone(),
                    opts.identity,
                    webhook.cache.clone(),
                    webhook.ledger.clone(),
                    webhook.metrics.policy.clone(),
                );
            }
        }
        let sweeper = {
            let webhook = webhook.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(SWEEP_EVERY);
                loop {
                    tick.tick().await;
                    webhook.sweep(Instant::now());
                }
            })
        };
        let (peers, exchange) = match peers {
            Some((addr, router, sender)) => (Some((addr, router)), Some(sender)),
            None => (None, None),
        };
        let running = serve::start(
            webhook.service.clone(),
            Arc::new(webhook.clone()),
            (
                webhook.metrics.tls.clone(),
                webhook.metrics.connections.clone(),
                webhook.metrics.reviews_authenticated.clone(),
            ),
            ServeOptions {
                listen: opts.listen,
                metrics_listen: opts.metrics_listen,
                certs,
                client_ca: opts.client_ca,
                reload_interval: opts.reload_interval,
                drain_timeout: opts.drain_timeout,
                limits: opts.limits,
                peers,
            },
        )
        .await?;
        Ok(Started {
            webhook,
            running,
            sweeper,
            throttled,
            releaser,
            exchange,
        })
    }
}

/// `/metrics`: the gauges that describe the caches and the ledger are read at scrape time.
impl Scrape for Webhook {
    fn scrape(&self) -> String {
        let (cache, gauges, now) = (&self.cache, &self.metrics.cache, Instant::now());
        gauges.set_pods(
            cache.live_pods(),
            cache.cluster_pending(),
            cache.cluster_held(),
        );
        gauges.set_reservations(self.ledger.reserved());
        gauges.set_replicas(self.ledger.replicas());
        if let Some(n) = cache.schedulable_nodes() {
            gauges.set_schedulable_nodes(n);
        }
        for watched in Watched::ALL {
            gauges.set_watch(
                watched.name(),
                cache.age(watched, now),
                cache.broken_for(watched, now),
            );
        }
        self.metrics.scrape()
    }
}

/// A running webhook.
pub struct Started {
    pub webhook: Webhook,
    pub running: Running,
    sweeper: tokio::task::JoinHandle<()>,
    throttled: tokio::task::JoinHandle<()>,
    releaser: Option<release::Running>,
    exchange: Option<tokio::task::JoinHandle<()>>,
}

impl Started {
    pub fn addr(&self) -> SocketAddr {
        self.running.addr
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.running.metrics_addr
    }

    /// Stops accepting, drains in-flight requests, and stops the sweeper, the Throttled
    /// Event publisher and the releaser (held pods stay held: the releaser gives its Lease up
    /// for the next replica, and `bulwark release --all` lets them all go).
    pub async fn shutdown(self) {
        self.running.shutdown().await;
        self.sweeper.abort();
        self.throttled.abort();
        if let Some(exchange) = self.exchange {
            exchange.abort();
        }
        if let Some(r) = self.releaser {
            r.stop().await;
        }
    }
}
