//! `--config`: the cluster-wide defaults and limits, read once at start-up. A bad file is a
//! start-up error that names the key, so a typo cannot silently change what is enforced.

use std::{path::Path, time::Duration};

use serde::Deserialize;

use crate::policy::{KNOBS, Policy, ValueError, parse_count};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Syntax { path: String, message: String },
    #[error("config file {path}: key {key}: value {value:?} is invalid: {reason}")]
    Value {
        path: String,
        key: String,
        value: String,
        reason: String,
    },
}

/// Cluster-wide cap on pods not yet running, across all namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterLimits {
    pub max_pending_pods: Option<u32>,
    /// Scales the cap with the healthy, schedulable nodes the cache sees.
    pub pending_per_healthy_node: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub defaults: Policy,
    pub cluster: ClusterLimits,
    pub exempt_namespaces: Vec<String>,
    pub workflow_labels: Vec<String>,
    /// Percentage of `max-pending-pods` only pods of already started workflows may use.
    pub workflow_reserved_percent: u8,
    /// How long an admission is counted before the watch shows its pod.
    pub reservation_ttl: Duration,
    /// Upper bound of `retryAfterSeconds`, before jitter.
    pub max_retry_after: Duration,
    /// How long a watch may fail before pod-count quotas stop being enforced (fail open).
    pub cache_stale_limit: Duration,
    /// `bulwark node-controller`'s settings.
    pub node_controller: crate::nodes::Settings,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            defaults: Policy::default(),
            cluster: ClusterLimits {
                max_pending_pods: Some(5000),
                pending_per_healthy_node: Some(30),
            },
            exempt_namespaces: vec!["kube-system".into(), "bulwark-system".into()],
            workflow_labels: vec![
                "workflows.argoproj.io/workflow".into(),
                "bulwark.io/workflow".into(),
            ],
            workflow_reserved_percent: 20,
            reservation_ttl: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(30),
            cache_stale_limit: Duration::from_secs(120),
            node_controller: crate::nodes::Settings::default(),
        }
    }
}

/// A YAML scalar as written; every knob is parsed from its text so that config and
/// annotations share one parser and one set of error messages.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Scalar::Int(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Bool(b) => b.to_string(),
            Scalar::Str(s) => s.clone(),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    #[serde(default)]
    defaults: std::collections::BTreeMap<String, Scalar>,
    #[serde(default)]
    cluster: RawCluster,
    exempt_namespaces: Option<Vec<String>>,
    workflow_labels: Option<Vec<String>>,
    workflow_reserved_share: Option<Scalar>,
    reservation_ttl_seconds: Option<Scalar>,
    max_retry_after_seconds: Option<Scalar>,
    cache_stale_limit_seconds: Option<Scalar>,
    #[serde(default)]
    node_controller: RawNodeController,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawNodeController {
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

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawCluster {
    max_pending_pods: Option<Scalar>,
    pending_per_healthy_node: Option<Scalar>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: display.clone(),
            source,
        })?;
        Config::parse(&text, &display)
    }

    /// Parses the YAML text of a config file; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = if text.trim().is_empty() {
            RawConfig::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| ConfigError::Syntax {
                path: origin.to_owned(),
                message: e.to_string(),
            })?
        };
        let bad = |key: &str, value: &Scalar, reason: String| ConfigError::Value {
            path: origin.to_owned(),
            key: key.to_owned(),
            value: value.text(),
            reason,
        };
        let mut config = Config::default();
        for (key, value) in &raw.defaults {
            let Some((knob, _, _)) = KNOBS.iter().find(|(_, _, k)| k == key) else {
                let known: Vec<&str> = KNOBS.iter().map(|(_, _, k)| *k).collect();
                return Err(bad(
                    &format!("defaults.{key}"),
                    value,
                    format!("unknown key; known keys: {}", known.join(", ")),
                ));
            };
            config
                .defaults
                .set(*knob, &value.text())
                .map_err(|e| bad(&format!("defaults.{key}"), value, e.to_string()))?;
        }
        let count = |key: &str, value: &Option<Scalar>, current: Option<u32>| match value {
            None => Ok(current),
            Some(v) => parse_count(&v.text()).map_err(|e: ValueError| bad(key, v, e.to_string())),
        };
        config.cluster.max_pending_pods = count(
            "cluster.maxPendingPods",
            &raw.cluster.max_pending_pods,
            config.cluster.max_pending_pods,
        )?;
        config.cluster.pending_per_healthy_node = count(
            "cluster.pendingPerHealthyNode",
            &raw.cluster.pending_per_healthy_node,
            config.cluster.pending_per_healthy_node,
        )?;
        if let Some(ns) = raw.exempt_namespaces {
            config.exempt_namespaces = ns;
        }
        if let Some(labels) = raw.workflow_labels {
            config.workflow_labels = labels;
        }
        if let Some(v) = &raw.workflow_reserved_share {
            let text = v.text();
            config.workflow_reserved_percent = text
                .trim()
                .trim_end_matches('%')
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= 100)
                .ok_or_else(|| {
                    bad(
                        "workflowReservedShare",
                        v,
                        "expected a percentage from 0% to 100%".into(),
                    )
                })?;
        }
        let seconds = |key: &str, value: &Scalar, min: u64| {
            value
                .text()
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|s| (min..=3600).contains(s))
                .map(Duration::from_secs)
                .ok_or_else(|| {
                    bad(
                        key,
                        value,
                        format!("expected whole seconds from {min} to 3600"),
                    )
                })
        };
        if let Some(v) = &raw.reservation_ttl_seconds {
            config.reservation_ttl = seconds("reservationTtlSeconds", v, 1)?;
        }
        if let Some(v) = &raw.max_retry_after_seconds {
            config.max_retry_after = seconds("maxRetryAfterSeconds", v, 1)?;
        }
        if let Some(v) = &raw.cache_stale_limit_seconds {
            config.cache_stale_limit = seconds("cacheStaleLimitSeconds", v, 5)?;
        }
        parse_node_controller(&raw.node_controller, &mut config.node_controller, &bad)?;
        Ok(config)
    }

    pub fn is_exempt_namespace(&self, namespace: &str) -> bool {
        self.exempt_namespaces.iter().any(|n| n == namespace)
    }
}

fn parse_node_controller(
    raw: &RawNodeController,
    s: &mut crate::nodes::Settings,
    bad: &dyn Fn(&str, &Scalar, String) -> ConfigError,
) -> Result<(), ConfigError> {
    use crate::nodes::{Removal, parse_duration, parse_max_unhealthy};
    let duration = |key: &str, value: &Option<Scalar>, into: &mut Duration| {
        if let Some(v) = value {
            *into = parse_duration(&v.text())
                .map_err(|e| bad(&format!("nodeController.{key}"), v, e))?;
        }
        Ok::<(), ConfigError>(())
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
        t.max_unhealthy =
            parse_max_unhealthy(&v.text()).map_err(|e| bad("nodeController.maxUnhealthy", v, e))?;
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
                bad(
                    "nodeController.maxPodsPerNode",
                    v,
                    "expected a whole number above 0".into(),
                )
            })?;
    }
    let command = raw.removal_command.clone().unwrap_or_default();
    if let Some(v) = &raw.removal {
        s.removal = match v.text().trim() {
            "annotate" => Removal::Annotate,
            "delete-node" => Removal::DeleteNode,
            "cluster-api" => Removal::ClusterApi,
            "exec" if !command.is_empty() => Removal::Exec(command.clone()),
            "exec" => {
                return Err(bad(
                    "nodeController.removal",
                    v,
                    "exec needs nodeController.removalCommand, e.g. [/bin/notify-asg]".into(),
                ));
            }
            _ => {
                return Err(bad(
                    "nodeController.removal",
                    v,
                    "expected annotate, delete-node, cluster-api or exec".into(),
                ));
            }
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Mode;

    #[test]
    fn node_controller_section() {
        let c = Config::parse(
            r#"
nodeController:
  grace: 30s
  removeAfter: 5m
  recoverAfter: 90s
  leaseStaleAfter: 20s
  stormCooldown: 1m
  removalInterval: 10m
  maxUnhealthy: 2
  extraConditions: [GPUUnhealthy, KernelDeadlock]
  removal: exec
  removalCommand: [/bin/notify, --asg]
  maxPodsPerNode: 110
"#,
            "t.yaml",
        )
        .unwrap();
        let n = &c.node_controller;
        assert_eq!(n.timing.grace, Duration::from_secs(30));
        assert_eq!(n.timing.remove_after, Duration::from_secs(300));
        assert_eq!(n.timing.recover_after, Duration::from_secs(90));
        assert_eq!(n.signals.lease_stale_after, Duration::from_secs(20));
        assert_eq!(n.timing.max_unhealthy, crate::nodes::MaxUnhealthy::Count(2));
        assert_eq!(n.signals.conditions.len(), 8, "one new, one already known");
        assert_eq!(
            n.removal,
            crate::nodes::Removal::Exec(vec!["/bin/notify".into(), "--asg".into()])
        );
        assert_eq!(n.max_pods_per_node, 110);

        for (yaml, key) in [
            ("nodeController:\n  grace: soon\n", "nodeController.grace"),
            (
                "nodeController:\n  removal: exec\n",
                "nodeController.removal",
            ),
            (
                "nodeController:\n  removal: reboot\n",
                "nodeController.removal",
            ),
            (
                "nodeController:\n  maxUnhealthy: 140%\n",
                "nodeController.maxUnhealthy",
            ),
        ] {
            let err = Config::parse(yaml, "t.yaml").unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
        let err = Config::parse("nodeController:\n  graceful: 1s\n", "t.yaml").unwrap_err();
        assert!(err.to_string().contains("graceful"), "{err}");
    }

    #[test]
    fn full_config() {
        let c = Config::parse(
            r#"
defaults:
  mode: warn
  podRate: 300/m
  podBurst: 20
  maxPods: 100
  maxPendingPods: unlimited
  defaultRequests: cpu=50m,memory=64Mi
  defaultLimits: memory=256Mi
cluster:
  maxPendingPods: 1000
  pendingPerHealthyNode: 20
exemptNamespaces: [kube-system, infra]
workflowLabels: [app.example.com/run]
workflowReservedShare: 25%
reservationTtlSeconds: 10
maxRetryAfterSeconds: 60
cacheStaleLimitSeconds: 30
"#,
            "test.yaml",
        )
        .unwrap();
        assert_eq!(c.defaults.mode, Mode::Warn);
        assert_eq!(c.defaults.burst, 20);
        assert_eq!(c.defaults.max_pods, Some(100));
        assert_eq!(c.defaults.max_pending_pods, None);
        assert_eq!(c.cluster.max_pending_pods, Some(1000));
        assert_eq!(c.cluster.pending_per_healthy_node, Some(20));
        assert!(c.is_exempt_namespace("infra"));
        assert!(!c.is_exempt_namespace("bulwark-system"));
        assert_eq!(c.workflow_labels, vec!["app.example.com/run".to_string()]);
        assert_eq!(c.workflow_reserved_percent, 25);
        assert_eq!(c.reservation_ttl, Duration::from_secs(10));
        assert_eq!(c.max_retry_after, Duration::from_secs(60));
        assert_eq!(c.cache_stale_limit, Duration::from_secs(30));
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(Config::parse("", "x").unwrap(), Config::default());
        assert_eq!(Config::parse("{}", "x").unwrap(), Config::default());
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("defaults:\n  podRate: fast\n", "defaults.podRate"),
            ("defaults:\n  podrate: 5/s\n", "defaults.podrate"),
            ("defaults:\n  maxPods: -1\n", "defaults.maxPods"),
            (
                "cluster:\n  maxPendingPods: many\n",
                "cluster.maxPendingPods",
            ),
            ("cluster:\n  maxPending: 5\n", "maxPending"),
            ("workflowReservedShare: 120%\n", "workflowReservedShare"),
            ("reservationTtlSeconds: 0\n", "reservationTtlSeconds"),
            ("colour: blue\n", "colour"),
        ];
        for (yaml, key) in cases {
            let err = Config::parse(yaml, "c.yaml").unwrap_err().to_string();
            assert!(err.contains(key), "{yaml:?}: {err}");
            assert!(err.contains("c.yaml"), "{err}");
        }
    }

    #[test]
    fn unreadable_file_is_an_error() {
        let err = Config::load(Path::new("/nonexistent/bulwark.yaml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/bulwark.yaml"));
    }
}
