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
        Ok(config)
    }

    pub fn is_exempt_namespace(&self, namespace: &str) -> bool {
        self.exempt_namespaces.iter().any(|n| n == namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Mode;

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
