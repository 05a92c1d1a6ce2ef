//! What bulwark knows before it decides anything: the effective policy of a namespace (its
//! `bulwark.io/*` annotations laid over the cluster defaults from `--config`), resource
//! quantities, and the facts of a pod. Parsing happens once per namespace change, never per
//! admission. The bottom of the flow: it imports nothing else of bulwark's.

pub mod pod;
pub mod quantity;

use std::{collections::BTreeMap, fmt, time::Duration};

use quantity::{Cpu, Memory, QuantityError};

pub const ANNOTATION_PREFIX: &str = "bulwark.io/";
pub const MODE: &str = "bulwark.io/mode";
pub const POD_RATE: &str = "bulwark.io/pod-rate";
pub const POD_BURST: &str = "bulwark.io/pod-burst";
pub const MAX_PODS: &str = "bulwark.io/max-pods";
pub const MAX_PENDING_PODS: &str = "bulwark.io/max-pending-pods";
pub const DEFAULT_REQUESTS: &str = "bulwark.io/default-requests";
pub const DEFAULT_LIMITS: &str = "bulwark.io/default-limits";
pub const PENDING_ACTION: &str = "bulwark.io/pending-action";

/// Every knob, with its annotation and its key in the config's `defaults:` block.
pub const KNOBS: [(Knob, &str, &str); 8] = [
    (Knob::Mode, MODE, "mode"),
    (Knob::PodRate, POD_RATE, "podRate"),
    (Knob::PodBurst, POD_BURST, "podBurst"),
    (Knob::MaxPods, MAX_PODS, "maxPods"),
    (Knob::MaxPendingPods, MAX_PENDING_PODS, "maxPendingPods"),
    (Knob::DefaultRequests, DEFAULT_REQUESTS, "defaultRequests"),
    (Knob::DefaultLimits, DEFAULT_LIMITS, "defaultLimits"),
    (Knob::PendingAction, PENDING_ACTION, "pendingAction"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Knob {
    Mode,
    PodRate,
    PodBurst,
    MaxPods,
    MaxPendingPods,
    DefaultRequests,
    DefaultLimits,
    PendingAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Enforce,
    /// Decide as in enforce, but admit and return the refusal as a warning.
    Warn,
    /// bulwark neither defaults nor limits pods in the namespace.
    Off,
}

/// What happens to a pod over a pending cap (max-pending-pods, the workflow share, the
/// cluster cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PendingAction {
    /// Refused with 429: the client retries.
    #[default]
    Refuse,
    /// Admitted behind bulwark's scheduling gate, released in order when there is room.
    Hold,
}

impl PendingAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PendingAction::Refuse => "refuse",
            PendingAction::Hold => "hold",
        }
    }
}

/// A sustained rate, kept as the interval between two creations (GCRA's emission interval).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub interval: Duration,
    /// How the user wrote it, for messages: `5/s`, `300/m`.
    count: u32,
    per: Per,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Per {
    Second,
    Minute,
    Hour,
}

impl Rate {
    /// `part` of `whole` of the rate (a group of replicas' part of the namespace's limit):
    /// the interval between creations grows by `whole / part`.
    pub fn scaled(self, part: u32, whole: u32) -> Rate {
        let nanos = self.interval.as_nanos() * u128::from(whole.max(1)) / u128::from(part.max(1));
        Rate {
            interval: Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)),
            ..self
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per {
            Per::Second => "s",
            Per::Minute => "m",
            Per::Hour => "h",
        };
        write!(f, "{}/{}", self.count, unit)
    }
}

/// Requests or limits to inject where a container has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResourceDefaults {
    pub cpu: Option<Cpu>,
    pub memory: Option<Memory>,
}

impl fmt::Display for ResourceDefaults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(cpu) = self.cpu {
            parts.push(format!("cpu={cpu}"));
        }
        if let Some(mem) = self.memory {
            parts.push(format!("memory={mem}"));
        }
        if parts.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&parts.join(","))
        }
    }
}

/// The effective policy of one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// `None`: creations are not rate limited.
    pub rate: Option<Rate>,
    pub burst: u32,
    pub max_pods: Option<u32>,
    pub max_pending_pods: Option<u32>,
    pub default_requests: ResourceDefaults,
    pub default_limits: ResourceDefaults,
    pub pending_action: PendingAction,
}

impl Default for Policy {
    /// The built-in defaults, used when `--config` does not say otherwise.
    fn default() -> Self {
        Policy {
            mode: Mode::Enforce,
            rate: Some(Rate {
                interval: Duration::from_millis(50),
                count: 20,
                per: Per::Second,
            }),
            burst: 100,
            max_pods: Some(3000),
            max_pending_pods: Some(500),
            default_requests: ResourceDefaults {
                cpu: Some(Cpu(100)),
                memory: Some(Memory(128 << 20)),
            },
            default_limits: ResourceDefaults {
                cpu: Some(Cpu(1000)),
                memory: Some(Memory(512 << 20)),
            },
            pending_action: PendingAction::Refuse,
        }
    }
}

/// An annotation or config value that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("expected one of enforce, warn, off")]
    Mode,
    #[error("expected refuse or hold")]
    PendingAction,
    #[error(
        "expected COUNT/UNIT with UNIT s, m or h and COUNT a whole number above 0 (e.g. 5/s, 300/m), or unlimited"
    )]
    Rate,
    #[error("expected a whole number from 1 to 1000000")]
    Burst,
    #[error("expected a whole number from 0 to 1000000, or unlimited")]
    Count,
    #[error("expected cpu=QUANTITY,memory=QUANTITY (either may be left out), or none")]
    ResourceSyntax,
    #[error("unknown resource {0:?}: only cpu and memory are defaulted")]
    ResourceName(String),
    #[error("{0}")]
    Quantity(#[from] QuantityError),
}

/// A problem with one namespace annotation: the namespace keeps the default for that knob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub annotation: &'static str,
    pub value: String,
    pub error: ValueError,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "annotation {}={:?} is invalid: {}; using the default",
            self.annotation, self.value, self.error
        )
    }
}

const MAX_COUNT: u32 = 1_000_000;

pub fn parse_mode(s: &str) -> Result<Mode, ValueError> {
    match s.trim() {
        "enforce" => Ok(Mode::Enforce),
        "warn" => Ok(Mode::Warn),
        "off" => Ok(Mode::Off),
        _ => Err(ValueError::Mode),
    }
}

pub fn parse_pending_action(s: &str) -> Result<PendingAction, ValueError> {
    match s.trim() {
        "refuse" => Ok(PendingAction::Refuse),
        "hold" => Ok(PendingAction::Hold),
        _ => Err(ValueError::PendingAction),
    }
}

pub fn parse_rate(s: &str) -> Result<Option<Rate>, ValueError> {
    let s = s.trim();
    if s == "unlimited" {
        return Ok(None);
    }
    let (count, unit) = s.split_once('/').ok_or(ValueError::Rate)?;
    let count: u32 = count.trim().parse().map_err(|_| ValueError::Rate)?;
    if count == 0 || count > MAX_COUNT {
        return Err(ValueError::Rate);
    }
    let (per, window) = match unit.trim() {
        "s" | "sec" | "second" => (Per::Second, Duration::from_secs(1)),
        "m" | "min" | "minute" => (Per::Minute, Duration::from_secs(60)),
        "h" | "hour" => (Per::Hour, Duration::from_secs(3600)),
        _ => return Err(ValueError::Rate),
    };
    Ok(Some(Rate {
        interval: window / count,
        count,
        per,
    }))
}

pub fn parse_burst(s: &str) -> Result<u32, ValueError> {
    match s.trim().parse::<u32>() {
        Ok(n) if (1..=MAX_COUNT).contains(&n) => Ok(n),
        _ => Err(ValueError::Burst),
    }
}

pub fn parse_count(s: &str) -> Result<Option<u32>, ValueError> {
    let s = s.trim();
    if s == "unlimited" {
        return Ok(None);
    }
    match s.parse::<u32>() {
        Ok(n) if n <= MAX_COUNT => Ok(Some(n)),
        _ => Err(ValueError::Count),
    }
}

pub fn parse_resources(s: &str) -> Result<ResourceDefaults, ValueError> {
    let s = s.trim();
    let mut out = ResourceDefaults::default();
    if s == "none" || s.is_empty() {
        return Ok(out);
    }
    for item in s.split(',') {
        let (name, value) = item.split_once('=').ok_or(ValueError::ResourceSyntax)?;
        match name.trim() {
            "cpu" => out.cpu = Some(Cpu::parse(value)?),
            "memory" => out.memory = Some(Memory::parse(value)?),
            other => return Err(ValueError::ResourceName(other.to_owned())),
        }
    }
    Ok(out)
}

impl Policy {
    /// Sets one knob from its text form.
    pub fn set(&mut self, knob: Knob, value: &str) -> Result<(), ValueError> {
        match knob {
            Knob::Mode => self.mode = parse_mode(value)?,
            Knob::PodRate => self.rate = parse_rate(value)?,
            Knob::PodBurst => self.burst = parse_burst(value)?,
            Knob::MaxPods => self.max_pods = parse_count(value)?,
            Knob::MaxPendingPods => self.max_pending_pods = parse_count(value)?,
            Knob::DefaultRequests => self.default_requests = parse_resources(value)?,
            Knob::DefaultLimits => self.default_limits = parse_resources(value)?,
            Knob::PendingAction => self.pending_action = parse_pending_action(value)?,
        }
        Ok(())
    }

    /// The namespace's policy: each valid annotation overrides `defaults`; each invalid one is
    /// reported and leaves the default in place, so a typo never stops pod creation.
    pub fn from_annotations(
        defaults: &Policy,
        annotations: Option<&BTreeMap<String, String>>,
    ) -> (Policy, Vec<Problem>) {
        let mut policy = defaults.clone();
        let mut problems = Vec::new();
        let Some(annotations) = annotations else {
            return (policy, problems);
        };
        for (knob, annotation, _) in KNOBS {
            if let Some(value) = annotations.get(annotation)
                && let Err(error) = policy.set(knob, value)
            {
                problems.push(Problem {
                    annotation,
                    value: value.clone(),
                    error,
                });
            }
        }
        (policy, problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn rates() {
        let r = parse_rate("5/s").unwrap().unwrap();
        assert_eq!(r.interval, Duration::from_millis(200));
        assert_eq!(r.to_string(), "5/s");
        let r = parse_rate("300/m").unwrap().unwrap();
        assert_eq!(r.interval, Duration::from_millis(200));
        assert_eq!(r.to_string(), "300/m");
        assert_eq!(
            parse_rate("1/h").unwrap().unwrap().interval,
            Duration::from_secs(3600)
        );
        assert_eq!(parse_rate("unlimited"), Ok(None));
        for bad in [
            "",
            "5",
            "0/s",
            "-1/s",
            "5/d",
            "1.5/s",
            "x/s",
            "5/",
            "/s",
            "2000000/s",
        ] {
            assert_eq!(parse_rate(bad), Err(ValueError::Rate), "{bad:?}");
        }
    }

    #[test]
    fn counts_and_burst() {
        assert_eq!(parse_count("500"), Ok(Some(500)));
        assert_eq!(parse_count("0"), Ok(Some(0)));
        assert_eq!(parse_count("unlimited"), Ok(None));
        for bad in ["", "-1", "1e3", "ten", "1000001"] {
            assert_eq!(parse_count(bad), Err(ValueError::Count), "{bad:?}");
        }
        assert_eq!(parse_burst("20"), Ok(20));
        for bad in ["0", "", "-3", "x"] {
            assert_eq!(parse_burst(bad), Err(ValueError::Burst), "{bad:?}");
        }
    }

    #[test]
    fn resources() {
        let r = parse_resources("cpu=100m,memory=128Mi").unwrap();
        assert_eq!(r.cpu, Some(Cpu(100)));
        assert_eq!(r.memory, Some(Memory(128 << 20)));
        assert_eq!(r.to_string(), "cpu=100m,memory=128Mi");
        let r = parse_resources(" memory = 1Gi ").unwrap();
        assert_eq!((r.cpu, r.memory), (None, Some(Memory(1 << 30))));
        assert_eq!(parse_resources("none"), Ok(ResourceDefaults::default()));
        assert_eq!(parse_resources("cpu"), Err(ValueError::ResourceSyntax));
        assert_eq!(
            parse_resources("gpu=1"),
            Err(ValueError::ResourceName("gpu".into()))
        );
        assert!(matches!(
            parse_resources("cpu=lots"),
            Err(ValueError::Quantity(_))
        ));
    }

    #[test]
    fn annotations_override_defaults_and_bad_ones_are_reported() {
        let defaults = Policy::default();
        let ann = annotations(&[
            (MODE, "warn"),
            (POD_RATE, "5/s"),
            (POD_BURST, "many"),
            (MAX_PODS, "10"),
            (DEFAULT_LIMITS, "cpu=2"),
            (PENDING_ACTION, " hold "),
            ("unrelated", "x"),
        ]);
        let (p, problems) = Policy::from_annotations(&defaults, Some(&ann));
        assert_eq!(p.mode, Mode::Warn);
        assert_eq!(p.rate.map(|r| r.to_string()).as_deref(), Some("5/s"));
        assert_eq!(p.burst, defaults.burst, "invalid burst keeps the default");
        assert_eq!(p.max_pods, Some(10));
        assert_eq!(p.max_pending_pods, defaults.max_pending_pods);
        assert_eq!(p.default_limits.cpu, Some(Cpu(2000)));
        assert_eq!(p.pending_action, PendingAction::Hold);
        assert_eq!(defaults.pending_action, PendingAction::Refuse);
        assert_eq!(
            p.default_limits.memory, None,
            "annotation replaces the whole set"
        );
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].annotation, POD_BURST);
        assert_eq!(
            problems[0].to_string(),
            "annotation bulwark.io/pod-burst=\"many\" is invalid: expected a whole number from 1 to 1000000; using the default"
        );
    }

    #[test]
    fn bad_value_table_never_panics_and_always_names_the_annotation() {
        let defaults = Policy::default();
        let bad = [
            (MODE, "Enforce"),
            (MODE, ""),
            (POD_RATE, "fast"),
            (POD_BURST, "0"),
            (MAX_PODS, "-5"),
            (MAX_PENDING_PODS, "lots"),
            (DEFAULT_REQUESTS, "cpu=1,gpu=2"),
            (DEFAULT_REQUESTS, "cpu=-1"),
            (DEFAULT_LIMITS, "memory=12MB"),
            (PENDING_ACTION, "queue"),
            (PENDING_ACTION, "Hold"),
        ];
        for (annotation, value) in bad {
            let (p, problems) =
                Policy::from_annotations(&defaults, Some(&annotations(&[(annotation, value)])));
            assert_eq!(
                p, defaults,
                "{annotation}={value:?} must leave the defaults"
            );
            assert_eq!(problems.len(), 1, "{annotation}={value:?}");
            assert!(problems[0].to_string().contains(annotation));
        }
    }
}
