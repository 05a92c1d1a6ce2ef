//! The few facts about a pod that quota decisions use, read once from the object.

use k8s_openapi::api::core::v1::Pod;

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
