//! Hold mode's line: which pods waiting behind bulwark's scheduling gate go next. Pure: the
//! cache gives each namespace's held pods and counts, the releaser carries the answer out.
//!
//! The order is the contract's (docs/architecture.md, "Hold instead of refuse"): within a
//! namespace, pods of workflows that already have pods past the gate first, then the oldest;
//! under the cluster cap, round robin across namespaces, so one namespace's line cannot take
//! all the room. A namespace no longer enforcing (mode `off` or `warn`) has its whole line
//! released; one switched to `refuse` drains under its caps, since the gate is the only thing
//! that kept those pods from counting as pending.

use std::{
    collections::{HashSet, VecDeque},
    sync::Arc,
};

use super::decide::{ClusterCap, pending_share};
use crate::policy::{Mode, PendingAction, Policy};

/// A pod behind bulwark's gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldPod {
    pub name: Arc<str>,
    /// Unix seconds.
    pub created: i64,
    /// Index of bulwark's gate in the pod's `schedulingGates`.
    pub gate: u16,
    pub workflow: Option<Arc<str>>,
}

/// One namespace's line and what counts against its caps.
#[derive(Debug, Clone)]
pub struct Line {
    pub namespace: Arc<str>,
    pub policy: Policy,
    /// Pods past the gate and not yet running, held to max-pending-pods.
    pub pending: u32,
    /// Workflows with pods past the gate (pending or running).
    pub started: HashSet<Arc<str>>,
    pub held: Vec<HeldPod>,
}

/// Whether a namespace holds pods over its pending caps rather than refusing them.
pub fn holds(policy: &Policy) -> bool {
    policy.mode == Mode::Enforce && policy.pending_action == PendingAction::Hold
}

/// The cluster-wide room the releaser works in.
#[derive(Debug, Clone, Copy, Default)]
pub struct Room {
    /// Pods past the gate and not yet running, cluster-wide (those released but not yet seen
    /// by the watch included).
    pub cluster_pending: u64,
    pub cluster_cap: Option<ClusterCap>,
    pub workflow_reserved_percent: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The caps have room for it.
    Room,
    /// Its namespace no longer enforces limits (`off` or `warn`).
    NotEnforced,
    /// An operator asked for every held pod to go (`bulwark release --all`).
    Told,
}

impl Why {
    pub fn label(self) -> &'static str {
        match self {
            Why::Room => "room",
            Why::NotEnforced => "not_enforced",
            Why::Told => "told",
        }
    }
}

/// One pod to let go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub gate: u16,
    pub created: i64,
    pub why: Why,
}

/// Takes the pods already released but not yet shown ungated by the watch out of the lines
/// and counts them as pending, so the next plan does not hand out their room again. Returns
/// how many there were, for the cluster count; `in_flight` keeps only those still found.
pub fn settle(lines: &mut [Line], in_flight: &mut HashSet<(Arc<str>, Arc<str>)>) -> u64 {
    let mut still = HashSet::new();
    for line in lines.iter_mut() {
        let namespace = line.namespace.clone();
        line.held.retain(|p| {
            let key = (namespace.clone(), p.name.clone());
            if in_flight.contains(&key) {
                still.insert(key);
                false
            } else {
                true
            }
        });
    }
    let n = still.len();
    for (namespace, _) in &still {
        if let Some(line) = lines.iter_mut().find(|l| &l.namespace == namespace) {
            line.pending = line.pending.saturating_add(1);
        }
    }
    *in_flight = still;
    n as u64
}

/// The pods of one line its namespace's caps let go, in the line's order.
fn namespace_candidates(line: &Line, reserved_percent: u8) -> VecDeque<HeldPod> {
    let mut ordered: Vec<&HeldPod> = line.held.iter().collect();
    let started = |p: &HeldPod| {
        p.workflow
            .as_ref()
            .is_some_and(|w| line.started.contains(w))
    };
    ordered
        .sort_by(|a, b| (!started(a), a.created, &a.name).cmp(&(!started(b), b.created, &b.name)));
    let Some(limit) = line.policy.max_pending_pods else {
        return ordered.into_iter().cloned().collect();
    };
    let mut pending = line.pending;
    let mut started_now: HashSet<&Arc<str>> = HashSet::new();
    let mut out = VecDeque::new();
    for p in ordered {
        if pending >= limit {
            break;
        }
        let new_workflow = p
            .workflow
            .as_ref()
            .is_some_and(|w| !line.started.contains(w) && !started_now.contains(w));
        if pending >= pending_share(limit, reserved_percent, new_workflow).usable {
            // The share kept for started workflows: a later pod of one, or outside any, may fit.
            continue;
        }
        pending += 1;
        if let Some(w) = &p.workflow {
            started_now.insert(w);
        }
        out.push_back(p.clone());
    }
    out
}

/// Which held pods to release now, at most `max` of them. `turn` rotates which namespace the
/// round robin under the cluster cap starts with, so over passes each gets the first slot.
pub fn plan(lines: &[Line], room: Room, turn: usize, max: usize) -> Vec<Release> {
    let release = |line: &Line, p: &HeldPod, why| Release {
        namespace: line.namespace.clone(),
        name: p.name.clone(),
        gate: p.gate,
        created: p.created,
        why,
    };
    let mut out = Vec::new();
    let mut queues = Vec::new();
    let mut sorted: Vec<&Line> = lines.iter().collect();
    sorted.sort_by(|a, b| a.namespace.cmp(&b.namespace));
    for line in sorted {
        if line.policy.mode != Mode::Enforce {
            let mut all: Vec<&HeldPod> = line.held.iter().collect();
            all.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
            out.extend(all.into_iter().map(|p| release(line, p, Why::NotEnforced)));
        } else {
            let c = namespace_candidates(line, room.workflow_reserved_percent);
            if !c.is_empty() {
                queues.push((line, c));
            }
        }
    }
    let mut budget = room.cluster_cap.map_or(u64::MAX, |cap| {
        cap.limit.saturating_sub(room.cluster_pending)
    });
    if !queues.is_empty() {
        let first = turn % queues.len();
        queues.rotate_left(first);
    }
    while budget > 0 && out.len() < max {
        let mut any = false;
        for (line, queue) in &mut queues {
            if budget == 0 || out.len() >= max {
                break;
            }
            if let Some(p) = queue.pop_front() {
                out.push(release(line, &p, Why::Room));
                budget -= 1;
                any = true;
            }
        }
        if !any {
            break;
        }
    }
    out.truncate(max);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::decide::CapBasis;

    fn held(name: &str, created: i64, workflow: Option<&str>) -> HeldPod {
        HeldPod {
            name: name.into(),
            created,
            gate: 0,
            workflow: workflow.map(Arc::from),
        }
    }

    fn line(ns: &str, max_pending: Option<u32>, pending: u32, held: Vec<HeldPod>) -> Line {
        Line {
            namespace: ns.into(),
            policy: Policy {
                max_pending_pods: max_pending,
                pending_action: PendingAction::Hold,
                ..Policy::default()
            },
            pending,
            started: HashSet::new(),
            held,
        }
    }

    fn names(r: &[Release]) -> Vec<String> {
        r.iter()
            .map(|r| format!("{}/{}", r.namespace, r.name))
            .collect()
    }

    #[test]
    fn a_namespace_releases_its_oldest_up_to_its_cap() {
        let l = line(
            "ci",
            Some(3),
            1,
            vec![
                held("c", 30, None),
                held("a", 10, None),
                held("b", 20, None),
            ],
        );
        let r = plan(std::slice::from_ref(&l), Room::default(), 0, 100);
        assert_eq!(names(&r), ["ci/a", "ci/b"]);
        assert!(r.iter().all(|r| r.why == Why::Room));
        // Full: nothing; unlimited: everything, oldest first.
        let full = Line {
            pending: 3,
            ..l.clone()
        };
        assert!(plan(&[full], Room::default(), 0, 100).is_empty());
        let open = line("ci", None, 50, l.held.clone());
        assert_eq!(
            names(&plan(&[open], Room::default(), 0, 100)),
            ["ci/a", "ci/b", "ci/c"]
        );
    }

    #[test]
    fn started_workflows_go_first_and_new_ones_leave_the_reserved_share() {
        // max-pending 10, 20% reserved: a new workflow may use 8.
        let mut l = line(
            "ci",
            Some(10),
            6,
            vec![
                held("new-1", 1, Some("wf=new")),
                held("new-2", 2, Some("wf=new")),
                held("old-1", 5, Some("wf=old")),
                held("plain", 6, None),
            ],
        );
        l.started.insert("wf=old".into());
        let room = Room {
            workflow_reserved_percent: 20,
            ..Room::default()
        };
        // old-1 (started) first; new-1 starts wf=new at 7 < 8; new-2 is then of a started
        // workflow and takes 9; plain takes 10.
        assert_eq!(
            names(&plan(&[l.clone()], room, 0, 100)),
            ["ci/old-1", "ci/new-1", "ci/new-2", "ci/plain"]
        );
        // At 7 pending a new workflow has no room left (8 usable) once old-1 took one: the
        // pod outside any workflow still fits, the new workflow waits.
        let l7 = Line {
            pending: 7,
            ..l.clone()
        };
        assert_eq!(names(&plan(&[l7], room, 0, 100)), ["ci/old-1", "ci/plain"]);
    }

    #[test]
    fn the_cluster_cap_is_shared_round_robin() {
        let big = line(
            "a",
            None,
            0,
            (0..10).map(|i| held(&format!("a{i}"), i, None)).collect(),
        );
        let small = line(
            "b",
            None,
            0,
            vec![held("b0", 100, None), held("b1", 101, None)],
        );
        let room = Room {
            cluster_pending: 96,
            cluster_cap: Some(ClusterCap {
                limit: 100,
                basis: CapBasis::Absolute,
            }),
            workflow_reserved_percent: 20,
        };
        let lines = [big, small];
        assert_eq!(
            names(&plan(&lines, room, 0, 100)),
            ["a/a0", "b/b0", "a/a1", "b/b1"]
        );
        // The next pass starts with the other namespace.
        let tight = Room {
            cluster_pending: 99,
            ..room
        };
        assert_eq!(names(&plan(&lines, tight, 1, 100)), ["b/b0"]);
        assert_eq!(names(&plan(&lines, tight, 0, 100)), ["a/a0"]);
        // And `max` bounds a pass whatever the room.
        assert_eq!(plan(&lines, Room::default(), 0, 3).len(), 3);
    }

    #[test]
    fn a_namespace_that_stopped_enforcing_releases_everything_beyond_the_caps() {
        let mut off = line(
            "off",
            Some(1),
            5,
            vec![held("x", 2, None), held("y", 1, None)],
        );
        off.policy.mode = Mode::Off;
        let room = Room {
            cluster_pending: 1000,
            cluster_cap: Some(ClusterCap {
                limit: 10,
                basis: CapBasis::Absolute,
            }),
            workflow_reserved_percent: 20,
        };
        let r = plan(&[off.clone()], room, 0, 100);
        assert_eq!(names(&r), ["off/y", "off/x"]);
        assert!(r.iter().all(|r| r.why == Why::NotEnforced));
        // Switched to refuse: drained under its caps, not all at once.
        let mut refuse = line("r", Some(2), 1, off.held.clone());
        refuse.policy.pending_action = PendingAction::Refuse;
        assert_eq!(names(&plan(&[refuse], Room::default(), 0, 100)), ["r/y"]);
        assert!(!holds(&off.policy));
    }

    #[test]
    fn pods_in_flight_are_counted_pending_until_the_watch_shows_them() {
        let mut lines = vec![
            line(
                "a",
                Some(2),
                0,
                vec![held("a0", 1, None), held("a1", 2, None)],
            ),
            line("b", Some(2), 0, vec![held("b0", 1, None)]),
        ];
        let mut in_flight: HashSet<(Arc<str>, Arc<str>)> =
            [("a".into(), "a0".into()), ("b".into(), "gone".into())]
                .into_iter()
                .collect();
        assert_eq!(settle(&mut lines, &mut in_flight), 1);
        assert_eq!(in_flight.len(), 1, "the pod no longer held is forgotten");
        assert_eq!(lines[0].pending, 1);
        assert_eq!(lines[0].held.len(), 1);
        assert_eq!(
            names(&plan(&lines, Room::default(), 0, 100)),
            ["a/a1", "b/b0"]
        );
    }
}
