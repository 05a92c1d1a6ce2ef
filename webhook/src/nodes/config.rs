//! The config file's `nodeController:` section: parsed and checked here, its owner.

use std::time::Duration;

use serde::Deserialize;

use super::{Removal, Settings, parse_duration, parse_max_unhealthy};
use crate::value::{Invalid, Scalar};

/// The `nodeController:` section as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawSettings {
    grace: Option<Scalar>,
    remove_after: Option<Scalar>,
    recover_after: Option<Scalar>,
    lease_stale_after: Option<Scalar>,
    storm_cooldown: Option<Scalar>,
    removal_interval: Option<Scalar>,
    max_unhealthy: Option<Scalar>,
    extra_conditions: Option<Vec<String>>,
    removal: Option<Scalar>,
    removal_command: Option<Vec<String>>,
    max_pods_per_node: Option<Scalar>,
}

fn key(name: &str) -> String {
    format!("nodeController.{name}")
}

impl Settings {
    /// The defaults with what the section sets laid over them.
    pub fn parse(raw: &RawSettings) -> Result<Settings, Invalid> {
        let mut s = Settings::default();
        let duration = |name: &str, value: &Option<Scalar>, into: &mut Duration| {
            if let Some(v) = value {
                *into = parse_duration(&v.text()).map_err(|e| Invalid::new(key(name), v, e))?;
            }
            Ok::<(), Invalid>(())
        };
        let t = &mut s.timing;
        duration("grace", &raw.grace, &mut t.grace)?;
        duration("removeAfter", &raw.remove_after, &mut t.remove_after)?;
        duration("recoverAfter", &raw.recover_after, &mut t.recover_after)?;
        duration("stormCooldown", &raw.storm_cooldown, &mut t.storm_cooldown)?;
        duration(
            "removalInterval",
            &raw.removal_interval,
            &mut t.removal_interval,
        )?;
        duration(
            "leaseStaleAfter",
            &raw.lease_stale_after,
            &mut s.signals.lease_stale_after,
        )?;
        if let Some(v) = &raw.max_unhealthy {
            t.max_unhealthy = parse_max_unhealthy(&v.text())
                .map_err(|e| Invalid::new(key("maxUnhealthy"), v, e))?;
        }
        if let Some(extra) = &raw.extra_conditions {
            for c in extra {
                if !s.signals.conditions.contains(c) {
                    s.signals.conditions.push(c.clone());
                }
            }
        }
        if let Some(v) = &raw.max_pods_per_node {
            s.max_pods_per_node = v
                .text()
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    Invalid::new(key("maxPodsPerNode"), v, "expected a whole number above 0")
                })?;
        }
        let command = raw.removal_command.clone().unwrap_or_default();
        if let Some(v) = &raw.removal {
            s.removal = match v.text().trim() {
                "annotate" => Removal::Annotate,
                "delete-node" => Removal::DeleteNode,
                "cluster-api" => Removal::ClusterApi,
                "exec" if !command.is_empty() => Removal::Exec(command),
                "exec" => {
                    return Err(Invalid::new(
                        key("removal"),
                        v,
                        "exec needs nodeController.removalCommand, e.g. [/bin/notify-asg]",
                    ));
                }
                _ => {
                    return Err(Invalid::new(
                        key("removal"),
                        v,
                        "expected annotate, delete-node, cluster-api or exec",
                    ));
                }
            };
        }
        Ok(s)
    }
}
