//! The node health state machine and its safety rules, as one pure function of the nodes'
//! views, the time, and what the controller remembers:
//!
//! healthy -> suspect (unhealthy, within `grace`) -> tainted (`bulwark.io/unhealthy`) ->
//! marked for removal (still unhealthy `remove_after` after the taint) -> removed by the
//! configured action. A tainted or marked node that has been healthy for `recover_after`
//! is untainted and unmarked.
//!
//! Nothing new is tainted or marked while more nodes are unhealthy than `max_unhealthy`
//! allows, or while a whole zone looks down (a network or control-plane problem, not a node
//! problem), nor for `storm_cooldown` after such a hold ends. Removals are spaced by
//! `removal_interval`. Opted-out nodes and nodes cluster-autoscaler is deleting are left alone.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, SystemTime},
};

use super::health::NodeView;

/// How many nodes may be unhealthy before bulwark stops acting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxUnhealthy {
    /// A share of the nodes, rounded down, but never below one node, so that a small pool
    /// can still have one node repaired.
    Percent(u8),
    Count(u32),
}

impl MaxUnhealthy {
    pub fn limit(self, total: usize) -> usize {
        match self {
            MaxUnhealthy::Percent(p) => (total * usize::from(p.min(100)) / 100).max(1),
            MaxUnhealthy::Count(n) => usize::try_from(n).unwrap_or(usize::MAX),
        }
    }
}

impl std::fmt::Display for MaxUnhealthy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MaxUnhealthy::Percent(p) => write!(f, "{p}%"),
            MaxUnhealthy::Count(n) => write!(f, "{n}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    pub grace: Duration,
    pub remove_after: Duration,
    pub recover_after: Duration,
    pub max_unhealthy: MaxUnhealthy,
    pub storm_cooldown: Duration,
    pub removal_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Add `bulwark.io/unhealthy=<reason>:NoSchedule`.
    Taint { node: String, reason: String },
    /// Carry out the configured removal and record it on the node.
    Remove { node: String, reason: String },
    /// Remove bulwark's taints and mark: the node has recovered.
    Restore { node: String },
}

impl Action {
    pub fn node(&self) -> &str {
        match self {
            Action::Taint { node, .. } | Action::Remove { node, .. } | Action::Restore { node } => {
                node
            }
        }
    }

    /// A bounded label for metrics and the Event reason.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Taint { .. } => "taint",
            Action::Remove { .. } => "remove",
            Action::Restore { .. } => "restore",
        }
    }
}

/// Why nothing new is acted on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    TooManyUnhealthy {
        unhealthy: usize,
        total: usize,
        limit: MaxUnhealthy,
    },
    /// Unhealthy nodes and nodes whose heartbeats are late together are more than
    /// `max_unhealthy` allows: the API server, its clients or the network lag, and leases
    /// would go stale one node after another although the nodes are fine.
    LateHeartbeats {
        late: usize,
        unhealthy: usize,
        total: usize,
        limit: MaxUnhealthy,
    },
    ZoneDown {
        zone: String,
        nodes: usize,
    },
    /// A storm ended recently; waiting before acting again.
    Cooldown {
        remaining: Duration,
    },
}

impl Hold {
    /// A bounded label: the same hold keeps its kind while its numbers change.
    pub fn kind(&self) -> &'static str {
        match self {
            Hold::TooManyUnhealthy { .. } => "too_many_unhealthy",
            Hold::LateHeartbeats { .. } => "late_heartbeats",
            Hold::ZoneDown { .. } => "zone_down",
            Hold::Cooldown { .. } => "cooldown",
        }
    }
}

impl std::fmt::Display for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hold::TooManyUnhealthy {
                unhealthy,
                total,
                limit,
            } => write!(
                f,
                "{unhealthy} of {total} nodes are unhealthy, more than max-unhealthy {limit} \
                 allows: suspecting the network or the control plane, not the nodes"
            ),
            Hold::LateHeartbeats {
                late,
                unhealthy,
                total,
                limit,
            } => write!(
                f,
                "{late} of {total} nodes' heartbeats are late and {unhealthy} nodes are \
                 unhealthy, more than max-unhealthy {limit} allows: suspecting the API server \
                 or the network, not the nodes"
            ),
            Hold::ZoneDown { zone, nodes } => write!(
                f,
                "all {nodes} nodes of zone {zone} are unhealthy: suspecting the zone's network, \
                 not the nodes"
            ),
            Hold::Cooldown { remaining } => write!(
                f,
                "an unhealthy-node storm ended recently; acting again in {}s",
                remaining.as_secs()
            ),
        }
    }
}

/// Where each node stands, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    Healthy,
    Suspect,
    Tainted,
    Recovering,
    Marked,
    Ignored,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Healthy,
        Phase::Suspect,
        Phase::Tainted,
        Phase::Recovering,
        Phase::Marked,
        Phase::Ignored,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Healthy => "healthy",
            Phase::Suspect => "suspect",
            Phase::Tainted => "tainted",
            Phase::Recovering => "recovering",
            Phase::Marked => "marked",
            Phase::Ignored => "ignored",
        }
    }
}

/// What the safety rules need from earlier terms: when the last removal was decided and when
/// a hold was last in force. A leader keeps it on its Lease (`leader.rs`) and every new leader
/// reads it back before it acts, so a leader change (an API outage, a crash-looping leader)
/// neither shortens the spacing of removals nor skips the cooldown after a storm.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Safety {
    pub last_removal: Option<SystemTime>,
    pub last_hold: Option<SystemTime>,
}

impl Safety {
    /// The later of each time: whatever either record saw did happen.
    pub fn merge(self, other: Safety) -> Safety {
        Safety {
            last_removal: self.last_removal.max(other.last_removal),
            last_hold: self.last_hold.max(other.last_hold),
        }
    }
}

/// What the controller remembers between plans. How long each node has been healthy is lost
/// on a leader change, which only makes the next leader more cautious (recovery waits start
/// over); the `safety` state is handed on through the Lease.
#[derive(Debug, Default, Clone)]
pub struct Memory {
    healthy_since: HashMap<String, SystemTime>,
    pub safety: Safety,
}

impl Memory {
    /// A new term starts from what the nodes say, not from stale recovery waits; the safety
    /// state is kept (the caller merges the Lease's record into it before planning).
    pub fn new_term(&mut self) {
        self.healthy_since.clear();
    }
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub hold: Option<Hold>,
    /// Nodes that would be acted on but for the hold or the removal spacing.
    pub held: Vec<String>,
    pub phases: BTreeMap<String, Phase>,
}

fn elapsed(now: SystemTime, since: SystemTime) -> Duration {
    now.duration_since(since).unwrap_or_default()
}

fn hold(t: &Timing, nodes: &[NodeView], mem: &mut Memory, now: SystemTime) -> Option<Hold> {
    let counted = |n: &&NodeView| n.unhealthy() || n.tainted_since.is_some() || n.marked;
    let unhealthy = nodes.iter().filter(counted).count();
    let limit = t.max_unhealthy.limit(nodes.len());
    let late = nodes
        .iter()
        .filter(|n| n.heartbeat_late && !counted(n))
        .count();
    let mut storm = if unhealthy > limit {
        Some(Hold::TooManyUnhealthy {
            unhealthy,
            total: nodes.len(),
            limit: t.max_unhealthy,
        })
    } else if unhealthy + late > limit {
        Some(Hold::LateHeartbeats {
            late,
            unhealthy,
            total: nodes.len(),
            limit: t.max_unhealthy,
        })
    } else {
        None
    };
    if storm.is_none() {
        let mut zones: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for n in nodes {
            if let Some(zone) = n.zone.as_deref() {
                let e = zones.entry(zone).or_default();
                e.0 += 1;
                e.1 += usize::from(n.unhealthy());
            }
        }
        // A single-node zone going down is just a node going down.
        storm = zones
            .into_iter()
            .find(|(_, (all, bad))| *all >= 2 && bad == all)
            .map(|(zone, (all, _))| Hold::ZoneDown {
                zone: zone.to_owned(),
                nodes: all,
            });
    }
    if storm.is_some() {
        mem.safety.last_hold = Some(now);
        return storm;
    }
    let since = elapsed(now, mem.safety.last_hold?);
    (since < t.storm_cooldown).then(|| Hold::Cooldown {
        remaining: t.storm_cooldown - since,
    })
}

/// Decides what to do now. Idempotent: what was done is read back from the nodes (taints and
/// marks), so a plan never repeats an action that took effect.
pub fn plan(t: &Timing, nodes: &[NodeView], mem: &mut Memory, now: SystemTime) -> Plan {
    // The removal taints on the nodes say when bulwark last removed one, whatever the memory
    // holds; a time in the future (a skewed clock) counts as now until it comes.
    let newest_mark = nodes
        .iter()
        .filter_map(|n| n.marked_at)
        .map(|t| t.min(now))
        .max();
    mem.safety.last_removal = mem.safety.last_removal.max(newest_mark);
    let mut out = Plan {
        hold: hold(t, nodes, mem, now),
        ..Plan::default()
    };
    mem.healthy_since
        .retain(|name, _| nodes.iter().any(|n| n.name == *name));
    for n in nodes {
        let phase = if n.opted_out || n.autoscaler_deleting {
            Phase::Ignored
        } else if n.unhealthy() {
            mem.healthy_since.remove(&n.name);
            unhealthy(t, n, mem, now, &mut out)
        } else if n.tainted_since.is_some() || n.marked {
            let since = *mem.healthy_since.entry(n.name.clone()).or_insert(now);
            if elapsed(now, since) >= t.recover_after {
                out.actions.push(Action::Restore {
                    node: n.name.clone(),
                });
            }
            Phase::Recovering
        } else {
            mem.healthy_since.remove(&n.name);
            Phase::Healthy
        };
        out.phases.insert(n.name.clone(), phase);
    }
    out
}

fn unhealthy(t: &Timing, n: &NodeView, mem: &mut Memory, now: SystemTime, out: &mut Plan) -> Phase {
    if n.marked {
        // Acted on once; never again.
        return Phase::Marked;
    }
    let reason = n.reason();
    match n.tainted_since {
        None => {
            let since = n.unhealthy_since().unwrap_or(now);
            if elapsed(now, since) < t.grace {
                return Phase::Suspect;
            }
            if out.hold.is_some() {
                out.held.push(n.name.clone());
                return Phase::Suspect;
            }
            out.actions.push(Action::Taint {
                node: n.name.clone(),
                reason,
            });
            Phase::Tainted
        }
        Some(tainted) => {
            if elapsed(now, tainted) < t.remove_after {
                return Phase::Tainted;
            }
            let spaced = mem
                .safety
                .last_removal
                .is_none_or(|last| elapsed(now, last) >= t.removal_interval);
            if out.hold.is_some() || !spaced {
                out.held.push(n.name.clone());
                return Phase::Tainted;
            }
            mem.safety.last_removal = Some(now);
            out.actions.push(Action::Remove {
                node: n.name.clone(),
                reason,
            });
            Phase::Marked
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nodes::health::Signal;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    /// The defaults: grace 60 s, removeAfter 600 s, recoverAfter 120 s, maxUnhealthy 40%,
    /// stormCooldown 300 s, removalInterval 300 s.
    fn timing() -> Timing {
        crate::nodes::Settings::default().timing
    }

    fn healthy(name: &str) -> NodeView {
        NodeView {
            name: name.into(),
            zone: None,
            provider_id: None,
            signals: vec![],
            heartbeat_late: false,
            tainted_since: None,
            marked: false,
            marked_at: None,
            opted_out: false,
            autoscaler_deleting: false,
        }
    }

    fn sick(name: &str, since: u64) -> NodeView {
        NodeView {
            signals: vec![Signal {
                reason: "NotReady".into(),
                since: at(since),
            }],
            ..healthy(name)
        }
    }

    fn pool(special: Vec<NodeView>, size: usize) -> Vec<NodeView> {
        let mut nodes = special;
        for i in nodes.len()..size {
            nodes.push(healthy(&format!("ok-{i}")));
        }
        nodes
    }

    fn taint(node: &str) -> Action {
        Action::Taint {
            node: node.into(),
            reason: "NotReady".into(),
        }
    }

    #[test]
    fn escalates_from_suspect_to_taint_to_removal() {
        let t = timing();
        let mut mem = Memory::default();
        let nodes = pool(vec![sick("bad", 0)], 10);
        let p = plan(&t, &nodes, &mut mem, at(59));
        assert!(p.actions.is_empty());
        assert_eq!(p.phases["bad"], Phase::Suspect);
        assert_eq!(p.phases["ok-1"], Phase::Healthy);

        let p = plan(&t, &nodes, &mut mem, at(60));
        assert_eq!(p.actions, vec![taint("bad")]);

        let tainted = pool(
            vec![NodeView {
                tainted_since: Some(at(61)),
                ..sick("bad", 0)
            }],
            10,
        );
        assert!(plan(&t, &tainted, &mut mem, at(660)).actions.is_empty());
        let p = plan(&t, &tainted, &mut mem, at(661));
        assert_eq!(
            p.actions,
            vec![Action::Remove {
                node: "bad".into(),
                reason: "NotReady".into()
            }]
        );

        let marked = pool(
            vec![NodeView {
                marked: true,
                ..tainted[0].clone()
            }],
            10,
        );
        let p = plan(&t, &marked, &mut mem, at(5000));
        assert!(p.actions.is_empty(), "never acts twice: {p:?}");
        assert_eq!(p.phases["bad"], Phase::Marked);
    }

    #[test]
    fn recovery_untaints_only_after_the_hysteresis() {
        let t = timing();
        let mut mem = Memory::default();
        let recovered = pool(
            vec![NodeView {
                tainted_since: Some(at(0)),
                ..healthy("n")
            }],
            5,
        );
        assert!(plan(&t, &recovered, &mut mem, at(100)).actions.is_empty());
        assert!(plan(&t, &recovered, &mut mem, at(219)).actions.is_empty());
        // Flapping back to unhealthy restarts the wait.
        let flapped = pool(
            vec![NodeView {
                tainted_since: Some(at(0)),
                ..sick("n", 219)
            }],
            5,
        );
        assert!(plan(&t, &flapped, &mut mem, at(221)).actions.is_empty());
        assert!(plan(&t, &recovered, &mut mem, at(222)).actions.is_empty());
        let p = plan(&t, &recovered, &mut mem, at(342));
        assert_eq!(p.actions, vec![Action::Restore { node: "n".into() }]);
    }

    #[test]
    fn many_late_heartbeats_hold_the_node_whose_lease_went_stale_first() {
        let t = timing();
        let mut mem = Memory::default();
        let late = |name: &str| NodeView {
            heartbeat_late: true,
            ..healthy(name)
        };
        // The API server lags: one lease went stale, three more are late. 1 + 3 of 10 is
        // within 40%, so the first node is tainted...
        let mut nodes: Vec<NodeView> = vec![sick("first", 0)];
        nodes.extend((0..3).map(|i| late(&format!("late-{i}"))));
        let nodes = pool(nodes, 10);
        let p = plan(&t, &nodes, &mut mem, at(60));
        assert_eq!(p.actions, vec![taint("first")]);
        // ...but with 1 + 4 late, more than 4 nodes look bad: held, and the candidate shown.
        let mut mem = Memory::default();
        let mut lagging: Vec<NodeView> = vec![sick("first", 0)];
        lagging.extend((0..4).map(|i| late(&format!("late-{i}"))));
        let lagging = pool(lagging, 10);
        let p = plan(&t, &lagging, &mut mem, at(60));
        assert!(
            matches!(
                p.hold,
                Some(Hold::LateHeartbeats {
                    late: 4,
                    unhealthy: 1,
                    total: 10,
                    ..
                })
            ),
            "{p:?}"
        );
        assert!(p.actions.is_empty());
        assert_eq!(p.held, vec!["first".to_string()]);
        let text = p.hold.map(|h| h.to_string()).unwrap_or_default();
        assert!(
            text.contains("4 of 10 nodes' heartbeats are late"),
            "{text}"
        );
        // Heartbeats catch up: the cool-down still holds before anything new is done.
        let p = plan(&t, &pool(vec![sick("first", 0)], 10), &mut mem, at(61));
        assert!(matches!(p.hold, Some(Hold::Cooldown { .. })), "{p:?}");
    }

    #[test]
    fn too_many_unhealthy_holds_every_new_action_but_recovery() {
        let t = timing();
        let mut mem = Memory::default();
        // 6 of 10 unhealthy (60% > 40%), one tainted node has recovered.
        let mut nodes: Vec<NodeView> = (0..6).map(|i| sick(&format!("bad-{i}"), 0)).collect();
        nodes.push(NodeView {
            tainted_since: Some(at(0)),
            ..healthy("back")
        });
        let nodes = pool(nodes, 10);
        let p = plan(&t, &nodes, &mut mem, at(1000));
        assert!(matches!(
            p.hold,
            Some(Hold::TooManyUnhealthy {
                unhealthy: 7,
                total: 10,
                ..
            })
        ));
        assert_eq!(p.held.len(), 6, "every candidate is surfaced");
        assert!(p.actions.is_empty());
        let p = plan(&t, &nodes, &mut mem, at(1000 + 120));
        assert_eq!(
            p.actions,
            vec![Action::Restore {
                node: "back".into()
            }]
        );

        // The storm passes: only one node still bad. Hold on for the cool-down.
        let calm = pool(vec![sick("bad-0", 0)], 10);
        let p = plan(&t, &calm, &mut mem, at(1200));
        assert!(matches!(p.hold, Some(Hold::Cooldown { .. })), "{p:?}");
        assert!(p.actions.is_empty());
        let p = plan(&t, &calm, &mut mem, at(1120 + 300));
        assert_eq!(p.hold, None);
        assert_eq!(p.actions, vec![taint("bad-0")]);
    }

    #[test]
    fn max_unhealthy_rounds_down_but_allows_one() {
        assert_eq!(MaxUnhealthy::Percent(40).limit(10), 4);
        assert_eq!(MaxUnhealthy::Percent(40).limit(4), 1);
        assert_eq!(MaxUnhealthy::Percent(40).limit(2), 1);
        assert_eq!(MaxUnhealthy::Percent(0).limit(100), 1);
        assert_eq!(MaxUnhealthy::Count(2).limit(4), 2);
        // 2 of 4 down with an absolute count of 2: still repaired.
        let t = Timing {
            max_unhealthy: MaxUnhealthy::Count(2),
            ..timing()
        };
        let nodes = pool(vec![sick("a", 0), sick("b", 0)], 4);
        let p = plan(&t, &nodes, &mut Memory::default(), at(100));
        assert_eq!(p.actions, vec![taint("a"), taint("b")]);
    }

    #[test]
    fn a_whole_zone_down_is_held() {
        let t = timing();
        let zoned = |n: NodeView, z: &str| NodeView {
            zone: Some(z.into()),
            ..n
        };
        let nodes = vec![
            zoned(sick("a1", 0), "a"),
            zoned(sick("a2", 0), "a"),
            zoned(healthy("b1"), "b"),
            zoned(healthy("b2"), "b"),
            zoned(healthy("b3"), "b"),
            zoned(healthy("c1"), "c"),
        ];
        let t = Timing {
            max_unhealthy: MaxUnhealthy::Percent(50),
            ..t
        };
        let p = plan(&t, &nodes, &mut Memory::default(), at(100));
        assert_eq!(
            p.hold,
            Some(Hold::ZoneDown {
                zone: "a".into(),
                nodes: 2
            })
        );
        assert!(p.actions.is_empty());
        // A one-node zone going down is a node problem.
        let nodes = vec![
            zoned(sick("c1", 0), "c"),
            zoned(healthy("b1"), "b"),
            zoned(healthy("b2"), "b"),
        ];
        let p = plan(&t, &nodes, &mut Memory::default(), at(100));
        assert_eq!(p.actions, vec![taint("c1")]);
    }

    #[test]
    fn removals_are_spaced() {
        let t = timing();
        let mut mem = Memory::default();
        let tainted = |name: &str| NodeView {
            tainted_since: Some(at(0)),
            ..sick(name, 0)
        };
        let nodes = pool(vec![tainted("x"), tainted("y")], 10);
        let p = plan(&t, &nodes, &mut mem, at(700));
        assert_eq!(p.actions.len(), 1);
        assert_eq!(p.held, vec!["y".to_owned()]);
        let nodes = pool(
            vec![
                NodeView {
                    marked: true,
                    ..tainted("x")
                },
                tainted("y"),
            ],
            10,
        );
        assert!(plan(&t, &nodes, &mut mem, at(999)).actions.is_empty());
        assert_eq!(plan(&t, &nodes, &mut mem, at(1000)).actions.len(), 1);
    }

    /// Two nodes tainted long ago and due for removal.
    fn due_for_removal() -> Vec<NodeView> {
        let tainted = |name: &str| NodeView {
            tainted_since: Some(at(0)),
            ..sick(name, 0)
        };
        pool(vec![tainted("x"), tainted("y")], 10)
    }

    #[test]
    fn a_new_leader_spaces_removals_from_the_removal_taints() {
        let t = timing();
        // The previous leader marked "old" at 800 and is gone; this leader's memory is new.
        let mut nodes = due_for_removal();
        nodes.push(NodeView {
            marked: true,
            marked_at: Some(at(800)),
            tainted_since: Some(at(0)),
            ..sick("old", 0)
        });
        let mut mem = Memory::default();
        let p = plan(&t, &nodes, &mut mem, at(1000));
        assert!(p.actions.is_empty(), "{p:?}");
        assert_eq!(p.held, vec!["x".to_owned(), "y".to_owned()]);
        assert_eq!(mem.safety.last_removal, Some(at(800)));
        let p = plan(&t, &nodes, &mut mem, at(1100));
        assert_eq!(p.actions.len(), 1, "300 s after the mark: {p:?}");

        // A mark dated in the future (a skewed clock) counts as now until its time comes,
        // then as itself: a skew delays removals by at most the skew.
        nodes[2].marked_at = Some(at(2500));
        let mut mem = Memory::default();
        assert!(plan(&t, &nodes, &mut mem, at(2000)).actions.is_empty());
        assert_eq!(mem.safety.last_removal, Some(at(2000)));
        assert!(plan(&t, &nodes, &mut mem, at(2700)).actions.is_empty());
        assert_eq!(plan(&t, &nodes, &mut mem, at(2800)).actions.len(), 1);
    }

    #[test]
    fn a_new_leader_keeps_the_spacing_and_cooldown_it_read_from_the_lease() {
        let t = timing();
        // Read back from the Lease: a removal at 900 (its node since deleted) and a storm
        // that held until 950.
        let read = Safety {
            last_removal: Some(at(900)),
            last_hold: Some(at(950)),
        };
        let mut mem = Memory::default();
        mem.safety = mem.safety.merge(read);
        // Nothing new while the cooldown (300 s from 950) runs...
        let nodes = due_for_removal();
        let p = plan(&t, &nodes, &mut mem, at(1000));
        assert!(matches!(p.hold, Some(Hold::Cooldown { .. })), "{p:?}");
        assert!(p.actions.is_empty());
        // ...then removals, one, spaced from the last removal.
        let p = plan(&t, &nodes, &mut mem, at(1250));
        assert_eq!(p.hold, None);
        assert_eq!(p.actions.len(), 1);
        assert_eq!(mem.safety.last_removal, Some(at(1250)));

        // Without the record the same plan acts at once: the record is what holds it.
        let p = plan(&t, &nodes, &mut Memory::default(), at(1000));
        assert_eq!(p.actions.len(), 1);
    }

    #[test]
    fn a_new_term_forgets_recovery_waits_but_not_safety() {
        let t = timing();
        let mut mem = Memory::default();
        let recovered = pool(
            vec![NodeView {
                tainted_since: Some(at(0)),
                ..healthy("n")
            }],
            5,
        );
        assert!(plan(&t, &recovered, &mut mem, at(100)).actions.is_empty());
        mem.safety.last_hold = Some(at(90));
        mem.new_term();
        assert_eq!(mem.safety.last_hold, Some(at(90)));
        // The recovery wait starts over at 300 (the old term would restore now, 200 s after
        // it first saw the node healthy).
        assert!(plan(&t, &recovered, &mut mem, at(300)).actions.is_empty());
        let p = plan(&t, &recovered, &mut mem, at(420));
        assert_eq!(p.actions, vec![Action::Restore { node: "n".into() }]);
    }

    #[test]
    fn merge_keeps_the_later_of_each_time() {
        let a = Safety {
            last_removal: Some(at(5)),
            last_hold: None,
        };
        let b = Safety {
            last_removal: Some(at(3)),
            last_hold: Some(at(4)),
        };
        assert_eq!(
            a.merge(b),
            Safety {
                last_removal: Some(at(5)),
                last_hold: Some(at(4))
            }
        );
    }

    #[test]
    fn opted_out_and_autoscaler_nodes_are_left_alone() {
        let t = timing();
        let nodes = pool(
            vec![
                NodeView {
                    opted_out: true,
                    ..sick("mine", 0)
                },
                NodeView {
                    autoscaler_deleting: true,
                    ..sick("leaving", 0)
                },
            ],
            10,
        );
        let p = plan(&t, &nodes, &mut Memory::default(), at(10_000));
        assert!(p.actions.is_empty());
        assert_eq!(p.phases["mine"], Phase::Ignored);
        assert_eq!(p.phases["leaving"], Phase::Ignored);
    }
}
