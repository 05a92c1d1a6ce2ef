//! Protect-nodes audit: nodes that leave nothing for the kubelet and the system (allocatable
//! equal to capacity) or that accept more pods than the configured ceiling.

use k8s_openapi::api::core::v1::Node;

use crate::policy::quantity::{Cpu, Memory};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// No kube/system reservation: CPU and memory allocatable equal capacity.
    NoReservation,
    /// More pod slots than `maxPodsPerNode`.
    TooManyPods { pods: u64, ceiling: u32 },
}

impl Finding {
    pub fn kind(&self) -> &'static str {
        match self {
            Finding::NoReservation => "no_reservation",
            Finding::TooManyPods { .. } => "too_many_pods",
        }
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::NoReservation => write!(
                f,
                "allocatable CPU and memory equal capacity: nothing is reserved for the kubelet \
                 and the system (set kubeReserved/systemReserved)"
            ),
            Finding::TooManyPods { pods, ceiling } => write!(
                f,
                "accepts {pods} pods, more than the {ceiling} bulwark allows per node (maxPods)"
            ),
        }
    }
}

pub fn audit(node: &Node, max_pods: u32) -> Vec<Finding> {
    let Some(status) = node.status.as_ref() else {
        return Vec::new();
    };
    let (Some(capacity), Some(allocatable)) = (&status.capacity, &status.allocatable) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let same =
        |key: &str, parse: fn(&str) -> Option<u64>| match (capacity.get(key), allocatable.get(key))
        {
            (Some(c), Some(a)) => parse(&c.0).is_some() && parse(&c.0) == parse(&a.0),
            _ => false,
        };
    let cpu = |s: &str| Cpu::parse(s).ok().map(|c| c.0);
    let mem = |s: &str| Memory::parse(s).ok().map(|m| m.0);
    if same("cpu", cpu) && same("memory", mem) {
        out.push(Finding::NoReservation);
    }
    if let Some(pods) = capacity.get("pods").and_then(|q| q.0.parse::<u64>().ok())
        && pods > u64::from(max_pods)
    {
        out.push(Finding::TooManyPods {
            pods,
            ceiling: max_pods,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(capacity: serde_json::Value, allocatable: serde_json::Value) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n"},
            "status": {"capacity": capacity, "allocatable": allocatable},
        }))
        .unwrap()
    }

    #[test]
    fn reservations_and_pod_ceilings() {
        let reserved = node(
            serde_json::json!({"cpu": "32", "memory": "128Gi", "pods": "110"}),
            serde_json::json!({"cpu": "31500m", "memory": "124Gi", "pods": "110"}),
        );
        assert!(audit(&reserved, 250).is_empty());
        let bare = node(
            serde_json::json!({"cpu": "4", "memory": "16Gi", "pods": "500"}),
            serde_json::json!({"cpu": "4000m", "memory": "16384Mi", "pods": "500"}),
        );
        assert_eq!(
            audit(&bare, 250),
            vec![
                Finding::NoReservation,
                Finding::TooManyPods {
                    pods: 500,
                    ceiling: 250
                }
            ]
        );
        assert!(audit(&node(serde_json::json!({}), serde_json::json!({})), 1).is_empty());
    }
}
