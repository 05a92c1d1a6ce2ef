//! The few facts about a pod that quota decisions use, read once from the object, and the
//! cluster-wide rules that say which pods bulwark decides at all.

use k8s_openapi::api::core::v1::Pod;

/// Which namespaces bulwark leaves alone and which labels name a workflow (`--config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRules {
    pub exempt_namespaces: Vec<String>,
    /// The first of these labels a pod carries names its workflow.
    pub workflow_labels: Vec<String>,
}

impl Default for PodRules {
    fn default() -> Self {
        PodRules {
            exempt_namespaces: vec!["kube-system".into(), "bulwark-system".into()],
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

    /// Exempts `namespace` too (the webhook's own, so bulwark can never block its own pods).
    pub fn exempt(&mut self, namespace: &str) {
        if !namespace.is_empty() && !self.is_exempt_namespace(namespace) {
            self.exempt_namespaces.push(namespace.to_owned());
        }
    }

    pub fn facts(&self, pod: &Pod) -> PodFacts {
        PodFacts::of(pod, &self.workflow_labels)
    }
}

const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";
const CRITICAL_PRIORITY_CLASSES: [&str; 2] = ["system-node-critical", "system-cluster-critical"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    /// Mirror pods and system-critical pods are never refused: refusing them would stop the
    /// components that keep the cluster running.
    pub exempt: Option<&'static str>,
    /// DaemonSet and mirror pods are tied to a node, so holding them back as "pending" would
    /// only stop that node's agents.
    pub pending_exempt: bool,
    /// `label=value` of the first workflow label the pod carries.
    pub workflow: Option<String>,
}

impl PodFacts {
    pub fn of(pod: &Pod, workflow_labels: &[String]) -> PodFacts {
        let meta = &pod.metadata;
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
        let workflow = meta.labels.as_ref().and_then(|labels| {
            workflow_labels.iter().find_map(|key| {
                labels
                    .get(key)
                    .filter(|v| !v.is_empty())
                    .map(|v| format!("{key}={v}"))
            })
        });
        let exempt = if mirror {
            Some("mirror pod")
        } else if critical {
            Some("system-critical priority")
        } else {
            None
        };
        PodFacts {
            exempt,
            pending_exempt: mirror || daemonset,
            workflow,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).expect("test pod")
    }

    #[test]
    fn facts() {
        let labels = vec![
            "workflows.argoproj.io/workflow".to_string(),
            "bulwark.io/workflow".to_string(),
        ];
        let plain = PodFacts::of(&pod(json!({"metadata": {"name": "p"}})), &labels);
        assert_eq!(
            plain,
            PodFacts {
                exempt: None,
                pending_exempt: false,
                workflow: None
            }
        );

        let wf = PodFacts::of(
            &pod(json!({"metadata": {"labels": {"bulwark.io/workflow": "build-7"}}})),
            &labels,
        );
        assert_eq!(wf.workflow.as_deref(), Some("bulwark.io/workflow=build-7"));

        let ds = PodFacts::of(
            &pod(json!({"metadata": {"ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "x", "uid": "1", "controller": true}
            ]}})),
            &labels,
        );
        assert!(ds.pending_exempt && ds.exempt.is_none());

        let mirror = PodFacts::of(
            &pod(json!({"metadata": {"annotations": {"kubernetes.io/config.mirror": "abc"}}})),
            &labels,
        );
        assert!(mirror.pending_exempt && mirror.exempt.is_some());

        let critical = PodFacts::of(
            &pod(json!({"spec": {"containers": [], "priorityClassName": "system-node-critical"}})),
            &labels,
        );
        assert_eq!(critical.exempt, Some("system-critical priority"));
    }
}
