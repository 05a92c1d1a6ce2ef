//! `bulwark node-controller`: watches node health signals, taints unhealthy nodes so nothing
//! new lands there, and marks them for removal so a replacement comes up.
//!
//! `health` reads signals from Nodes and Leases, `plan` is the state machine and its safety
//! rules (both pure), `actions` carries a plan out against the API server, `leader` elects one
//! acting replica, `controller` ties them to the watches; `config` parses its settings.

pub mod actions;
pub mod audit;
pub mod config;
pub mod controller;
pub mod health;
pub mod leader;
pub mod plan;

use std::time::Duration;

pub use health::{NodeView, Signal, Signals};
pub use plan::{Action, Hold, MaxUnhealthy, Memory, Phase, Plan, Safety, Timing};

/// `bulwark.io/unhealthy=<reason>:NoSchedule`: nothing new lands on the node.
pub const UNHEALTHY_TAINT: &str = "bulwark.io/unhealthy";
/// Taint and annotation that mark a node for removal (action `annotate`, and the record that
/// bulwark acted, whatever the action).
pub const REMOVAL_TAINT: &str = "bulwark.io/marked-for-removal";
pub const MARKED_ANNOTATION: &str = "bulwark.io/marked-for-removal";
/// `off` on a node: bulwark never acts on it.
pub const OPT_OUT_ANNOTATION: &str = "bulwark.io/remediation";
/// Cluster API: the Machine annotation its MachineSet honours when scaling down or
/// replacing. (The Machine is found by the node's providerID, not by the node's own
/// `cluster.x-k8s.io/machine` annotation, which the node can rewrite.)
pub const CAPI_DELETE_MACHINE: &str = "cluster.x-k8s.io/delete-machine";

/// node-problem-detector's conditions (and the kubelet's) that mean a node is broken.
pub const DEFAULT_CONDITIONS: [&str; 7] = [
    "KernelDeadlock",
    "ReadonlyFilesystem",
    "ContainerRuntimeUnhealthy",
    "FrequentKubeletRestart",
    "FrequentContainerdRestart",
    "KubeletUnhealthy",
    "XfsShutdown",
];

/// What marking a node for removal does besides recording it on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// Only the annotation and the taint, for a cloud or autoscaler hook to act on.
    Annotate,
    /// Delete the Node object.
    DeleteNode,
    /// Annotate the node's Cluster API Machine (the one with the node's providerID) with
    /// `cluster.x-k8s.io/delete-machine`, if a controller owns it (something will replace it).
    ClusterApi,
    /// Run a command with `BULWARK_NODE` and `BULWARK_PROVIDER_ID` set.
    Exec(Vec<String>),
}

impl Removal {
    pub fn name(&self) -> &'static str {
        match self {
            Removal::Annotate => "annotate",
            Removal::DeleteNode => "delete-node",
            Removal::ClusterApi => "cluster-api",
            Removal::Exec(_) => "exec",
        }
    }
}

/// The node controller's settings (`nodeController:` in the config file).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub timing: Timing,
    pub signals: Signals,
    pub removal: Removal,
    /// Protect-nodes audit: nodes allowing more pods than this are reported.
    pub max_pods_per_node: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            timing: Timing {
                grace: Duration::from_secs(60),
                remove_after: Duration::from_secs(600),
                recover_after: Duration::from_secs(120),
                max_unhealthy: MaxUnhealthy::Percent(40),
                storm_cooldown: Duration::from_secs(300),
                removal_interval: Duration::from_secs(300),
            },
            signals: Signals {
                conditions: DEFAULT_CONDITIONS.iter().map(|s| (*s).to_owned()).collect(),
                lease_stale_after: Duration::from_secs(40),
            },
            removal: Removal::Annotate,
            max_pods_per_node: 250,
        }
    }
}

/// `500ms`, `40s`, `10m`, `1h`: a positive duration up to a day.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| "expected a number and a unit (ms, s, m, h), e.g. 90s".to_string())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err("expected a unit of ms, s, m or h, e.g. 90s".into()),
    };
    if d.is_zero() || d > Duration::from_secs(86_400) {
        return Err("expected a duration above zero and at most 24h".into());
    }
    Ok(d)
}

/// `40%` or a whole number of nodes.
pub fn parse_max_unhealthy(text: &str) -> Result<MaxUnhealthy, String> {
    let t = text.trim();
    if let Some(p) = t.strip_suffix('%') {
        return p
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= 100)
            .map(MaxUnhealthy::Percent)
            .ok_or_else(|| "expected a percentage from 0% to 100%".into());
    }
    t.parse::<u32>()
        .map(MaxUnhealthy::Count)
        .map_err(|_| "expected a percentage such as 40% or a number of nodes".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration(" 90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "10", "s", "0s", "25h", "1.5m", "-3s", "10 minutes"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn max_unhealthy() {
        assert_eq!(parse_max_unhealthy("40%"), Ok(MaxUnhealthy::Percent(40)));
        assert_eq!(parse_max_unhealthy("3"), Ok(MaxUnhealthy::Count(3)));
        for bad in ["101%", "-1", "many", "%"] {
            assert!(parse_max_unhealthy(bad).is_err(), "{bad:?}");
        }
    }
}
