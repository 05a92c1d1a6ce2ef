//! The two webhooks' answers: which pods are decided at all (exemptions, modes, dry-run) and
//! how a decision becomes an AdmissionResponse. The decisions themselves are in
//! [`super::defaults`] and [`crate::quota`]; this module holds no I/O.

use std::{sync::Arc, time::Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse};

use super::{
    Settings,
    caller::RefusalForm,
    defaults, hold,
    wire::{Review, denied, too_many_requests},
};
use crate::{
    metrics::webhook::AdmissionMetrics,
    policy::{
        Mode,
        pod::{can_be_gated, hold_gate},
    },
    quota::{
        decide::{Ask, Limits, cluster_cap},
        ledger::{Commit, Ledger, Request},
        line, retry,
        throttled::Throttled,
        view::{ClusterView, NamespaceInfo},
    },
};

/// How a review was answered, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answered {
    pub verdict: &'static str,
    pub reason: &'static str,
}

const fn answered(verdict: &'static str, reason: &'static str) -> Answered {
    Answered { verdict, reason }
}

/// A pod CREATE that bulwark decides.
struct Subject<'r> {
    req: &'r AdmissionRequest<Pod>,
    pod: &'r Pod,
    ns: &'r str,
    info: Arc<NamespaceInfo>,
    /// The cluster does not show the namespace (see `Request::unknown_namespace`).
    unknown: bool,
}

pub struct Admitter {
    settings: Arc<Settings>,
    view: Arc<dyn ClusterView>,
    ledger: Arc<Ledger>,
    metrics: AdmissionMetrics,
    limits: Limits,
    /// The policy of namespaces the cache does not know (offline mode, or not yet watched).
    default_namespace: Arc<NamespaceInfo>,
    /// Enforced refusals per namespace, for the Throttled Events written off this path.
    throttled: Arc<Throttled>,
}

impl Admitter {
    pub fn new(
        settings: Arc<Settings>,
        view: Arc<dyn ClusterView>,
        ledger: Arc<Ledger>,
        metrics: AdmissionMetrics,
    ) -> Self {
        Admitter {
            limits: settings.quota.limits(),
            default_namespace: Arc::new(NamespaceInfo {
                policy: settings.defaults.clone(),
                problems: Vec::new(),
            }),
            settings,
            view,
            ledger,
            metrics,
            throttled: Arc::new(Throttled::new()),
        }
    }

    /// The refusals it counts for Throttled Events; whoever wires it drains them.
    pub fn throttled(&self) -> &Arc<Throttled> {
        &self.throttled
    }

    /// The pod CREATE bulwark decides and its namespace's policy, or why it does not decide.
    fn subject<'r>(&self, review: &'r Review) -> Result<Subject<'r>, Answered> {
        let Some((req, pod)) = review.pod_create() else {
            return Err(answered("allowed", "not_pod_create"));
        };
        let ns = req
            .namespace
            .as_deref()
            .or(pod.metadata.namespace.as_deref())
            .unwrap_or("default");
        if self.settings.pods.is_exempt_namespace(ns) {
            return Err(answered("allowed", "exempt_namespace"));
        }
        let (info, unknown) = match self.view.namespace(ns) {
            Some(info) => (info, false),
            None => (
                self.default_namespace.clone(),
                self.view.namespaces_listed(),
            ),
        };
        Ok(Subject {
            req,
            pod,
            ns,
            info,
            unknown,
        })
    }

    /// `POST /mutate`: default requests and limits.
    pub fn mutate(&self, review: &Review) -> (AdmissionResponse, Answered) {
        let allow = review.allow();
        let Subject { pod, ns, info, .. } = match self.subject(review) {
            Ok(found) => found,
            Err(o) => return (allow, o),
        };
        if info.policy.mode == Mode::Off {
            return (allow, answered("allowed", "mode_off"));
        }
        let m = defaults::mutate(
            pod,
            &info.policy.default_requests,
            &info.policy.default_limits,
        );
        if m.is_empty() {
            return (allow, answered("allowed", "complete"));
        }
        let warnings = m.warnings(ns);
        let patch = m.into_patch(pod);
        match allow.clone().with_patch(patch) {
            Ok(mut resp) => {
                resp.warnings = Some(warnings);
                (resp, answered("mutated", "defaulted"))
            }
            Err(e) => {
                // Cannot happen with string values; admit unchanged rather than block pods.
                tracing::error!(error = %e, "serialising patch");
                (allow, answered("allowed", "patch_error"))
            }
        }
    }

    /// `POST /hold`: in a namespace that holds pods over its pending caps, puts the pod
    /// behind bulwark's scheduling gate ([`hold`]).
    pub fn hold(&self, review: &Review, now: Instant) -> (AdmissionResponse, Answered) {
        let allow = review.allow();
        let Subject { pod, ns, info, .. } = match self.subject(review) {
            Ok(found) => found,
            Err(o) => return (allow, o),
        };
        if !line::holds(&info.policy) {
            return (allow, answered("allowed", "not_holding"));
        }
        let facts = self.settings.pods.facts(pod, ns);
        if facts.pending_exempt() {
            return (allow, answered("allowed", "exempt_pod"));
        }
        if hold_gate(pod).is_some() {
            return (allow, answered("allowed", "already_gated"));
        }
        if !can_be_gated(pod) {
            // Bound already: the validating call holds it to the caps as in refuse mode.
            return (allow, answered("allowed", "bound"));
        }
        let counts = self.view.pod_counts(ns, facts.workflow.as_deref(), now);
        let cap = cluster_cap(&self.limits.cluster, self.view.schedulable_nodes());
        let over = hold::over_cap(
            &info.policy,
            &counts,
            facts.workflow.is_some() && !counts.workflow_started,
            self.limits.workflow_reserved_percent,
            (
                self.view
                    .cluster_pending()
                    .saturating_add(self.view.cluster_held()),
                cap,
            ),
        );
        let patch = hold::patch(pod, over.as_deref());
        match allow.clone().with_patch(patch) {
            Ok(mut resp) => {
                let reason = match &over {
                    Some(over) => {
                        resp.warnings = Some(vec![hold::warning(ns, over)]);
                        "over_cap"
                    }
                    None => "under_cap",
                };
                (resp, answered("held", reason))
            }
            Err(e) => {
                tracing::error!(error = %e, "serialising patch");
                (allow, answered("allowed", "patch_error"))
            }
        }
    }

    /// A pod UPDATE that removes bulwark's gate (`gate.bulwark.io`, whose matchConditions
    /// send nothing else): only the releaser may, or a tenant could create pods past the
    /// pending caps behind the gate and then let them all go at once.
    fn gate_removal(&self, review: &Review) -> Option<(AdmissionResponse, Answered)> {
        let req = review.gate_removal()?;
        let user = &req.user_info;
        let username = user.username.as_deref().unwrap_or_default();
        let allowed = self.settings.releaser.as_deref() == Some(username)
            || user.groups.iter().flatten().any(|g| g == "system:masters");
        if allowed {
            return Some((review.allow(), answered("allowed", "releaser")));
        }
        let message = format!(
            "bulwark: only bulwark's releaser removes scheduling gate {}: it lets held pods go \
             in order while the pending caps have room (to let every held pod go: bulwark \
             release --all)",
            crate::policy::pod::HOLD_GATE
        );
        Some((
            denied(review.allow(), &message, "Forbidden", 403),
            answered("refused", "gate_removal"),
        ))
    }

    /// `POST /validate`: rate and count quotas.
    pub fn validate(&self, review: &Review, now: Instant) -> (AdmissionResponse, Answered) {
        if let Some(answer) = self.gate_removal(review) {
            return answer;
        }
        let mut allow = review.allow();
        let Subject {
            req,
            pod,
            ns,
            info,
            unknown,
        } = match self.subject(review) {
            Ok(found) => found,
            Err(o) => return (allow, o),
        };
        let mut warnings: Vec<String> = info
            .problems
            .iter()
            .map(|p| format!("bulwark: namespace {ns:?}: {p}"))
            .collect();
        let with_warnings = |mut resp: AdmissionResponse, warnings: Vec<String>| {
            if !warnings.is_empty() {
                resp.warnings = Some(warnings);
            }
            resp
        };
        let policy = &info.policy;
        if policy.mode == Mode::Off {
            return (
                with_warnings(allow, warnings),
                answered("allowed", "mode_off"),
            );
        }
        let facts = self.settings.pods.facts(pod, ns);
        if let Some(why) = facts.exempt() {
            tracing::debug!(namespace = ns, why, "exempt pod");
            return (
                with_warnings(allow, warnings),
                answered("allowed", "exempt_pod"),
            );
        }
        let commit = if req.dry_run {
            Commit::DryRun
        } else if policy.mode == Mode::Warn {
            Commit::Warn
        } else {
            Commit::Enforce
        };
        let name = pod.metadata.name.as_deref().unwrap_or(req.name.as_str());
        if let Some(what) = self.settings.pods.oversized_name(pod, ns, name) {
            // No such pod can be created, so admitting it admits nothing; keeping it would let
            // a forged review store what it likes.
            tracing::debug!(what, "review of a pod whose names Kubernetes would refuse");
            return (
                with_warnings(allow, warnings),
                answered("allowed", "impossible_name"),
            );
        }
        let name = Some(name);
        // Behind the gate in a holding namespace, the pod waits in the line for the pending
        // caps (whoever put the gate there: it only delays the pod); rate and max-pods apply.
        let held = line::holds(policy) && hold_gate(pod).is_some();
        let ask = Ask {
            pending_exempt: facts.pending_exempt() || held,
            workflow: facts.workflow.as_deref(),
        };
        let stale = self.view.stale(self.settings.quota.cache_stale_limit, now);
        let limits = Limits {
            count_quotas: stale.is_none(),
            ..self.limits
        };
        if let Some(stale) = &stale {
            warnings.push(stale.warning());
        }
        let form = self.settings.queueing.form(&req.user_info);
        let request = Request {
            namespace: ns,
            name,
            policy,
            ask,
            commit,
            // Only a client told when to come back waits in line for that time.
            joins_line: form == RefusalForm::RetryAfter,
            unknown_namespace: unknown,
        };
        let result = self.ledger.admit(&*self.view, &request, &limits, now);
        let Err(refusal) = result else {
            let reason = if stale.is_some() { "cache_stale" } else { "ok" };
            return (with_warnings(allow, warnings), answered("allowed", reason));
        };
        let retry = retry::jittered(refusal.expected_wait(), self.settings.quota.max_retry_after);
        let message = refusal.message(ns, retry);
        let mode_label = match commit {
            Commit::DryRun => "dry_run",
            Commit::Warn => "warn",
            Commit::Enforce => "enforce",
        };
        self.metrics
            .refusals
            .with_label_values(&[refusal.reason(), mode_label])
            .inc();
        if commit == Commit::Warn {
            warnings.push(format!("bulwark (mode warn, not enforced): {message}"));
            allow = with_warnings(allow, warnings);
            return (allow, answered("warned", refusal.reason()));
        }
        tracing::debug!(
            namespace = ns,
            reason = refusal.reason(),
            retry_after = retry,
            form = form.label(),
            dry_run = req.dry_run,
            "refused pod creation"
        );
        self.metrics.refused(form.label(), retry);
        // A dry run creates nothing, so it is no refused creation.
        if commit == Commit::Enforce {
            self.throttled.refused(ns, &refusal, now);
        }
        let hint = (form == RefusalForm::RetryAfter).then_some(retry);
        let resp = with_warnings(too_many_requests(allow, message, hint), warnings);
        (resp, answered("refused", refusal.reason()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        cluster::cache::{Cache, PodEntry, PodState, Watched},
        metrics::webhook::WebhookMetrics,
        policy::{
            Policy,
            pod::{Held, PodRules},
        },
        quota::{self, ClusterLimits},
        review::{caller::QueueingClients, fixtures::Fixture, wire::decode},
    };

    fn review(uid: &str) -> Review {
        decode(&Fixture::pod_create().uid(uid).name(uid).bytes()).unwrap()
    }

    #[test]
    fn a_watch_failing_past_the_limit_opens_the_count_quotas_with_a_warning() {
        let settings = Settings {
            defaults: Policy {
                rate: None,
                max_pods: Some(1),
                ..Policy::default()
            },
            quota: quota::Settings {
                cluster: ClusterLimits {
                    max_pending_pods: None,
                    pending_per_healthy_node: None,
                },
                cache_stale_limit: Duration::from_secs(60),
                ..quota::Settings::default()
            },
            ..Settings::default()
        };
        let t = Instant::now();
        let cache = Arc::new(Cache::new(settings.defaults.clone(), settings.pods.clone()));
        let admitter = Admitter::new(
            Arc::new(settings),
            cache.clone(),
            Arc::new(Ledger::new(Duration::from_secs(600), t)),
            WebhookMetrics::new().admission,
        );
        let (resp, o) = admitter.validate(&review("a"), t);
        assert!(resp.allowed && o.reason == "ok", "{o:?}");
        let (resp, o) = admitter.validate(&review("b"), t);
        assert!(!resp.allowed && o.reason == "max_pods", "{o:?}");

        // Failing, but within the limit: the last snapshot still decides.
        let mut at = t;
        for _ in 0..12 {
            cache.watch_failed(Watched::Pods, at);
            at += Duration::from_secs(5);
        }
        let at = at + Duration::from_secs(1);
        let (resp, o) = admitter.validate(&review("c"), t + Duration::from_secs(59));
        assert!(!resp.allowed && o.reason == "max_pods", "{o:?}");

        let (resp, o) = admitter.validate(&review("d"), at);
        assert!(resp.allowed, "{o:?}");
        assert_eq!(o.reason, "cache_stale");
        let warnings = resp.warnings.unwrap_or_default();
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("watch of pods has been failing for 61s")),
            "{warnings:?}"
        );

        // The watch delivers again: the quota holds again.
        cache.mark_synced(Watched::Pods, at);
        let (resp, o) = admitter.validate(&review("e"), at);
        assert!(!resp.allowed && o.reason == "max_pods", "{o:?}");
    }

    #[test]
    fn a_holding_namespace_gates_its_pods_and_holds_the_gated_to_rate_and_max_pods_only() {
        use crate::policy::{PendingAction, pod::HOLD_GATE};
        let policy = Policy {
            rate: None,
            max_pods: Some(3),
            max_pending_pods: Some(1),
            pending_action: PendingAction::Hold,
            ..Policy::default()
        };
        let (admitter, cache) = admitter_and_cache(policy, QueueingClients::default());
        let t = Instant::now();
        let pending = PodEntry {
            state: PodState::Pending,
            held: Held::All,
            workflow: None,
        };
        cache.apply_pod("ci", "p0", pending, t);
        let fixture = |uid: &str, gated: bool| {
            let mut f = Fixture::pod_create().namespace("ci").uid(uid).name(uid);
            if gated {
                f.object_mut()["spec"]["schedulingGates"] =
                    serde_json::json!([{"name": HOLD_GATE}]);
            }
            f
        };
        // Over the cap: gated, annotated, warned.
        let (resp, o) = admitter.hold(&decode(&fixture("a", false).bytes()).unwrap(), t);
        assert!(resp.allowed && o == answered("held", "over_cap"), "{o:?}");
        assert!(resp.patch.is_some());
        let warnings = resp.warnings.unwrap_or_default();
        assert!(
            warnings[0].contains("is at max-pending-pods 1 (1 pending, 0 held when admitted)"),
            "{warnings:?}"
        );
        // Already gated: left alone. Bound: not gated.
        let (_, o) = admitter.hold(&decode(&fixture("b", true).bytes()).unwrap(), t);
        assert_eq!(o.reason, "already_gated");
        let mut bound = fixture("c", false);
        bound.object_mut()["spec"]["nodeName"] = serde_json::json!("n1");
        let (_, o) = admitter.hold(&decode(&bound.bytes()).unwrap(), t);
        assert_eq!(o.reason, "bound");

        // The ungated pod is over max-pending-pods; gated ones pass it, up to max-pods.
        let (resp, o) = admitter.validate(&decode(&fixture("d", false).bytes()).unwrap(), t);
        assert!(!resp.allowed && o.reason == "max_pending", "{o:?}");
        for uid in ["e", "f"] {
            let (resp, o) = admitter.validate(&decode(&fixture(uid, true).bytes()).unwrap(), t);
            assert!(resp.allowed, "{uid}: {o:?}");
        }
        let (resp, o) = admitter.validate(&decode(&fixture("g", true).bytes()).unwrap(), t);
        assert!(!resp.allowed && o.reason == "max_pods", "{o:?}");
    }

    #[test]
    fn only_the_releaser_removes_the_gate() {
        use crate::policy::pod::HOLD_GATE;
        let settings = Settings {
            releaser: Some("system:serviceaccount:bulwark-system:bulwark-webhook".into()),
            ..Settings::default()
        };
        let cache = Arc::new(Cache::new(Policy::default(), PodRules::default()));
        let admitter = Admitter::new(
            Arc::new(settings),
            cache,
            Arc::new(Ledger::new(Duration::from_secs(600), Instant::now())),
            WebhookMetrics::new().admission,
        );
        let update = |user: &str, groups: &[&str], removes: bool| {
            let f = Fixture::pod_create().namespace("ci").user(user, groups);
            let mut v = f.into_value();
            v["request"]["operation"] = serde_json::json!("UPDATE");
            let mut old = v["request"]["object"].clone();
            old["spec"]["schedulingGates"] = serde_json::json!([{"name": HOLD_GATE}]);
            if !removes {
                v["request"]["object"] = old.clone();
            }
            v["request"]["oldObject"] = old;
            decode(&serde_json::to_vec(&v).unwrap()).unwrap()
        };
        let t = Instant::now();
        let (resp, o) = admitter.validate(&update("tenant", &["system:authenticated"], true), t);
        assert!(!resp.allowed && o.reason == "gate_removal", "{o:?}");
        assert_eq!(resp.result.code, 403);
        assert!(
            resp.result
                .message
                .contains("only bulwark's releaser removes")
        );
        let releaser = "system:serviceaccount:bulwark-system:bulwark-webhook";
        let (resp, _) = admitter.validate(&update(releaser, &[], true), t);
        assert!(resp.allowed);
        let (resp, _) = admitter.validate(&update("admin", &["system:masters"], true), t);
        assert!(resp.allowed);
        // An update that keeps the gate is none of the guard's business.
        let (resp, o) = admitter.validate(&update("tenant", &[], false), t);
        assert!(resp.allowed && o.reason == "not_pod_create", "{o:?}");
    }

    /// An admitter over an empty cache, for namespaces whose defaults are `policy`.
    fn admitter_and_cache(policy: Policy, queueing: QueueingClients) -> (Admitter, Arc<Cache>) {
        let settings = Settings {
            defaults: policy.clone(),
            queueing,
            ..Settings::default()
        };
        let cache = Arc::new(Cache::new(policy, PodRules::default()));
        let admitter = Admitter::new(
            Arc::new(settings),
            cache.clone(),
            Arc::new(Ledger::new(Duration::from_secs(600), Instant::now())),
            WebhookMetrics::new().admission,
        );
        (admitter, cache)
    }

    fn admitter(policy: Policy, queueing: QueueingClients) -> Admitter {
        admitter_and_cache(policy, queueing).0
    }

    fn by(user: &str, uid: &str) -> Review {
        decode(
            &Fixture::pod_create()
                .uid(uid)
                .name(uid)
                .user(user, &[])
                .bytes(),
        )
        .unwrap()
    }

    #[test]
    fn controllers_are_refused_without_retry_after_and_people_with_it() {
        let full = Policy {
            rate: None,
            max_pods: Some(0),
            ..Policy::default()
        };
        let a = admitter(full.clone(), QueueingClients::default());
        let t = Instant::now();
        let job = "system:serviceaccount:kube-system:job-controller";
        let (resp, o) = a.validate(&by(job, "a"), t);
        assert!(!resp.allowed && o.reason == "max_pods", "{o:?}");
        assert_eq!(resp.result.code, 429);
        assert_eq!(resp.result.reason, "TooManyRequests");
        assert!(resp.result.details.is_none(), "{:?}", resp.result.details);
        assert!(
            resp.result.message.contains("at its limit of 0"),
            "{}",
            resp.result.message
        );

        let (resp, _) = a.validate(&by("kubernetes-admin", "b"), t);
        assert_eq!(resp.result.code, 429);
        let retry = resp.result.details.map(|d| d.retry_after_seconds);
        assert!(retry.is_some_and(|s| s >= 1), "{retry:?}");

        // The old form for controllers, by config.
        let old = QueueingClients {
            controllers: false,
            names: vec![],
        };
        let (resp, _) = admitter(full, old).validate(&by(job, "c"), t);
        assert!(resp.result.details.is_some());
    }

    #[test]
    fn only_clients_told_when_to_come_back_wait_in_line() {
        let capped = Policy {
            rate: None,
            max_pods: None,
            max_pending_pods: Some(0),
            ..Policy::default()
        };
        let (a, cache) = admitter_and_cache(capped, QueueingClients::default());
        let t = Instant::now();
        // 50 pods of namespace "ci" just started: pending pods drain at 5 per second.
        for i in 0..50 {
            let name = format!("started-{i}");
            let entry = |state| PodEntry {
                state,
                held: Held::All,
                workflow: None,
            };
            cache.apply_pod("ci", &name, entry(PodState::Pending), t);
            cache.apply_pod("ci", &name, entry(PodState::Running), t);
        }
        let retry = |user: &str, uid: &str| {
            let (resp, _) = a.validate(&by(user, uid), t);
            resp.result.details.map(|d| d.retry_after_seconds)
        };
        // 20 refused controllers retry on their own: they are not in line...
        for i in 0..20 {
            let id = format!("c{i}");
            assert_eq!(retry("system:kube-controller-manager", &id), None);
        }
        // ...so a person is first: one slot at 5 pods/s, 0.2 s, told 1 or 2 s (21 in line
        // would be 4.2 s, told 5 to 7 s).
        let first = retry("kubernetes-admin", "p0");
        assert!(first.is_some_and(|s| (1..=2).contains(&s)), "{first:?}");
        // People do line up behind each other.
        for i in 1..20 {
            retry("kubernetes-admin", &format!("p{i}"));
        }
        let later = retry("kubernetes-admin", "p20");
        assert!(later.is_some_and(|s| s >= 5), "{later:?}");
    }

    #[test]
    fn only_enforced_refusals_are_counted_for_throttled_events() {
        let full = Policy {
            rate: None,
            max_pods: Some(0),
            ..Policy::default()
        };
        let t = Instant::now();
        let a = admitter(full.clone(), QueueingClients::default());
        a.validate(&review("a"), t);
        a.validate(&review("b"), t);
        let dry = decode(
            &Fixture::pod_create()
                .uid("c")
                .name("c")
                .dry_run(true)
                .bytes(),
        )
        .unwrap();
        a.validate(&dry, t);
        let due = a.throttled().due(t + Duration::from_secs(1), 10);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].counts(), "max_pods=2", "the dry run is not counted");

        let warn = admitter(
            Policy {
                mode: Mode::Warn,
                ..full
            },
            QueueingClients::default(),
        );
        let (resp, o) = warn.validate(&review("d"), t);
        assert!(resp.allowed && o.verdict == "warned", "{o:?}");
        assert!(
            warn.throttled()
                .due(t + Duration::from_secs(1), 10)
                .is_empty()
        );
    }

    fn in_namespace(namespace: &str, uid: &str, spec: serde_json::Value) -> Review {
        let mut f = Fixture::pod_create()
            .uid(uid)
            .name(uid)
            .namespace(namespace);
        if let Some(obj) = f.object_mut()["spec"].as_object_mut() {
            obj.extend(spec.as_object().cloned().unwrap_or_default());
        }
        decode(&f.bytes()).unwrap()
    }

    #[test]
    fn a_tenants_system_critical_pod_is_held_to_its_limits() {
        let full = Policy {
            rate: None,
            max_pods: Some(0),
            ..Policy::default()
        };
        let settings = Settings {
            defaults: full.clone(),
            pods: PodRules {
                exempt_namespaces: vec![],
                ..PodRules::default()
            },
            ..Settings::default()
        };
        let cache = Arc::new(Cache::new(full, settings.pods.clone()));
        let a = Admitter::new(
            Arc::new(settings),
            cache,
            Arc::new(Ledger::new(Duration::from_secs(600), Instant::now())),
            WebhookMetrics::new().admission,
        );
        let t = Instant::now();
        let critical = serde_json::json!({"priorityClassName": "system-cluster-critical"});
        let (resp, o) = a.validate(&in_namespace("tenant", "c", critical.clone()), t);
        assert!(!resp.allowed && o.reason == "max_pods", "{o:?}");
        // In a system namespace the same pod is exempt.
        let (resp, o) = a.validate(&in_namespace("kube-system", "c", critical), t);
        assert!(resp.allowed && o.reason == "exempt_pod", "{o:?}");
    }

    #[test]
    fn names_kubernetes_would_refuse_are_admitted_and_nothing_is_kept() {
        let (a, _) = admitter_and_cache(Policy::default(), QueueingClients::default());
        let t = Instant::now();
        let long_ns = "n".repeat(64);
        let (resp, o) = a.validate(&in_namespace(&long_ns, "p", serde_json::json!({})), t);
        assert!(resp.allowed && o.reason == "impossible_name", "{o:?}");
        let long_name = decode(
            &Fixture::pod_create()
                .uid("u")
                .name(&"p".repeat(254))
                .bytes(),
        )
        .unwrap();
        let (resp, o) = a.validate(&long_name, t);
        assert!(resp.allowed && o.reason == "impossible_name", "{o:?}");
        assert_eq!(a.ledger.reserved(), 0);
        let (_, o) = a.validate(&review("fine"), t);
        assert_eq!(o.reason, "ok");
        assert_eq!(a.ledger.reserved(), 1);
    }

    #[test]
    fn once_namespaces_are_listed_an_unknown_one_goes_to_the_strangers_table() {
        let (a, cache) = admitter_and_cache(Policy::default(), QueueingClients::default());
        let t = Instant::now();
        let (_, o) = a.validate(&review("before"), t);
        assert_eq!(o.reason, "ok");
        assert_eq!(
            a.ledger.strangers_held(),
            0,
            "not listed yet: the known table"
        );
        cache.mark_synced(Watched::Namespaces, t);
        let (resp, o) = a.validate(&in_namespace("made-up", "p", serde_json::json!({})), t);
        assert!(resp.allowed && o.reason == "ok", "{o:?}");
        assert_eq!(a.ledger.strangers_held(), 1);
    }
}
