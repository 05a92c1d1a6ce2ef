//! `--config`: the cluster-wide defaults and limits, read once at start-up. Each section is
//! parsed by its owner (namespace defaults by `policy`, quotas by `quota`, the node
//! controller's by `nodes`); a bad file is a start-up error that names the key, so a typo
//! cannot silently change what is enforced.

use std::{collections::BTreeMap, path::Path};

use serde::Deserialize;

use crate::{
    nodes,
    policy::{KNOBS, Policy, pod::PodRules},
    quota,
    review::{self, caller::QueueingClients},
    value::{Invalid, Scalar},
};

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

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    /// `bulwark webhook`'s settings.
    pub webhook: review::Settings,
    /// `bulwark node-controller`'s settings.
    pub node_controller: nodes::Settings,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    #[serde(default)]
    defaults: BTreeMap<String, Scalar>,
    cluster: Option<quota::RawCluster>,
    exempt_namespaces: Option<Vec<String>>,
    system_namespaces: Option<Vec<String>>,
    workflow_labels: Option<Vec<String>>,
    workflow_reserved_share: Option<Scalar>,
    reservation_ttl_seconds: Option<Scalar>,
    max_retry_after_seconds: Option<Scalar>,
    cache_stale_limit_seconds: Option<Scalar>,
    queueing_controllers: Option<bool>,
    queueing_clients: Option<Vec<String>>,
    #[serde(default)]
    node_controller: nodes::config::RawSettings,
}

/// The `defaults:` block: each key is a namespace knob, parsed as its annotation is.
fn parse_defaults(raw: &BTreeMap<String, Scalar>) -> Result<Policy, Invalid> {
    let mut policy = Policy::default();
    for (key, value) in raw {
        let path = format!("defaults.{key}");
        let Some((knob, _, _)) = KNOBS.iter().find(|(_, _, k)| k == key) else {
            let known: Vec<&str> = KNOBS.iter().map(|(_, _, k)| *k).collect();
            return Err(Invalid::new(
                path,
                value,
                format!("unknown key; known keys: {}", known.join(", ")),
            ));
        };
        policy
            .set(*knob, &value.text())
            .map_err(|e| Invalid::new(path, value, e.to_string()))?;
    }
    Ok(policy)
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
        Config::from_raw(raw).map_err(|i| ConfigError::Value {
            path: origin.to_owned(),
            key: i.key,
            value: i.value,
            reason: i.reason,
        })
    }

    fn from_raw(raw: RawConfig) -> Result<Config, Invalid> {
        let mut pods = PodRules::default();
        if let Some(ns) = raw.exempt_namespaces {
            pods.exempt_namespaces = ns;
        }
        if let Some(ns) = raw.system_namespaces {
            pods.system_namespaces = ns;
        }
        if let Some(labels) = raw.workflow_labels {
            pods.workflow_labels = labels;
        }
        let quota = quota::Settings::parse(&quota::RawSettings {
            cluster: raw.cluster.as_ref(),
            workflow_reserved_share: raw.workflow_reserved_share.as_ref(),
            reservation_ttl_seconds: raw.reservation_ttl_seconds.as_ref(),
            max_retry_after_seconds: raw.max_retry_after_seconds.as_ref(),
            cache_stale_limit_seconds: raw.cache_stale_limit_seconds.as_ref(),
        })?;
        let mut queueing = QueueingClients::default();
        if let Some(controllers) = raw.queueing_controllers {
            queueing.controllers = controllers;
        }
        if let Some(names) = raw.queueing_clients {
            queueing.names = names;
        }
        Ok(Config {
            webhook: review::Settings {
                defaults: parse_defaults(&raw.defaults)?,
                pods,
                quota,
                queueing,
                releaser: None,
            },
            node_controller: nodes::Settings::parse(&raw.node_controller)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
systemNamespaces: [kube-system, node-agents]
workflowLabels: [app.example.com/run]
workflowReservedShare: 25%
reservationTtlSeconds: 10
maxRetryAfterSeconds: 60
cacheStaleLimitSeconds: 30
queueingControllers: false
queueingClients: [system:serviceaccount:argo:argo-workflow-controller, ci-runners]
"#,
            "test.yaml",
        )
        .unwrap();
        let (d, q, pods) = (&c.webhook.defaults, &c.webhook.quota, &c.webhook.pods);
        assert_eq!(d.mode, Mode::Warn);
        assert_eq!(d.burst, 20);
        assert_eq!(d.max_pods, Some(100));
        assert_eq!(d.max_pending_pods, None);
        assert_eq!(q.cluster.max_pending_pods, Some(1000));
        assert_eq!(q.cluster.pending_per_healthy_node, Some(20));
        assert!(pods.is_exempt_namespace("infra"));
        assert!(!pods.is_exempt_namespace("bulwark-system"));
        assert!(pods.is_system_namespace("node-agents") && !pods.is_system_namespace("infra"));
        assert_eq!(
            pods.workflow_labels,
            vec!["app.example.com/run".to_string()]
        );
        assert_eq!(q.workflow_reserved_percent, 25);
        assert_eq!(q.reservation_ttl, Duration::from_secs(10));
        assert_eq!(q.max_retry_after, Duration::from_secs(60));
        assert_eq!(q.cache_stale_limit, Duration::from_secs(30));
        let queueing = &c.webhook.queueing;
        assert!(!queueing.controllers);
        assert_eq!(queueing.names.len(), 2);
        assert_eq!(queueing.names[1], "ci-runners");
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
