//! Hold mode's mutating answer (`POST /hold`): every pod of a holding namespace that the
//! pending caps apply to goes behind bulwark's scheduling gate, and the releaser lets it go
//! in the line's order while the caps have room. One that is over a cap when it arrives is
//! also told so, in an annotation and a warning; one under them waits only for the
//! releaser's next pass. Gating every such pod, not only those over a cap, is what keeps the
//! count exact: admissions racing for the last slot (a Job controller's batch) cannot all
//! pass ungated, since only the releaser, on one replica, turns held pods into pending ones.

use json_patch::{AddOperation, Patch, PatchOperation, jsonptr::PointerBuf};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Map, Value, json};

use crate::{
    policy::{
        Policy,
        pod::{HELD_ANNOTATION, HOLD_GATE},
    },
    quota::{
        decide::{ClusterCap, Share, pending_share},
        view::PodCounts,
    },
};

/// Which cap a pod is over when it arrives, in the words of its annotation; `None` when the
/// caps have room and the pod waits only for the releaser's next pass.
pub fn over_cap(
    policy: &Policy,
    counts: &PodCounts,
    new_workflow: bool,
    workflow_reserved_percent: u8,
    cluster: (u64, Option<ClusterCap>),
) -> Option<String> {
    let waiting = |pending: u64, held: u64| format!("{pending} pending, {held} held when admitted");
    if let Some(limit) = policy.max_pending_pods {
        let Share { usable, reserved } =
            pending_share(limit, workflow_reserved_percent, new_workflow);
        let queued = counts.pending.saturating_add(counts.held);
        if queued >= usable {
            let what = if queued < limit {
                format!(
                    "max-pending-pods {limit}, the last {reserved} kept for workflows already \
                     running"
                )
            } else {
                format!("max-pending-pods {limit}")
            };
            return Some(format!(
                "{what} ({})",
                waiting(counts.pending.into(), counts.held.into())
            ));
        }
    }
    let (cluster_waiting, cap) = cluster;
    cap.filter(|c| cluster_waiting >= c.limit).map(|c| {
        format!(
            "cluster pending cap {} ({} pods pending or held cluster-wide when admitted)",
            c.limit, cluster_waiting
        )
    })
}

fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(tokens.iter().copied()),
        value,
    })
}

/// Adds bulwark's gate after any the pod has (others' gates stay where they are), and the
/// annotation naming the cap when it is over one.
pub fn patch(pod: &Pod, over: Option<&str>) -> Patch {
    let gate = json!({ "name": HOLD_GATE });
    let has_gates = pod
        .spec
        .as_ref()
        .is_some_and(|s| s.scheduling_gates.is_some());
    let mut ops = vec![if has_gates {
        add(&["spec", "schedulingGates", "-"], gate)
    } else {
        add(&["spec", "schedulingGates"], Value::Array(vec![gate]))
    }];
    if let Some(over) = over {
        let value = Value::String(over.to_owned());
        ops.push(if pod.metadata.annotations.is_some() {
            add(&["metadata", "annotations", HELD_ANNOTATION], value)
        } else {
            add(
                &["metadata", "annotations"],
                Value::Object(Map::from_iter([(HELD_ANNOTATION.to_owned(), value)])),
            )
        });
    }
    Patch(ops)
}

/// What the creator reads (kubectl prints it): why the pod does not get scheduled yet.
pub fn warning(namespace: &str, over: &str) -> String {
    format!(
        "bulwark: namespace {namespace:?} is at {over}: the pod is created but held behind \
         scheduling gate {HOLD_GATE} (kubectl get pods shows SchedulingGated) and released in \
         order when there is room"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::decide::CapBasis;

    fn policy(max_pending: Option<u32>) -> Policy {
        Policy {
            max_pending_pods: max_pending,
            ..Policy::default()
        }
    }

    fn counts(pending: u32, held: u32) -> PodCounts {
        PodCounts {
            pending,
            held,
            ..PodCounts::default()
        }
    }

    #[test]
    fn the_cap_a_pod_is_over_counts_what_is_held_too() {
        let p = policy(Some(10));
        assert_eq!(over_cap(&p, &counts(9, 0), false, 20, (0, None)), None);
        assert_eq!(
            over_cap(&p, &counts(7, 3), false, 20, (0, None)).as_deref(),
            Some("max-pending-pods 10 (7 pending, 3 held when admitted)")
        );
        // A new workflow is over once the share kept for started ones is reached.
        assert_eq!(
            over_cap(&p, &counts(8, 0), true, 20, (0, None)).as_deref(),
            Some(
                "max-pending-pods 10, the last 2 kept for workflows already running \
                 (8 pending, 0 held when admitted)"
            )
        );
        let cap = ClusterCap {
            limit: 100,
            basis: CapBasis::Absolute,
        };
        assert_eq!(
            over_cap(&policy(None), &counts(0, 0), false, 20, (100, Some(cap))).as_deref(),
            Some("cluster pending cap 100 (100 pods pending or held cluster-wide when admitted)")
        );
        assert_eq!(
            over_cap(&policy(None), &counts(0, 0), false, 20, (99, Some(cap))),
            None
        );
    }

    fn apply(pod: serde_json::Value, over: Option<&str>) -> serde_json::Value {
        let typed: Pod = serde_json::from_value(pod.clone()).unwrap();
        let mut doc = pod;
        json_patch::patch(&mut doc, &patch(&typed, over).0).unwrap();
        doc
    }

    #[test]
    fn the_gate_goes_after_others_and_the_annotation_beside_others() {
        let bare = json!({"metadata": {"name": "p"}, "spec": {"containers": []}});
        let out = apply(bare, None);
        assert_eq!(out["spec"]["schedulingGates"], json!([{"name": HOLD_GATE}]));
        assert!(out["metadata"].get("annotations").is_none());

        let gated = json!({
            "metadata": {"name": "p", "annotations": {"a": "b"}},
            "spec": {"containers": [], "schedulingGates": [{"name": "example.com/x"}]}
        });
        let out = apply(
            gated,
            Some("max-pending-pods 1 (1 pending, 0 held when admitted)"),
        );
        assert_eq!(
            out["spec"]["schedulingGates"],
            json!([{"name": "example.com/x"}, {"name": HOLD_GATE}])
        );
        assert_eq!(out["metadata"]["annotations"]["a"], "b");
        assert_eq!(
            out["metadata"]["annotations"][HELD_ANNOTATION],
            "max-pending-pods 1 (1 pending, 0 held when admitted)"
        );
        let fresh = apply(
            json!({"metadata": {"name": "p"}, "spec": {"containers": []}}),
            Some("x"),
        );
        assert_eq!(fresh["metadata"]["annotations"][HELD_ANNOTATION], "x");
    }
}
