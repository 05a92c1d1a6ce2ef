//! A setting as written in the config file, and why one was refused. Every knob is parsed from
//! its text, so the config file and namespace annotations share one parser and one set of
//! error messages; each section's owner parses its own keys and reports an [`Invalid`].

use std::time::Duration;

use serde::Deserialize;

/// A YAML scalar as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
}

impl Scalar {
    pub fn text(&self) -> String {
        match self {
            Scalar::Int(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Bool(b) => b.to_string(),
            Scalar::Str(s) => s.clone(),
        }
    }
}

/// A key whose value cannot be used: the config file is refused with this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The key's full path, e.g. `nodeController.grace`.
    pub key: String,
    pub value: String,
    pub reason: String,
}

impl Invalid {
    pub fn new(key: impl Into<String>, value: &Scalar, reason: impl Into<String>) -> Invalid {
        Invalid {
            key: key.into(),
            value: value.text(),
            reason: reason.into(),
        }
    }
}

/// Whole seconds from `min` to 3600.
pub fn seconds(key: &str, value: &Scalar, min: u64) -> Result<Duration, Invalid> {
    value
        .text()
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|s| (min..=3600).contains(s))
        .map(Duration::from_secs)
        .ok_or_else(|| {
            Invalid::new(
                key,
                value,
                format!("expected whole seconds from {min} to 3600"),
            )
        })
}

/// A percentage from 0% to 100% (the `%` may be left out).
pub fn percent(key: &str, value: &Scalar) -> Result<u8, Invalid> {
    value
        .text()
        .trim()
        .trim_end_matches('%')
        .parse::<u8>()
        .ok()
        .filter(|p| *p <= 100)
        .ok_or_else(|| Invalid::new(key, value, "expected a percentage from 0% to 100%"))
}
