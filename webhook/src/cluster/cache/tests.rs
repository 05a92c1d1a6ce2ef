//! The cache's counters through pod lifecycles, relists, namespaces and drain rates.

use super::*;
use crate::policy::pod::Held;

fn entry(state: PodState, workflow: Option<&str>) -> PodEntry {
    PodEntry {
        state,
        held: Held::All,
        workflow: workflow.map(Arc::from),
    }
}

fn cache() -> Cache {
    Cache::new(Policy::default(), PodRules::default())
}

#[test]
fn counts_follow_pod_lifecycle() {
    let c = cache();
    let t = Instant::now();
    assert!(c.apply_pod("ci", "a", entry(PodState::Pending, Some("wf")), t));
    assert!(c.apply_pod("ci", "b", entry(PodState::Pending, None), t));
    let n = c.pod_counts("ci", Some("wf"), t);
    assert_eq!((n.live, n.pending, n.workflow_started), (2, 2, true));
    assert_eq!(c.cluster_pending(), 2);

    assert!(!c.apply_pod("ci", "a", entry(PodState::Running, Some("wf")), t));
    let n = c.pod_counts("ci", Some("wf"), t);
    assert_eq!((n.live, n.pending), (2, 1));
    assert!(
        n.pending_drain_rate > 0.0,
        "a pod started: drain is observed"
    );
    assert_eq!(c.cluster_pending(), 1);

    c.apply_pod("ci", "a", entry(PodState::Terminal, Some("wf")), t);
    let n = c.pod_counts("ci", Some("wf"), t);
    assert_eq!((n.live, n.pending, n.workflow_started), (1, 1, true));
    assert_eq!(c.live_pods(), 1);

    c.delete_pod("ci", "a", t);
    c.delete_pod("ci", "b", t);
    c.delete_pod("ci", "missing", t);
    let n = c.pod_counts("ci", Some("wf"), t);
    assert_eq!((n.live, n.pending, n.workflow_started), (0, 0, false));
    assert_eq!((c.cluster_pending(), c.live_pods()), (0, 0));
}

#[test]
fn daemonset_pods_do_not_count_as_pending() {
    let c = cache();
    let t = Instant::now();
    let mut e = entry(PodState::Pending, None);
    e.held = Held::NotPending;
    c.apply_pod("ns", "ds-1", e, t);
    let n = c.pod_counts("ns", None, t);
    assert_eq!((n.live, n.pending), (1, 0));
    assert_eq!(c.cluster_pending(), 0);
}

/// A watched pod is counted by what its namespace lets it be exempt from: a tenant's
/// "system-critical" or "DaemonSet" pod counts like any other; a system namespace's counts
/// toward no cap it is not held to.
#[test]
fn exempt_pods_count_only_toward_caps_they_are_held_to() {
    let c = cache();
    let t = Instant::now();
    let pod = |ns: &str, name: &str, extra: serde_json::Value| {
        let mut v = serde_json::json!({"metadata": {"namespace": ns, "name": name},
            "status": {"phase": "Pending"}});
        if let (Some(meta), Some(more)) = (v["metadata"].as_object_mut(), extra.get("metadata")) {
            meta.extend(more.as_object().cloned().unwrap_or_default());
        }
        if let Some(spec) = extra.get("spec") {
            v["spec"] = spec.clone();
        }
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(v).expect("pod");
        c.apply_pod(ns, name, PodEntry::from_pod(&pod, c.rules()), t);
    };
    let critical = serde_json::json!({"spec": {"containers": [],
        "priorityClassName": "system-cluster-critical"}});
    let mirror = serde_json::json!({"metadata": {"annotations":
        {"kubernetes.io/config.mirror": "x"}}});
    let daemonset = serde_json::json!({"metadata": {"ownerReferences": [{"apiVersion": "apps/v1",
        "kind": "DaemonSet", "name": "ds", "uid": "1", "controller": true}]}});
    for (i, extra) in [&critical, &mirror, &daemonset].into_iter().enumerate() {
        pod("tenant", &format!("p{i}"), extra.clone());
        pod("kube-system", &format!("p{i}"), extra.clone());
    }
    let tenant = c.pod_counts("tenant", None, t);
    assert_eq!((tenant.live, tenant.pending), (3, 3));
    // kube-system: only the DaemonSet pod is live, and none is pending.
    let system = c.pod_counts("kube-system", None, t);
    assert_eq!((system.live, system.pending), (1, 0));
    assert_eq!((c.cluster_pending(), c.live_pods()), (3, 4));
}

#[test]
fn relist_replaces_everything_and_names_new_pods() {
    let c = cache();
    let t = Instant::now();
    c.apply_pod("a", "old", entry(PodState::Pending, None), t);
    c.apply_pod("b", "gone", entry(PodState::Pending, None), t);
    let new = c.replace_pods(
        vec![
            ("a".into(), "old".into(), entry(PodState::Running, None)),
            ("a".into(), "new".into(), entry(PodState::Pending, None)),
        ],
        t,
    );
    assert_eq!(new, vec![("a".to_string(), "new".to_string())]);
    let n = c.pod_counts("a", None, t);
    assert_eq!((n.live, n.pending), (2, 1));
    assert_eq!(c.pod_counts("b", None, t).live, 0);
    assert_eq!(c.cluster_pending(), 1);
}

#[test]
fn namespace_problems_are_reported_once() {
    let c = cache();
    let t = Instant::now();
    let bad: BTreeMap<String, String> =
        [("bulwark.io/max-pods".to_string(), "many".to_string())].into();
    assert!(c.apply_namespace("ci", Some(&bad), t).is_some());
    assert!(c.apply_namespace("ci", Some(&bad), t).is_none(), "resync");
    assert!(c.apply_namespace("ci", None, t).is_none(), "fixed");
    assert_eq!(c.namespace("ci").map(|i| i.problems.len()), Some(0));
}

#[test]
fn drain_rate_decays() {
    let mut r = DecayingRate::new();
    let t = Instant::now();
    for _ in 0..10 {
        r.record(t);
    }
    let fresh = r.decayed(t);
    assert!((fresh - 1.0).abs() < 1e-9, "{fresh}");
    assert!(r.decayed(t + Duration::from_secs(30)) < fresh / 10.0);
}

#[test]
fn held_pods_count_as_live_not_pending_and_make_the_line() {
    use crate::policy::{PendingAction, pod::HOLD_GATE};
    use k8s_openapi::api::core::v1::Pod;
    let c = cache();
    let t = Instant::now();
    let mut ann = BTreeMap::new();
    ann.insert(crate::policy::PENDING_ACTION.to_owned(), "hold".to_owned());
    c.apply_namespace("ci", Some(&ann), t);
    let pod = |name: &str, created: &str, gates: &[&str], wf: &str| -> Pod {
        let gates: Vec<_> = gates
            .iter()
            .map(|g| serde_json::json!({ "name": g }))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ci", "creationTimestamp": created,
                         "labels": {"bulwark.io/workflow": wf}},
            "spec": {"containers": [], "schedulingGates": gates},
            "status": {"phase": "Pending"}
        }))
        .unwrap()
    };
    let rules = PodRules::default();
    let apply = |p: &Pod| {
        let name = p.metadata.name.clone().unwrap();
        c.apply_pod("ci", &name, PodEntry::from_pod(p, &rules), t);
    };
    apply(&pod(
        "h1",
        "2026-01-01T00:00:10Z",
        &["x/other", HOLD_GATE],
        "a",
    ));
    apply(&pod("h2", "2026-01-01T00:00:05Z", &[HOLD_GATE], "b"));
    apply(&pod("run", "2026-01-01T00:00:00Z", &[], "b"));
    // Someone else's gate only: pending as ever, not bulwark's to release.
    apply(&pod("other", "2026-01-01T00:00:00Z", &["x/other"], "c"));
    let n = c.pod_counts("ci", None, t);
    assert_eq!((n.live, n.pending), (4, 2));
    assert_eq!((c.cluster_pending(), c.cluster_held()), (2, 2));

    let lines = c.lines();
    assert_eq!(lines.len(), 1);
    let l = &lines[0];
    assert_eq!(l.policy.pending_action, PendingAction::Hold);
    assert_eq!(l.pending, 2);
    let mut held: Vec<_> = l
        .held
        .iter()
        .map(|p| (p.name.to_string(), p.gate, p.created))
        .collect();
    held.sort();
    assert_eq!(
        held,
        [
            ("h1".to_owned(), 1, 1_767_225_610),
            ("h2".to_owned(), 0, 1_767_225_605)
        ]
    );
    let mut started: Vec<&str> = l.started.iter().map(|w| &**w).collect();
    started.sort();
    assert_eq!(started, ["bulwark.io/workflow=b", "bulwark.io/workflow=c"]);

    // Released: the gate is gone, the pod counts as pending.
    apply(&pod("h2", "2026-01-01T00:00:05Z", &[], "b"));
    assert_eq!(c.pod_counts("ci", None, t).pending, 3);
    assert_eq!(c.cluster_held(), 1);
    c.delete_pod("ci", "h1", t);
    assert!(c.lines().is_empty(), "a deleted held pod leaves the line");
}
