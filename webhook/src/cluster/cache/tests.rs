//! The cache's counters through pod lifecycles, relists, namespaces and drain rates.

use super::*;

fn entry(state: PodState, workflow: Option<&str>) -> PodEntry {
    PodEntry {
        state,
        pending_exempt: false,
        workflow: workflow.map(Arc::from),
    }
}

fn cache() -> Cache {
    Cache::new(Policy::default(), vec!["bulwark.io/workflow".into()])
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
    e.pending_exempt = true;
    c.apply_pod("ns", "ds-1", e, t);
    let n = c.pod_counts("ns", None, t);
    assert_eq!((n.live, n.pending), (1, 0));
    assert_eq!(c.cluster_pending(), 0);
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
