//! The few facts about a pod that quota decisions use, read once from the object, and the
//! cluster-wide rules that say which pods bulwark decides at all.
//!
//! The fields that exempt a pod from quotas (a system-critical priority class, a DaemonSet
//! owner, the mirror-pod annotation) are written by whoever creates the pod: any tenant may
//! name `system-cluster-critical` (allowed in every namespace since Kubernetes 1.17) or forge
//! an owner reference. So they count only in `systemNamespaces`, where only the cluster's own
//! components create pods; elsewhere such a pod is held to every limit like any other.

use k8s_openapi::api::core::v1::Pod;

/// Kubernetes' own bounds on the names bulwark keeps: a namespace is a DNS label, a pod name
/// a DNS subdomain, a label value at most 63 characters
/// (`k8s.io/apimachinery/pkg/util/validation`). A longer one cannot belong to a real object.
pub const MAX_NAMESPACE_LEN: usize = 63;
pub const MAX_POD_NAME_LEN: usize = 253;
pub const MAX_LABEL_VALUE_LEN: usize = 63;

/// Which namespaces bulwark leaves alone, which may exempt their pods, and which labels name
/// a workflow (`--config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRules {
    pub exempt_namespaces: Vec<String>,
    /// Where system-critical priority, DaemonSet ownership and mirror pods exempt a pod.
    pub system_namespaces: Vec<String>,
    /// The first of these labels a pod carries names its workflow.
    pub workflow_labels: Vec<String>,
}

impl Default for PodRules {
    fn default() -> Self {
        PodRules {
            exempt_namespaces: vec!["kube-system".into(), "bulwark-system".into()],
            system_namespaces: vec!["kube-system".into()],
            workflow_labels: vec![
                "workflows.argoproj.io/workflow".into(),
                "bulwark.io/workflow".into(),
            ],
        }
    }
}

impl PodRules {
    pub fn is_exempt_namespace(&self, namespace: &str) -> bool {
        self.exempt_namespaces.iter().any(|n| n == namespace)
    }

    pub fn is_system_namespace(&self, namespace: &str) -> bool {
        self.system_namespaces.iter().any(|n| n == namespace)
    }

    /// The webhook's own namespace: exempt (bulwark can never block its own pods) and a
    /// system namespace.
    pub fn own_namespace(&mut self, namespace: &str) {
        if namespace.is_empty() {
            return;
        }
        for list in [&mut self.exempt_namespaces, &mut self.system_namespaces] {
            if !list.iter().any(|n| n == namespace) {
                list.push(namespace.to_owned());
            }
        }
    }

    /// The facts of `pod`, created in `namespace`.
    pub fn facts(&self, pod: &Pod, namespace: &str) -> PodFacts {
        PodFacts::of(
            pod,
            self.is_system_namespace(namespace),
            &self.workflow_labels,
        )
    }

    /// Which of the names bulwark would keep for this pod is longer than Kubernetes allows,
    /// if any: such a pod cannot exist (kube-apiserver validates the object before the
    /// validating webhooks see it), so a review of it is a forgery and nothing of it is kept.
    pub fn oversized_name(&self, pod: &Pod, namespace: &str, name: &str) -> Option<&'static str> {
        if namespace.len() > MAX_NAMESPACE_LEN {
            return Some("namespace");
        }
        if name.len() > MAX_POD_NAME_LEN {
            return Some("pod name");
        }
        let labels = pod.metadata.labels.as_ref()?;
        self.workflow_labels
            .iter()
            .filter_map(|key| labels.get(key))
            .any(|v| v.len() > MAX_LABEL_VALUE_LEN)
            .then_some("workflow label value")
    }
}

/// bulwark's scheduling gate: a pod that carries it waits in bulwark's line, where
/// kube-scheduler never looks, until the releaser removes it (hold mode).
pub const HOLD_GATE: &str = "bulwark.io/pending-cap";
/// On a pod held over a cap: which cap, and the count when it was admitted.
pub const HELD_ANNOTATION: &str = "bulwark.io/held";

/// Where bulwark's gate is in a pod's `spec.schedulingGates`, if the pod carries it.
pub fn hold_gate(pod: &Pod) -> Option<usize> {
    pod.spec
        .as_ref()?
        .scheduling_gates
        .as_ref()?
        .iter()
        .position(|g| g.name == HOLD_GATE)
}

/// Whether a gate would keep the pod from the scheduler: one created with `spec.nodeName`
/// set is bound already, and kube-apiserver refuses scheduling gates on it.
pub fn can_be_gated(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .is_none_or(|s| s.node_name.as_deref().is_none_or(str::is_empty))
}

const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";
const CRITICAL_PRIORITY_CLASSES: [&str; 2] = ["system-node-critical", "system-cluster-critical"];

/// The caps a pod is held to, and so the counts it adds to: a pod never counts toward a cap
/// it is not held to, or system pods would use up what tenants are held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Every limit: rate, max-pods, max-pending-pods, the cluster pending cap.
    All,
    /// Tied to a node (a DaemonSet pod): rate and max-pods, not the pending caps.
    NotPending,
    /// Never refused, counted nowhere (mirror and system-critical pods).
    Nothing,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    /// Why the pod is held to fewer limits than others, if it is.
    pub exemption: Option<&'static str>,
    pub held: Held,
    /// `label=value` of the first workflow label the pod carries.
    pub workflow: Option<String>,
}

impl PodFacts {
    /// `system`: whether the pod's namespace is a system namespace, the only place where the
    /// pod's own fields may exempt it.
    pub fn of(pod: &Pod, system: bool, workflow_labels: &[String]) -> PodFacts {
        let meta = &pod.metadata;
        let workflow = meta.labels.as_ref().and_then(|labels| {
            workflow_labels.iter().find_map(|key| {
                labels
                    .get(key)
                    .filter(|v| !v.is_empty())
                    .map(|v| format!("{key}={v}"))
            })
        });
        let held_by_all = PodFacts {
            exemption: None,
            held: Held::All,
            workflow,
        };
        if !system {
            return held_by_all;
        }
        let mirror = meta
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION));
        let critical = pod
            .spec
            .as_ref()
            .and_then(|s| s.priority_class_name.as_deref())
            .is_some_and(|p| CRITICAL_PRIORITY_CLASSES.contains(&p));
        let daemonset = meta
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.kind == "DaemonSet" && o.controller == Some(true));
        let (exemption, held) = if mirror {
            (Some("mirror pod"), Held::Nothing)
        } else if critical {
            (Some("system-critical priority"), Held::Nothing)
        } else if daemonset {
            (Some("DaemonSet pod"), Held::NotPending)
        } else {
            return held_by_all;
        };
        PodFacts {
            exemption,
            held,
            ..held_by_all
        }
    }

    /// Never refused: not held to any limit.
    pub fn exempt(&self) -> Option<&'static str> {
        (self.held == Held::Nothing)
            .then_some(self.exemption)
            .flatten()
    }

    pub fn pending_exempt(&self) -> bool {
        self.held != Held::All
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).expect("test pod")
    }

    fn labels() -> Vec<String> {
        PodRules::default().workflow_labels
    }

    #[test]
    fn facts() {
        let labels = labels();
        let plain = PodFacts::of(&pod(json!({"metadata": {"name": "p"}})), true, &labels);
        assert_eq!(
            plain,
            PodFacts {
                exemption: None,
                held: Held::All,
                workflow: None
            }
        );

        let wf = PodFacts::of(
            &pod(json!({"metadata": {"labels": {"bulwark.io/workflow": "build-7"}}})),
            false,
            &labels,
        );
        assert_eq!(wf.workflow.as_deref(), Some("bulwark.io/workflow=build-7"));
    }

    fn daemonset() -> Pod {
        pod(json!({"metadata": {"ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "x", "uid": "1", "controller": true}
        ]}}))
    }

    fn mirror() -> Pod {
        pod(json!({"metadata": {"annotations": {"kubernetes.io/config.mirror": "abc"}}}))
    }

    fn critical(class: &str) -> Pod {
        pod(json!({"spec": {"containers": [], "priorityClassName": class}}))
    }

    #[test]
    fn exemptions_hold_only_in_system_namespaces() {
        let rules = PodRules::default();
        let ds = rules.facts(&daemonset(), "kube-system");
        assert!(ds.pending_exempt() && ds.exempt().is_none());
        assert_eq!(ds.held, Held::NotPending);

        let m = rules.facts(&mirror(), "kube-system");
        assert_eq!((m.held, m.exempt()), (Held::Nothing, Some("mirror pod")));

        for class in CRITICAL_PRIORITY_CLASSES {
            let c = rules.facts(&critical(class), "kube-system");
            assert_eq!(c.exempt(), Some("system-critical priority"));
        }

        // The same fields in a tenant's namespace exempt nothing.
        for p in [daemonset(), mirror(), critical("system-cluster-critical")] {
            let f = rules.facts(&p, "tenant");
            assert_eq!(
                (f.held, f.exempt(), f.pending_exempt()),
                (Held::All, None, false)
            );
        }
    }

    #[test]
    fn the_gate_is_found_among_others_and_a_bound_pod_cannot_carry_one() {
        let gated = pod(json!({"spec": {"containers": [], "schedulingGates": [
            {"name": "example.com/quota"}, {"name": HOLD_GATE}
        ]}}));
        assert_eq!(hold_gate(&gated), Some(1));
        let other = pod(json!({"spec": {"containers": [], "schedulingGates": [
            {"name": "example.com/quota"}
        ]}}));
        assert_eq!(hold_gate(&other), None);
        assert_eq!(hold_gate(&pod(json!({"metadata": {"name": "p"}}))), None);
        assert!(can_be_gated(&other) && can_be_gated(&pod(json!({}))));
        let bound = pod(json!({"spec": {"containers": [], "nodeName": "n1"}}));
        assert!(!can_be_gated(&bound));
    }

    #[test]
    fn the_own_namespace_is_exempt_and_a_system_namespace() {
        let mut rules = PodRules::default();
        rules.own_namespace("bulwark");
        rules.own_namespace("bulwark");
        rules.own_namespace("");
        assert!(rules.is_exempt_namespace("bulwark") && rules.is_system_namespace("bulwark"));
        assert_eq!(rules.system_namespaces, ["kube-system", "bulwark"]);
        assert_eq!(rules.facts(&daemonset(), "bulwark").held, Held::NotPending);
    }

    #[test]
    fn names_longer_than_kubernetes_allows_are_found() {
        let rules = PodRules::default();
        let p = pod(json!({"metadata": {"labels": {"bulwark.io/workflow": "w".repeat(63)}}}));
        assert_eq!(
            rules.oversized_name(&p, &"n".repeat(63), &"p".repeat(253)),
            None
        );
        assert_eq!(
            rules.oversized_name(&p, &"n".repeat(64), "p"),
            Some("namespace")
        );
        assert_eq!(
            rules.oversized_name(&p, "ns", &"p".repeat(254)),
            Some("pod name")
        );
        let long = pod(json!({"metadata": {"labels": {"bulwark.io/workflow": "w".repeat(64)}}}));
        assert_eq!(
            rules.oversized_name(&long, "ns", "p"),
            Some("workflow label value")
        );
        // A label bulwark does not read is not its business.
        let other = pod(json!({"metadata": {"labels": {"x": "w".repeat(64)}}}));
        assert_eq!(rules.oversized_name(&other, "ns", "p"), None);
    }
}
