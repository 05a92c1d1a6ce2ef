//! The two webhooks' answers: which pods are decided at all (exemptions, modes, dry-run) and
//! how a decision becomes an AdmissionResponse. The decisions themselves are in
//! [`crate::defaults`] and [`crate::quota`]; this module holds no I/O.

use std::{sync::Arc, time::Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse};

use crate::{
    admission::{Review, too_many_requests},
    cache::{ClusterView, NamespaceInfo},
    config::Config,
    defaults, jitter,
    ledger::{Commit, Ledger, Limits},
    metrics::Metrics,
    pod::PodFacts,
    policy::Mode,
    quota::Ask,
};

/// How a review was answered, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: &'static str,
    pub reason: &'static str,
}

const fn outcome(verdict: &'static str, reason: &'static str) -> Outcome {
    Outcome { verdict, reason }
}

/// A pod CREATE that bulwark decides.
struct Subject<'r> {
    req: &'r AdmissionRequest<Pod>,
    pod: &'r Pod,
    ns: &'r str,
    info: Arc<NamespaceInfo>,
}

pub struct Admitter {
    config: Arc<Config>,
    view: Arc<dyn ClusterView>,
    ledger: Arc<Ledger>,
    metrics: Arc<Metrics>,
    limits: Limits,
    /// The policy of namespaces the cache does not know (offline mode, or not yet watched).
    default_namespace: Arc<NamespaceInfo>,
}

impl Admitter {
    pub fn new(
        config: Arc<Config>,
        view: Arc<dyn ClusterView>,
        ledger: Arc<Ledger>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Admitter {
            limits: Limits {
                cluster: config.cluster,
                workflow_reserved_percent: config.workflow_reserved_percent,
                count_quotas: true,
            },
            default_namespace: Arc::new(NamespaceInfo {
                policy: config.defaults.clone(),
                problems: Vec::new(),
            }),
            config,
            view,
            ledger,
            metrics,
        }
    }

    /// The pod CREATE bulwark decides and its namespace's policy, or why it does not decide.
    fn subject<'r>(&self, review: &'r Review) -> Result<Subject<'r>, Outcome> {
        let Some((req, pod)) = review.pod_create() else {
            return Err(outcome("allowed", "not_pod_create"));
        };
        let ns = req
            .namespace
            .as_deref()
            .or(pod.metadata.namespace.as_deref())
            .unwrap_or("default");
        if self.config.is_exempt_namespace(ns) {
            return Err(outcome("allowed", "exempt_namespace"));
        }
        let info = self
            .view
            .namespace(ns)
            .unwrap_or_else(|| self.default_namespace.clone());
        Ok(Subject { req, pod, ns, info })
    }

    /// `POST /mutate`: default requests and limits.
    pub fn mutate(&self, review: &Review) -> (AdmissionResponse, Outcome) {
        let allow = review.allow();
        let Subject { pod, ns, info, .. } = match self.subject(review) {
            Ok(found) => found,
            Err(o) => return (allow, o),
        };
        if info.policy.mode == Mode::Off {
            return (allow, outcome("allowed", "mode_off"));
        }
        let m = defaults::mutate(
            pod,
            &info.policy.default_requests,
            &info.policy.default_limits,
        );
        if m.is_empty() {
            return (allow, outcome("allowed", "complete"));
        }
        let warnings = m.warnings(ns);
        let patch = m.into_patch(pod);
        match allow.clone().with_patch(patch) {
            Ok(mut resp) => {
                resp.warnings = Some(warnings);
                (resp, outcome("mutated", "defaulted"))
            }
            Err(e) => {
                // Cannot happen with string values; admit unchanged rather than block pods.
                tracing::error!(error = %e, "serialising patch");
                (allow, outcome("allowed", "patch_error"))
            }
        }
    }

    /// `POST /validate`: rate and count quotas.
    pub fn validate(&self, review: &Review, now: Instant) -> (AdmissionResponse, Outcome) {
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
                outcome("allowed", "mode_off"),
            );
        }
        let facts = PodFacts::of(pod, &self.config.workflow_labels);
        if let Some(why) = facts.exempt {
            tracing::debug!(namespace = ns, why, "exempt pod");
            return (
                with_warnings(allow, warnings),
                outcome("allowed", "exempt_pod"),
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
        let stale = self.view.stale(self.config.cache_stale_limit, now);
        let limits = Limits {
            count_quotas: stale.is_none(),
            ..self.limits
        };
        if let Some(stale) = &stale {
            warnings.push(stale.warning());
        }
        let result = self
            .ledger
            .admit(&*self.view, ns, name, policy, ask, &limits, commit, now);
        let Err(refusal) = result else {
            let reason = if stale.is_some() { "cache_stale" } else { "ok" };
            return (with_warnings(allow, warnings), outcome("allowed", reason));
        };
        let retry = jitter::jittered(refusal.expected_wait(), self.config.max_retry_after);
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
            return (allow, outcome("warned", refusal.reason()));
        }
        tracing::debug!(
            namespace = ns,
            reason = refusal.reason(),
            retry_after = retry,
            dry_run = req.dry_run,
            "refused pod creation"
        );
        let resp = with_warnings(too_many_requests(allow, message, retry), warnings);
        (resp, outcome("refused", refusal.reason()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::{
        admission::decode,
        cache::{Cache, Resource},
        config::ClusterLimits,
        policy::Policy,
    };

    fn review(uid: &str) -> Review {
        let body = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": uid,
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "ci",
                "operation": "CREATE",
                "userInfo": {"username": "someone"},
                "object": {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": uid, "namespace": "ci"},
                    "spec": {"containers": [{"name": "c", "image": "x"}]}},
            },
        });
        decode(&serde_json::to_vec(&body).unwrap()).unwrap()
    }

    #[test]
    fn a_watch_failing_past_the_limit_opens_the_count_quotas_with_a_warning() {
        let config = Config {
            defaults: Policy {
                rate: None,
                max_pods: Some(1),
                ..Policy::default()
            },
            cluster: ClusterLimits {
                max_pending_pods: None,
                pending_per_healthy_node: None,
            },
            cache_stale_limit: Duration::from_secs(60),
            ..Config::default()
        };
        let t = Instant::now();
        let cache = Arc::new(Cache::new(config.defaults.clone(), vec![]));
        let admitter = Admitter::new(
            Arc::new(config),
            cache.clone(),
            Arc::new(Ledger::new(Duration::from_secs(600), t)),
            Arc::new(Metrics::new()),
        );
        let (resp, o) = admitter.validate(&review("a"), t);
        assert!(resp.allowed && o.reason == "ok", "{o:?}");
        let (resp, o) = admitter.validate(&review("b"), t);
        assert!(!resp.allowed && o.reason == "max_pods", "{o:?}");

        // Failing, but within the limit: the last snapshot still decides.
        let mut at = t;
        for _ in 0..12 {
            cache.watch_failed(Resource::Pods, at);
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
        cache.mark_synced(Resource::Pods, at);
        let (resp, o) = admitter.validate(&review("e"), at);
        assert!(!resp.allowed && o.reason == "max_pods", "{o:?}");
    }
}
