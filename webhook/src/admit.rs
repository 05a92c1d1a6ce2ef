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
        let result = self.ledger.admit(
            &*self.view,
            ns,
            name,
            policy,
            ask,
            &self.limits,
            commit,
            now,
        );
        let Err(refusal) = result else {
            return (with_warnings(allow, warnings), outcome("allowed", "ok"));
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
