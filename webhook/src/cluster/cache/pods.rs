//! What the cache keeps per pod and per namespace: a few bits and the workflow a pod belongs
//! to, the counters over them, and the recent rates at which pods stop being pending or live.

use std::{collections::HashMap, sync::Arc, time::Instant};

use k8s_openapi::api::core::v1::Pod;

use crate::policy::pod::{Held, PodRules, hold_gate};

/// What bulwark keeps of a pod: a few bits and the workflow it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEntry {
    pub state: PodState,
    /// The caps the pod is held to, and so counted toward: only in a system namespace can
    /// this be less than all of them (`policy::pod`).
    pub held: Held,
    pub workflow: Option<Arc<str>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodState {
    /// Not yet running: unscheduled, or scheduled and starting.
    Pending,
    /// Not yet running and behind bulwark's scheduling gate: live, but not pending, since the
    /// scheduler does not see it. What the releaser needs to let it go is kept with it.
    Held(Gated),
    Running,
    /// Succeeded or Failed: holds no quota.
    Terminal,
}

/// Where a held pod waits: when it was created (Unix seconds, the line's order) and the index
/// of bulwark's gate in its `schedulingGates` (the releaser's patch names it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gated {
    pub created: i64,
    pub gate: u16,
}

impl PodEntry {
    /// The entry of a watched pod; one without a namespace is judged as a tenant's.
    pub fn from_pod(pod: &Pod, rules: &PodRules) -> PodEntry {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        let facts = rules.facts(pod, namespace);
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .unwrap_or("Pending");
        let state = match phase {
            "Succeeded" | "Failed" => PodState::Terminal,
            "Pending" => match hold_gate(pod) {
                // Only a pod held to the pending caps waits in the line: one exempt from
                // them gains nothing by the gate and is not bulwark's to release.
                Some(gate) if facts.held == Held::All => PodState::Held(Gated {
                    created: pod
                        .metadata
                        .creation_timestamp
                        .as_ref()
                        .map_or(0, |t| t.0.as_second()),
                    gate: u16::try_from(gate).unwrap_or(u16::MAX),
                }),
                _ => PodState::Pending,
            },
            _ => PodState::Running,
        };
        PodEntry {
            state,
            held: facts.held,
            workflow: facts.workflow.map(Arc::from),
        }
    }

    /// Counted as live: not finished, and held to max-pods.
    pub fn live(&self) -> bool {
        self.state != PodState::Terminal && self.held != Held::Nothing
    }

    /// Counted as pending: not yet running, held to the pending caps, and not held back by
    /// bulwark's gate.
    pub fn counts_pending(&self) -> bool {
        self.state == PodState::Pending && self.held == Held::All
    }

    /// Waiting in bulwark's line.
    pub fn gated(&self) -> Option<Gated> {
        match self.state {
            PodState::Held(g) => Some(g),
            _ => None,
        }
    }
}

/// An exponentially decaying event rate, for "when will capacity be back".
#[derive(Debug, Clone, Copy)]
pub(super) struct DecayingRate {
    per_second: f64,
    at: Option<Instant>,
}

const RATE_WINDOW_SECS: f64 = 10.0;

impl DecayingRate {
    pub(super) const fn new() -> Self {
        DecayingRate {
            per_second: 0.0,
            at: None,
        }
    }

    pub(super) fn decayed(&self, now: Instant) -> f64 {
        match self.at {
            None => 0.0,
            Some(at) => {
                let dt = now.saturating_duration_since(at).as_secs_f64();
                self.per_second * (-dt / RATE_WINDOW_SECS).exp()
            }
        }
    }

    pub(super) fn record(&mut self, now: Instant) {
        self.per_second = self.decayed(now) + 1.0 / RATE_WINDOW_SECS;
        self.at = Some(now);
    }
}

#[derive(Debug)]
pub(super) struct NamespacePods {
    pub(super) pods: HashMap<Box<str>, PodEntry>,
    pub(super) live: u32,
    pub(super) pending: u32,
    pub(super) held: u32,
    pub(super) workflows: HashMap<Arc<str>, u32>,
    pub(super) pending_drain: DecayingRate,
    pub(super) live_drain: DecayingRate,
}

impl NamespacePods {
    pub(super) fn new() -> Self {
        NamespacePods {
            pods: HashMap::new(),
            live: 0,
            pending: 0,
            held: 0,
            workflows: HashMap::new(),
            pending_drain: DecayingRate::new(),
            live_drain: DecayingRate::new(),
        }
    }

    /// Adds (`sign` 1) or removes (`sign` -1) an entry's contribution to the counters.
    pub(super) fn account(&mut self, entry: &PodEntry, add: bool) {
        let step = |n: &mut u32| {
            *n = if add {
                n.saturating_add(1)
            } else {
                n.saturating_sub(1)
            }
        };
        if entry.live() {
            step(&mut self.live);
        }
        if entry.counts_pending() {
            step(&mut self.pending);
        }
        if entry.gated().is_some() {
            step(&mut self.held);
        }
        if let Some(wf) = &entry.workflow {
            if add {
                *self.workflows.entry(wf.clone()).or_insert(0) += 1;
            } else if let Some(n) = self.workflows.get_mut(wf) {
                *n -= 1;
                if *n == 0 {
                    self.workflows.remove(wf);
                }
            }
        }
    }

    /// Shares the workflow string with the namespace's other pods of the same workflow.
    pub(super) fn intern(&self, mut entry: PodEntry) -> PodEntry {
        if let Some(wf) = &entry.workflow
            && let Some((shared, _)) = self.workflows.get_key_value(wf)
        {
            entry.workflow = Some(shared.clone());
        }
        entry
    }
}
