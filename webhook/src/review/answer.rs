//! The two webhooks' answers: which pods are decided at all (exemptions, modes, dry-run) and
//! how a decision becomes an AdmissionResponse. The decisions themselves are in
//! [`super::defaults`] and [`crate::quota`]; this module holds no I/O.

use std::{sync::Arc, time::Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse};

use super::{
    Settings, defaults,
    wire::{Review, too_many_requests},
};
use crate::{
    metrics::webhook::AdmissionMetrics,
    policy::Mode,
    quota::{
        decide::{Ask, Limits},
        ledger::{Commit, Ledger, Request},
        retry,
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
}

pub struct Admitter {
    settings: Arc<Settings>,
    view: Arc<dyn ClusterView>,
    ledger: Arc<Ledger>,
    metrics: AdmissionMetrics,
    limits: Limits,
    /// The policy of namespaces the cache does not know (offline mode, or not yet watched).
    default_namespace: Arc<NamespaceInfo>,
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
        }
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
        let info = self
            .view
            .namespace(ns)
            .unwrap_or_else(|| self.default_namespace.clone());
        Ok(Subject { req, pod, ns, info })
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

    /// `POST /validate`: rate and count quotas.
    pub fn validate(&self, review: &Review, now: Instant) -> (AdmissionResponse, Answered) {
        let mut allow = review.allow();
        let Subject { req, pod, ns, info } = match self.subject(review) {
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
        let facts = self.settings.pods.facts(pod);
        if let Some(why) = facts.exempt {
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
        let name = pod.metadata.name.as_deref().or(Some(req.name.as_str()));
        let ask = Ask {
            pending_exempt: facts.pending_exempt,
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
        let request = Request {
            namespace: ns,
            name,
            policy,
            ask,
            commit,
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
            dry_run = req.dry_run,
            "refused pod creation"
        );
        let resp = with_warnings(too_many_requests(allow, message, retry), warnings);
        (resp, answered("refused", refusal.reason()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        cluster::cache::{Cache, Watched},
        metrics::webhook::WebhookMetrics,
        policy::Policy,
        quota::{self, ClusterLimits},
        review::{fixtures::Fixture, wire::decode},
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
        let cache = Arc::new(Cache::new(settings.defaults.clone(), vec![]));
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
}
