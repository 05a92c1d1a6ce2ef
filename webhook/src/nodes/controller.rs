//! The node controller's loop: watches of Nodes and node Leases feed in-memory stores; once a
//! second the leader turns them into views, plans, and carries the plan out. Every replica
//! serves metrics; only the leader acts and emits Events.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use futures::StreamExt;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use super::{
    Settings,
    actions::{Executor, Outcome},
    audit::audit,
    health::view,
    leader::Elector,
    plan::{Action, Memory, Phase, plan},
};
use crate::backoff::Jittered;

const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
const LEASE_DURATION: Duration = Duration::from_secs(15);
const RENEW_EVERY: Duration = Duration::from_secs(2);
/// A leader that cannot renew for this long stops acting, before its lease can expire.
const RENEW_DEADLINE: Duration = Duration::from_secs(10);
const TICK: Duration = Duration::from_secs(1);

pub struct Options {
    pub settings: Settings,
    pub dry_run: bool,
    pub identity: String,
    pub lease_namespace: String,
    pub lease_name: String,
}

struct Metrics {
    registry: Registry,
    phases: IntGaugeVec,
    actions: IntCounterVec,
    hold: IntGauge,
    leader: IntGauge,
    findings: IntGaugeVec,
    signal_to_taint: Histogram,
}

impl Metrics {
    fn new() -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("bulwark".into()), None)?;
        let phases = IntGaugeVec::new(
            Opts::new("node_phase_nodes", "Nodes per health phase"),
            &["phase"],
        )?;
        let actions = IntCounterVec::new(
            Opts::new("node_actions_total", "Node remediation actions by outcome"),
            &["action", "outcome"],
        )?;
        let hold = IntGauge::new(
            "node_remediation_hold",
            "1 while remediation is held (too many unhealthy nodes, a zone down, cool-down)",
        )?;
        let leader = IntGauge::new("node_controller_leader", "1 on the replica that acts")?;
        let findings = IntGaugeVec::new(
            Opts::new(
                "node_audit_findings",
                "Nodes reported by the protect-nodes audit",
            ),
            &["kind"],
        )?;
        let signal_to_taint = Histogram::with_opts(
            HistogramOpts::new(
                "node_signal_to_taint_seconds",
                "From the first unhealthy signal to bulwark's taint",
            )
            .buckets(vec![
                1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
            ]),
        )?;
        registry.register(Box::new(phases.clone()))?;
        registry.register(Box::new(actions.clone()))?;
        registry.register(Box::new(hold.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(findings.clone()))?;
        registry.register(Box::new(signal_to_taint.clone()))?;
        Ok(Metrics {
            registry,
            phases,
            actions,
            hold,
            leader,
            findings,
            signal_to_taint,
        })
    }

    fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Starts the store for a resource, fed by a watch that reconnects with jittered back-off.
fn store<K>(api: Api<K>) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&()).into_owned();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .backoff(Jittered::for_watches());
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                tracing::warn!(resource = %kind, error = %e, "watch failed; retrying with back-off");
            }
        }
    });
    reader
}

/// Keeps trying to hold the lease; `leader` says whether this replica may act.
async fn elect(elector: Arc<Elector>, leader: Arc<AtomicBool>, metrics: Arc<Metrics>) {
    let mut renewed = Instant::now();
    loop {
        match elector.round().await {
            Ok(held) => {
                if held != leader.swap(held, Ordering::SeqCst) {
                    tracing::info!(
                        identity = elector.identity(),
                        leader = held,
                        "leadership changed"
                    );
                }
                if held {
                    renewed = Instant::now();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "leader lease round failed");
                if renewed.elapsed() > RENEW_DEADLINE && leader.swap(false, Ordering::SeqCst) {
                    tracing::warn!("could not renew the leader lease in time; no longer acting");
                }
            }
        }
        metrics.leader.set(i64::from(leader.load(Ordering::SeqCst)));
        let jitter = Duration::from_millis(fastrand::u64(0..500));
        tokio::time::sleep(RENEW_EVERY + jitter).await;
    }
}

async fn serve_metrics(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let router = Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    m.render(),
                )
                    .into_response()
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(metrics);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "metrics server");
        }
    });
    Ok(local)
}

/// What the leader has already said, so Events are not repeated every second.
#[derive(Default)]
struct Said {
    /// (node, what) pairs reported: audit findings, dry-run actions, refusals, holds.
    pairs: HashSet<(String, String)>,
    /// Nodes whose last action failed, and when to try again: a failing write (say, a
    /// missing RBAC rule) is not repeated, nor reported, every second.
    failed: HashMap<String, Instant>,
}

/// How long after a failed action its node is left alone.
const RETRY_FAILED_AFTER: Duration = Duration::from_secs(30);

impl Said {
    fn first(&mut self, node: &str, what: &str) -> bool {
        self.pairs.insert((node.to_owned(), what.to_owned()))
    }

    /// Forget what was said about nodes that are healthy again, so a new episode is told.
    fn forget_healthy(&mut self, healthy: &HashSet<&str>, keep: &str) {
        self.pairs
            .retain(|(node, what)| what.starts_with(keep) || !healthy.contains(node.as_str()));
    }
}

pub async fn run(
    client: Client,
    opts: Options,
    metrics_listen: Option<SocketAddr>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new()?);
    if let Some(addr) = metrics_listen {
        let local = serve_metrics(addr, metrics.clone()).await?;
        tracing::info!(%local, "metrics listening");
    }
    let nodes = store(Api::<Node>::all(client.clone()));
    let leases = store(Api::<Lease>::namespaced(
        client.clone(),
        NODE_LEASE_NAMESPACE,
    ));
    let leader = Arc::new(AtomicBool::new(false));
    let elector = Arc::new(Elector::new(
        Api::namespaced(client.clone(), &opts.lease_namespace),
        &opts.lease_name,
        &opts.identity,
        LEASE_DURATION,
    ));
    let election = tokio::spawn(elect(elector.clone(), leader.clone(), metrics.clone()));
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "bulwark-node-controller".into(),
            instance: Some(opts.identity.clone()),
        },
    );
    let executor = Executor::new(client, opts.settings.removal.clone(), opts.dry_run);
    nodes.wait_until_ready().await?;
    leases.wait_until_ready().await?;
    tracing::info!(
        nodes = nodes.state().len(),
        dry_run = opts.dry_run,
        removal = opts.settings.removal.name(),
        "node controller started"
    );

    let mut shutdown = std::pin::pin!(shutdown);
    let mut mem = Memory::default();
    let mut said = Said::default();
    let ctx = Tick {
        settings: &opts.settings,
        dry_run: opts.dry_run,
        metrics: &metrics,
        recorder: &recorder,
        executor: &executor,
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = &mut shutdown => break,
        }
        let is_leader = leader.load(Ordering::SeqCst);
        if !is_leader {
            // A new term starts from what the nodes say, not from stale memory.
            mem = Memory::default();
        }
        ctx.round(&nodes, &leases, is_leader, &mut mem, &mut said)
            .await;
    }
    election.abort();
    elector.release().await;
    Ok(())
}

struct Tick<'a> {
    settings: &'a Settings,
    dry_run: bool,
    metrics: &'a Metrics,
    recorder: &'a Recorder,
    executor: &'a Executor,
}

impl Tick<'_> {
    async fn event(&self, node: &Node, kind: EventType, reason: &str, note: String) {
        let event = Event {
            type_: kind,
            reason: reason.into(),
            note: Some(note),
            action: "Remediate".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &node.object_ref(&())).await {
            tracing::warn!(error = %e, "publishing Event failed");
        }
    }

    async fn round(
        &self,
        nodes: &Store<Node>,
        leases: &Store<Lease>,
        leader: bool,
        mem: &mut Memory,
        said: &mut Said,
    ) {
        let now = SystemTime::now();
        let all = nodes.state();
        let views: Vec<_> = all
            .iter()
            .map(|n| {
                let name = n.metadata.name.clone().unwrap_or_default();
                let lease = leases.get(&ObjectRef::new(&name).within(NODE_LEASE_NAMESPACE));
                view(n, lease.as_deref(), &self.settings.signals, now)
            })
            .collect();

        // Protect-nodes audit: reported once per node and finding.
        self.metrics.findings.reset();
        for node in &all {
            for finding in audit(node, self.settings.max_pods_per_node) {
                self.metrics
                    .findings
                    .with_label_values(&[finding.kind()])
                    .inc();
                let name = node.metadata.name.as_deref().unwrap_or_default();
                if leader && said.first(name, &format!("audit:{}", finding.kind())) {
                    tracing::warn!(node = name, finding = %finding, "protect-nodes audit");
                    self.event(
                        node,
                        EventType::Warning,
                        "NodeNotProtected",
                        finding.to_string(),
                    )
                    .await;
                }
            }
        }
        if !leader {
            return;
        }

        let p = plan(&self.settings.timing, &views, mem, now);
        for phase in Phase::ALL {
            let n = p.phases.values().filter(|x| **x == phase).count();
            self.metrics
                .phases
                .with_label_values(&[phase.name()])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.metrics.hold.set(i64::from(p.hold.is_some()));
        let healthy: HashSet<&str> = p
            .phases
            .iter()
            .filter(|(_, ph)| **ph == Phase::Healthy)
            .map(|(n, _)| n.as_str())
            .collect();
        said.forget_healthy(&healthy, "audit:");
        let find = |name: &str| {
            all.iter()
                .find(|n| n.metadata.name.as_deref() == Some(name))
        };

        if let Some(hold) = &p.hold {
            let text = hold.to_string();
            for name in &p.held {
                if let Some(node) = find(name)
                    && said.first(name, &format!("hold:{}", hold.kind()))
                {
                    tracing::warn!(node = %name, hold = %text, "remediation held");
                    self.event(
                        node,
                        EventType::Warning,
                        "RemediationHeld",
                        format!("not acting on this unhealthy node: {text}"),
                    )
                    .await;
                }
            }
        }

        for action in &p.actions {
            let name = action.node();
            let (Some(node), Some(v)) = (find(name), views.iter().find(|v| v.name == name)) else {
                continue;
            };
            if self.dry_run && !said.first(name, &format!("dry-run:{}", action.kind())) {
                continue;
            }
            if said
                .failed
                .get(name)
                .is_some_and(|until| Instant::now() < *until)
            {
                continue;
            }
            let outcome = self.executor.apply(action, v).await;
            if outcome.is_err() {
                said.failed
                    .insert(name.to_owned(), Instant::now() + RETRY_FAILED_AFTER);
            } else {
                said.failed.remove(name);
            }
            let label = match &outcome {
                Ok(Outcome::Done) => "done",
                Ok(Outcome::DryRun) => "dry_run",
                Ok(Outcome::Unchanged) => "unchanged",
                Ok(Outcome::Refused(_)) => "refused",
                Err(_) => "error",
            };
            self.metrics
                .actions
                .with_label_values(&[action.kind(), label])
                .inc();
            let (reason, note, kind) = match (&outcome, action) {
                (Ok(Outcome::Done | Outcome::DryRun), Action::Taint { reason, .. }) => {
                    if let Some(since) = v.unhealthy_since() {
                        let took = now.duration_since(since).unwrap_or_default();
                        self.metrics.signal_to_taint.observe(took.as_secs_f64());
                    }
                    (
                        "Tainted",
                        format!(
                            "unhealthy ({reason}) for longer than {}s: tainted {}={reason}:NoSchedule",
                            self.settings.timing.grace.as_secs(),
                            super::UNHEALTHY_TAINT
                        ),
                        EventType::Warning,
                    )
                }
                (Ok(Outcome::Done | Outcome::DryRun), Action::Remove { reason, .. }) => (
                    "MarkedForRemoval",
                    format!(
                        "still unhealthy ({reason}) {}s after the taint: marked for removal (action {})",
                        self.settings.timing.remove_after.as_secs(),
                        self.settings.removal.name()
                    ),
                    EventType::Warning,
                ),
                (Ok(Outcome::Done | Outcome::DryRun), Action::Restore { .. }) => (
                    "Recovered",
                    format!(
                        "healthy for {}s: bulwark's taints and mark removed",
                        self.settings.timing.recover_after.as_secs()
                    ),
                    EventType::Normal,
                ),
                (Ok(Outcome::Unchanged), _) => continue,
                (Ok(Outcome::Refused(why)), _) => {
                    if !said.first(name, &format!("refused:{}", action.kind())) {
                        continue;
                    }
                    (
                        "RemediationRefused",
                        format!("not removing: {why}"),
                        EventType::Warning,
                    )
                }
                (Err(e), _) => (
                    "RemediationFailed",
                    format!("{} failed: {e}", action.kind()),
                    EventType::Warning,
                ),
            };
            let note = if self.dry_run {
                format!("dry run, nothing changed: would have {note}")
            } else {
                note
            };
            tracing::info!(
                node = name,
                action = action.kind(),
                outcome = label,
                "{note}"
            );
            self.event(node, kind, reason, note).await;
        }
    }
}
