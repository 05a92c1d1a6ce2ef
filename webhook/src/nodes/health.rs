//! What a Node and its Lease say about the node's health: the signals, each with the time it
//! began. Pure: the controller feeds it objects from its watches and the current time.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};

use super::{MARKED_ANNOTATION, OPT_OUT_ANNOTATION, REMOVAL_TAINT, UNHEALTHY_TAINT};

/// cluster-autoscaler's marker: the autoscaler is already removing the node.
const AUTOSCALER_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// One reason a node is unhealthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    /// `NotReady`, `ReadyUnknown`, `LeaseStale` or a node condition type such as
    /// `KernelDeadlock`.
    pub reason: String,
    /// When it began: the condition's `lastTransitionTime`, or when the lease went stale.
    pub since: SystemTime,
}

/// A node as the plan sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub name: String,
    pub zone: Option<String>,
    pub provider_id: Option<String>,
    /// Empty when healthy.
    pub signals: Vec<Signal>,
    /// Its Lease was last renewed more than half of `leaseStaleAfter` ago, though not yet
    /// stale: one such node is a node slowing down, many at once are a control plane or a
    /// network that lags.
    pub heartbeat_late: bool,
    /// When bulwark's unhealthy taint was added, if the node carries it.
    pub tainted_since: Option<SystemTime>,
    /// bulwark has already acted to remove this node.
    pub marked: bool,
    /// When bulwark marked it: the `timeAdded` of its removal taint. Read from the taint, not
    /// from the annotation of the same name: a kubelet may rewrite its Node's annotations, but
    /// NodeRestriction forbids it to change the Node's taints.
    pub marked_at: Option<SystemTime>,
    /// `bulwark.io/remediation=off`.
    pub opted_out: bool,
    /// cluster-autoscaler is deleting it; leave it alone.
    pub autoscaler_deleting: bool,
}

impl NodeView {
    pub fn unhealthy(&self) -> bool {
        !self.signals.is_empty()
    }

    /// The earliest signal: what the grace period counts from.
    pub fn unhealthy_since(&self) -> Option<SystemTime> {
        self.signals.iter().map(|s| s.since).min()
    }

    /// Reasons joined for taints, annotations and Events, e.g. `NotReady-LeaseStale`
    /// (a valid taint value: condition types never hold a dash).
    pub fn reason(&self) -> String {
        let reasons: Vec<&str> = self.signals.iter().map(|s| s.reason.as_str()).collect();
        reasons.join("-")
    }
}

/// What makes a node unhealthy.
#[derive(Debug, Clone, PartialEq)]
pub struct Signals {
    /// Node condition types that mean trouble when `True` (node-problem-detector's).
    pub conditions: Vec<String>,
    /// A Lease not renewed for this long means the kubelet has stopped.
    pub lease_stale_after: Duration,
}

fn time(
    t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    or: SystemTime,
) -> SystemTime {
    t.map_or(or, |t| SystemTime::from(t.0))
}

/// When the node's Lease was last renewed, if it has one.
fn renewed(lease: Option<&Lease>) -> Option<SystemTime> {
    lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.renew_time.as_ref())
        .map(|t| SystemTime::from(t.0))
}

/// The signals of a node at `now`. A node without a Lease (no kubelet heartbeat object) is
/// judged by its conditions only.
pub fn signals(node: &Node, lease: Option<&Lease>, cfg: &Signals, now: SystemTime) -> Vec<Signal> {
    let mut out = Vec::new();
    let conditions = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default();
    for c in conditions {
        let since = time(c.last_transition_time.as_ref(), now);
        let reason = if c.type_ == "Ready" {
            match c.status.as_str() {
                "True" => continue,
                "False" => "NotReady",
                _ => "ReadyUnknown",
            }
        } else if c.status == "True" && cfg.conditions.contains(&c.type_) {
            c.type_.as_str()
        } else {
            continue;
        };
        out.push(Signal {
            reason: reason.to_owned(),
            since,
        });
    }
    if let Some(renewed) = renewed(lease) {
        let stale_at = renewed + cfg.lease_stale_after;
        if now >= stale_at {
            out.push(Signal {
                reason: "LeaseStale".to_owned(),
                since: stale_at,
            });
        }
    }
    out
}

/// The view of a node: its signals and what bulwark has already done to it.
pub fn view(node: &Node, lease: Option<&Lease>, cfg: &Signals, now: SystemTime) -> NodeView {
    let meta = &node.metadata;
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default();
    let ours = taints.iter().find(|t| t.key == UNHEALTHY_TAINT);
    let annotations = meta.annotations.as_ref();
    let labels = meta.labels.as_ref();
    NodeView {
        name: meta.name.clone().unwrap_or_default(),
        zone: labels
            .and_then(|l| l.get("topology.kubernetes.io/zone"))
            .cloned(),
        provider_id: node.spec.as_ref().and_then(|s| s.provider_id.clone()),
        signals: signals(node, lease, cfg, now),
        heartbeat_late: renewed(lease).is_some_and(|r| {
            let age = now.duration_since(r).unwrap_or_default();
            age > cfg.lease_stale_after / 2 && age < cfg.lease_stale_after
        }),
        // A taint without a time (added by hand) counts from now: the full remove-after wait.
        tainted_since: ours.map(|t| time(t.time_added.as_ref(), now)),
        marked: annotations.is_some_and(|a| a.contains_key(MARKED_ANNOTATION))
            || taints.iter().any(|t| t.key == REMOVAL_TAINT),
        marked_at: taints
            .iter()
            .find(|t| t.key == REMOVAL_TAINT)
            .and_then(|t| t.time_added.as_ref())
            .map(|t| SystemTime::from(t.0)),
        opted_out: annotations
            .and_then(|a| a.get(OPT_OUT_ANNOTATION))
            .is_some_and(|v| v.eq_ignore_ascii_case("off")),
        autoscaler_deleting: taints.iter().any(|t| t.key == AUTOSCALER_TAINT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    fn rfc3339(t: SystemTime) -> String {
        let ts = k8s_openapi::jiff::Timestamp::try_from(t).unwrap_or_default();
        ts.to_string()
    }

    fn node(conditions: serde_json::Value, extra: serde_json::Value) -> Node {
        let mut n = serde_json::json!({
            "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "a"}},
            "spec": {"providerID": "aws:///i-1"},
            "status": {"conditions": conditions},
        });
        if let (Some(base), serde_json::Value::Object(e)) = (n.as_object_mut(), extra) {
            for (k, v) in e {
                base.insert(k, v);
            }
        }
        serde_json::from_value(n).unwrap()
    }

    fn cfg() -> Signals {
        Signals {
            conditions: vec!["KernelDeadlock".into(), "ReadonlyFilesystem".into()],
            lease_stale_after: Duration::from_secs(40),
        }
    }

    fn lease(renewed: SystemTime) -> Lease {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "namespace": "kube-node-lease"},
            "spec": {"renewTime": k8s_openapi::jiff::Timestamp::try_from(renewed)
                .map(|t| t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
                .unwrap_or_default()},
        }))
        .unwrap()
    }

    #[test]
    fn a_lease_older_than_half_the_stale_limit_is_late() {
        let n = node(
            serde_json::json!([{"type": "Ready", "status": "True"}]),
            serde_json::json!({}),
        );
        // leaseStaleAfter 40s: 20s is on time, 21s late, 40s stale (and no longer "late").
        for (age, late, stale) in [
            (5, false, false),
            (20, false, false),
            (21, true, false),
            (40, false, true),
        ] {
            let v = view(&n, Some(&lease(at(100))), &cfg(), at(100 + age));
            assert_eq!(v.heartbeat_late, late, "{age}s");
            assert_eq!(v.unhealthy(), stale, "{age}s");
        }
        assert!(
            !view(&n, None, &cfg(), at(1000)).heartbeat_late,
            "no lease: conditions only"
        );
    }

    #[test]
    fn conditions_become_signals_from_their_transition_time() {
        let n = node(
            serde_json::json!([
                {"type": "Ready", "status": "False", "lastTransitionTime": rfc3339(at(10))},
                {"type": "KernelDeadlock", "status": "True", "lastTransitionTime": rfc3339(at(5))},
                {"type": "ReadonlyFilesystem", "status": "False", "lastTransitionTime": rfc3339(at(1))},
                {"type": "MemoryPressure", "status": "True", "lastTransitionTime": rfc3339(at(1))},
            ]),
            serde_json::json!({}),
        );
        let v = view(&n, None, &cfg(), at(100));
        assert_eq!(v.reason(), "NotReady-KernelDeadlock");
        assert_eq!(v.unhealthy_since(), Some(at(5)));
        assert_eq!(v.zone.as_deref(), Some("a"));
        assert_eq!(v.provider_id.as_deref(), Some("aws:///i-1"));

        let unknown = node(
            serde_json::json!([{"type": "Ready", "status": "Unknown"}]),
            serde_json::json!({}),
        );
        let v = view(&unknown, None, &cfg(), at(7));
        assert_eq!(
            v.signals,
            vec![Signal {
                reason: "ReadyUnknown".into(),
                since: at(7)
            }]
        );
    }

    #[test]
    fn a_lease_goes_stale_after_the_configured_time() {
        let ready = node(
            serde_json::json!([{"type": "Ready", "status": "True"}]),
            serde_json::json!({}),
        );
        let lease: Lease = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1"},
            "spec": {"renewTime": "2027-01-15T08:00:00.000000Z"},
        }))
        .unwrap();
        let renewed = SystemTime::from(
            "2027-01-15T08:00:00Z"
                .parse::<k8s_openapi::jiff::Timestamp>()
                .unwrap(),
        );
        let fresh = view(
            &ready,
            Some(&lease),
            &cfg(),
            renewed + Duration::from_secs(39),
        );
        assert!(!fresh.unhealthy());
        let stale = view(
            &ready,
            Some(&lease),
            &cfg(),
            renewed + Duration::from_secs(45),
        );
        assert_eq!(
            stale.signals,
            vec![Signal {
                reason: "LeaseStale".into(),
                since: renewed + Duration::from_secs(40)
            }]
        );
    }

    #[test]
    fn taints_marks_and_opt_out_are_read_back() {
        let n = node(
            serde_json::json!([{"type": "Ready", "status": "True"}]),
            serde_json::json!({
                "metadata": {"name": "n1", "annotations": {OPT_OUT_ANNOTATION: "Off", MARKED_ANNOTATION: "x"}},
                "spec": {"taints": [
                    {"key": UNHEALTHY_TAINT, "value": "NotReady", "effect": "NoSchedule", "timeAdded": rfc3339(at(3))},
                    {"key": REMOVAL_TAINT, "value": "NotReady", "effect": "NoSchedule", "timeAdded": rfc3339(at(8))},
                    {"key": AUTOSCALER_TAINT, "value": "1", "effect": "NoSchedule"},
                ]},
            }),
        );
        let v = view(&n, None, &cfg(), at(10));
        assert_eq!(v.tainted_since, Some(at(3)));
        assert_eq!(v.marked_at, Some(at(8)), "from the removal taint");
        assert!(v.marked && v.opted_out && v.autoscaler_deleting);
        assert!(!v.unhealthy());

        // The annotation alone is the node's to write: it marks, but dates nothing.
        let forged = node(
            serde_json::json!([{"type": "Ready", "status": "True"}]),
            serde_json::json!({
                "metadata": {"name": "n1", "annotations": {MARKED_ANNOTATION: format!("{} NotReady", rfc3339(at(9)))}},
            }),
        );
        let v = view(&forged, None, &cfg(), at(10));
        assert!(v.marked);
        assert_eq!(v.marked_at, None);
    }
}
