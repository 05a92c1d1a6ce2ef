//! The node controller's loop: watches of Nodes and node Leases feed in-memory stores; once a
//! second the leader turns them into views, plans, and carries the plan out. Every replica
//! serves metrics; only the leader acts and emits Events.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

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

use super::{
    NodeView, Settings,
    actions::{ActionError, ActionOutcome, Executor},
    audit::audit,
    health::view,
    leader::Elector,
    plan::{Action, Memory, Phase, Plan, plan},
};
use crate::{backoff::Jittered, metrics::nodes::NodeMetrics};

const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
const LEASE_DURATION: Duration = Duration::from_secs(15);
const RENEW_EVERY: Duration = Duration::from_secs(2);
/// A leader that cannot renew for this long stops acting, before its lease can expire.
const RENEW_DEADLINE: Duration = Duration::from_secs(10);
const TICK: Duration = Duration::from_secs(1);

pub struct NodeControllerOptions {
    pub settings: Settings,
    pub dry_run: bool,
    pub identity: String,
    pub lease_namespace: String,
    pub lease_name: String,
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
async fn elect(elector: Arc<Elector>, leader: Arc<AtomicBool>, metrics: Arc<NodeMetrics>) {
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
    opts: NodeControllerOptions,
    metrics: Arc<NodeMetrics>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
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
        elector: &elector,
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = &mut shutdown => break,
        }
        let is_leader = leader.load(Ordering::SeqCst);
        if is_leader {
            // `leader` is set only after the round that took the Lease read its record, so
            // the first plan of a term already spaces and cools down from its predecessor's.
            mem.safety = mem.safety.merge(elector.safety());
        } else {
            // A new term starts from what the nodes and the Lease say, not from stale
            // recovery waits.
            mem.new_term();
        }
        ctx.round(&nodes, &leases, is_leader, &mut mem, &mut said)
            .await;
        if is_leader && !opts.dry_run {
            // Written with the next renewal (every few seconds), a hold included.
            elector.note(mem.safety);
        }
    }
    election.abort();
    elector.release().await;
    Ok(())
}

struct Tick<'a> {
    settings: &'a Settings,
    dry_run: bool,
    metrics: &'a NodeMetrics,
    recorder: &'a Recorder,
    executor: &'a Executor,
    elector: &'a Elector,
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

    /// One round: every replica audits (for its metrics); the leader also plans and acts.
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
        self.audit(&all, leader, said).await;
        if !leader {
            return;
        }
        let removed_before = mem.safety.last_removal;
        let p = plan(&self.settings.timing, &views, mem, now);
        self.report_phases(&p);
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
            if matches!(action, Action::Remove { .. })
                && !self.dry_run
                && !self.recorded(node, now, said).await
            {
                // Not carried out, so it spaces nothing: the node is tried again later.
                mem.safety.last_removal = removed_before;
                continue;
            }
            self.act(action, node, v, now, said).await;
        }
    }

    /// Records a removal on the leader Lease before it is carried out, so that no later
    /// leader removes another node sooner than `removalInterval` after it. `false` (and
    /// reported) when the record could not be written.
    async fn recorded(&self, node: &Node, now: SystemTime, said: &mut Said) -> bool {
        let name = node.metadata.name.as_deref().unwrap_or_default();
        if said
            .failed
            .get(name)
            .is_some_and(|until| Instant::now() < *until)
        {
            return false;
        }
        let Err(e) = self.elector.record_removal(now).await else {
            return true;
        };
        said.failed
            .insert(name.to_owned(), Instant::now() + RETRY_FAILED_AFTER);
        self.metrics
            .actions
            .with_label_values(&["remove", "error"])
            .inc();
        let note = format!("remove not carried out: recording it on the leader Lease failed: {e}");
        tracing::warn!(node = name, "{note}");
        self.event(node, EventType::Warning, "RemediationFailed", note)
            .await;
        false
    }

    /// Protect-nodes audit: reported once per node and finding.
    async fn audit(&self, all: &[Arc<Node>], leader: bool, said: &mut Said) {
        self.metrics.findings.reset();
        for node in all {
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
    }

    fn report_phases(&self, p: &Plan) {
        for phase in Phase::ALL {
            let n = p.phases.values().filter(|x| **x == phase).count();
            self.metrics
                .phases
                .with_label_values(&[phase.name()])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.metrics.hold.set(i64::from(p.hold.is_some()));
    }

    /// Carries out one action (unless it failed recently) and reports it.
    async fn act(
        &self,
        action: &Action,
        node: &Node,
        v: &NodeView,
        now: SystemTime,
        said: &mut Said,
    ) {
        let name = action.node();
        if self.dry_run && !said.first(name, &format!("dry-run:{}", action.kind())) {
            return;
        }
        if said
            .failed
            .get(name)
            .is_some_and(|until| Instant::now() < *until)
        {
            return;
        }
        let outcome = self.executor.apply(action, v).await;
        if outcome.is_err() {
            said.failed
                .insert(name.to_owned(), Instant::now() + RETRY_FAILED_AFTER);
        } else {
            said.failed.remove(name);
        }
        let label = match &outcome {
            Ok(ActionOutcome::Done) => "done",
            Ok(ActionOutcome::DryRun) => "dry_run",
            Ok(ActionOutcome::Unchanged) => "unchanged",
            Ok(ActionOutcome::Refused(_)) => "refused",
            Err(_) => "error",
        };
        self.metrics
            .actions
            .with_label_values(&[action.kind(), label])
            .inc();
        if let (Ok(ActionOutcome::Done | ActionOutcome::DryRun), Action::Taint { .. }) =
            (&outcome, action)
            && let Some(since) = v.unhealthy_since()
        {
            let took = now.duration_since(since).unwrap_or_default();
            self.metrics.signal_to_taint.observe(took.as_secs_f64());
        }
        let Some((reason, note, kind)) = self.report(action, &outcome, said) else {
            return;
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

    /// The Event an action's outcome gets, if any.
    fn report(
        &self,
        action: &Action,
        outcome: &Result<ActionOutcome, ActionError>,
        said: &mut Said,
    ) -> Option<(&'static str, String, EventType)> {
        let timing = &self.settings.timing;
        Some(match (outcome, action) {
            (Ok(ActionOutcome::Done | ActionOutcome::DryRun), Action::Taint { reason, .. }) => (
                "Tainted",
                format!(
                    "unhealthy ({reason}) for longer than {}s: tainted {}={reason}:NoSchedule",
                    timing.grace.as_secs(),
                    super::UNHEALTHY_TAINT
                ),
                EventType::Warning,
            ),
            (Ok(ActionOutcome::Done | ActionOutcome::DryRun), Action::Remove { reason, .. }) => (
                "MarkedForRemoval",
                format!(
                    "still unhealthy ({reason}) {}s after the taint: marked for removal (action {})",
                    timing.remove_after.as_secs(),
                    self.settings.removal.name()
                ),
                EventType::Warning,
            ),
            (Ok(ActionOutcome::Done | ActionOutcome::DryRun), Action::Restore { .. }) => (
                "Recovered",
                format!(
                    "healthy for {}s: bulwark's taints and mark removed",
                    timing.recover_after.as_secs()
                ),
                EventType::Normal,
            ),
            (Ok(ActionOutcome::Unchanged), _) => return None,
            (Ok(ActionOutcome::Refused(why)), _) => {
                if !said.first(action.node(), &format!("refused:{}", action.kind())) {
                    return None;
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
        })
    }
}
