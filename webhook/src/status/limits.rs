//! Which limits a namespace is held to and where each came from: its annotation, the config
//! file's `defaults:`, or bulwark's built-in default; an annotation that cannot be used falls
//! back to the default. Parsed by the webhook's own parser (`Policy::from_annotations`), so
//! what this says is what the webhook enforces.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::{
    config::{Config, ConfigError},
    policy::{KNOBS, Knob, Mode, Policy, Problem, Rate, pod::PodRules},
};

/// Where a namespace's value of a knob came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Annotation,
    /// The config file's `defaults:` block.
    Config,
    BuiltIn,
    /// The annotation could not be used; the default applies (`config`: the config file's).
    Invalid {
        config: bool,
    },
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Annotation => "annotation",
            Source::Config => "config",
            Source::BuiltIn => "built-in",
            Source::Invalid { config: true } => "invalid annotation, config",
            Source::Invalid { config: false } => "invalid annotation, built-in",
        }
    }
}

/// Where the defaults were read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The `bulwark.yaml` key of this ConfigMap (`namespace/name`).
    ConfigMap(String),
    /// Not read (why): bulwark's built-in defaults are assumed.
    Assumed(String),
}

/// The cluster-wide defaults a namespace's annotations are laid over.
#[derive(Debug, Clone, PartialEq)]
pub struct Defaults {
    pub policy: Policy,
    /// The knobs the config file's `defaults:` sets; the others are built in.
    pub configured: Vec<Knob>,
    pub pods: PodRules,
    pub origin: Origin,
}

/// Only the keys of `defaults:`, to tell a configured default from a built-in one.
#[derive(Deserialize, Default)]
struct DefaultsKeys {
    #[serde(default)]
    defaults: BTreeMap<String, serde::de::IgnoredAny>,
}

impl Defaults {
    /// bulwark's built-in defaults, assumed because the config could not be read (`why`).
    pub fn built_in(why: impl Into<String>) -> Defaults {
        Defaults {
            policy: Policy::default(),
            configured: Vec::new(),
            pods: PodRules::default(),
            origin: Origin::Assumed(why.into()),
        }
    }

    /// The defaults of a config file's text (`bulwark.yaml`), read from `origin`.
    pub fn from_config(text: &str, origin: &str) -> Result<Defaults, ConfigError> {
        let config = Config::parse(text, origin)?;
        let keys: DefaultsKeys = if text.trim().is_empty() {
            DefaultsKeys::default()
        } else {
            // Config::parse has read this very text, so it is valid YAML.
            serde_saphyr::from_str(text).unwrap_or_default()
        };
        let configured = KNOBS
            .iter()
            .filter(|(_, _, key)| keys.defaults.contains_key(*key))
            .map(|(knob, _, _)| *knob)
            .collect();
        Ok(Defaults {
            policy: config.webhook.defaults,
            configured,
            pods: config.webhook.pods,
            origin: Origin::ConfigMap(origin.to_owned()),
        })
    }
}

/// A namespace's value of one knob and where it came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit<T> {
    pub value: T,
    pub source: Source,
}

/// What a namespace is held to.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub mode: Limit<Mode>,
    /// `None`: unlimited.
    pub max_pods: Limit<Option<u32>>,
    pub max_pending_pods: Limit<Option<u32>>,
    pub pod_rate: Limit<Option<Rate>>,
    pub pod_burst: Limit<u32>,
    /// Annotations that could not be used.
    pub problems: Vec<Problem>,
}

/// The limits of a namespace with these annotations.
pub fn limits(defaults: &Defaults, annotations: Option<&BTreeMap<String, String>>) -> Limits {
    let (policy, problems) = Policy::from_annotations(&defaults.policy, annotations);
    let source = |knob: Knob| {
        let annotation = KNOBS
            .iter()
            .find(|(k, _, _)| *k == knob)
            .map(|(_, a, _)| *a)
            .unwrap_or_default();
        let config = defaults.configured.contains(&knob);
        if problems.iter().any(|p| p.annotation == annotation) {
            Source::Invalid { config }
        } else if annotations.is_some_and(|a| a.contains_key(annotation)) {
            Source::Annotation
        } else if config {
            Source::Config
        } else {
            Source::BuiltIn
        }
    };
    Limits {
        mode: Limit {
            value: policy.mode,
            source: source(Knob::Mode),
        },
        max_pods: Limit {
            value: policy.max_pods,
            source: source(Knob::MaxPods),
        },
        max_pending_pods: Limit {
            value: policy.max_pending_pods,
            source: source(Knob::MaxPendingPods),
        },
        pod_rate: Limit {
            value: policy.rate,
            source: source(Knob::PodRate),
        },
        pod_burst: Limit {
            value: policy.burst,
            source: source(Knob::PodBurst),
        },
        problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const CONFIG: &str = "defaults:\n  maxPods: 100\n  podRate: 5/s\nexemptNamespaces: [infra]\n";

    #[test]
    fn each_limit_says_where_it_came_from() {
        let defaults = Defaults::from_config(CONFIG, "bulwark-system/bulwark-config").unwrap();
        assert_eq!(defaults.configured, [Knob::PodRate, Knob::MaxPods]);
        assert_eq!(defaults.pods.exempt_namespaces, ["infra"]);
        let ann = annotations(&[
            ("bulwark.io/max-pending-pods", "20"),
            ("bulwark.io/pod-rate", "fast"),
            ("bulwark.io/pod-burst", "many"),
        ]);
        let l = limits(&defaults, Some(&ann));
        assert_eq!(
            l.mode,
            Limit {
                value: Mode::Enforce,
                source: Source::BuiltIn
            }
        );
        assert_eq!(
            l.max_pods,
            Limit {
                value: Some(100),
                source: Source::Config
            }
        );
        assert_eq!(
            l.max_pending_pods,
            Limit {
                value: Some(20),
                source: Source::Annotation
            }
        );
        assert_eq!(l.pod_rate.source, Source::Invalid { config: true });
        assert_eq!(
            l.pod_rate.value.map(|r| r.to_string()).as_deref(),
            Some("5/s")
        );
        assert_eq!(
            l.pod_burst,
            Limit {
                value: 100,
                source: Source::Invalid { config: false }
            }
        );
        assert_eq!(l.pod_burst.source.label(), "invalid annotation, built-in");
        let named: Vec<&str> = l.problems.iter().map(|p| p.annotation).collect();
        assert_eq!(named, ["bulwark.io/pod-rate", "bulwark.io/pod-burst"]);
    }

    #[test]
    fn without_the_config_the_built_in_defaults_are_assumed() {
        let defaults = Defaults::built_in("forbidden");
        assert_eq!(defaults.origin, Origin::Assumed("forbidden".into()));
        let l = limits(&defaults, None);
        assert_eq!(
            l.max_pods,
            Limit {
                value: Some(3000),
                source: Source::BuiltIn
            }
        );
        assert_eq!(l.max_pending_pods.value, Some(500));
        assert!(l.problems.is_empty());
        // An unlimited annotation is a value like any other.
        let ann = annotations(&[("bulwark.io/max-pods", "unlimited")]);
        let l = limits(&defaults, Some(&ann));
        assert_eq!(
            l.max_pods,
            Limit {
                value: None,
                source: Source::Annotation
            }
        );
    }

    #[test]
    fn an_invalid_config_is_an_error() {
        let err = Defaults::from_config("defaults:\n  maxPods: lots\n", "cm").unwrap_err();
        assert!(err.to_string().contains("defaults.maxPods"), "{err}");
        let empty = Defaults::from_config("", "cm").unwrap();
        assert!(empty.configured.is_empty());
        assert_eq!(empty.policy, Policy::default());
    }
}
