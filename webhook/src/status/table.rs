//! The status table: one row per namespace, sorted by how close it is to a limit (then by its
//! recent refusals, then by name), as `kubectl get`-like columns or as JSON.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Namespace;
use serde_json::{Value, json};

use super::{
    limits::{Defaults, Limit, Limits, Origin, limits},
    usage::{PodTally, Refusals},
};
use crate::policy::{Mode, Rate};

/// One namespace's status.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub namespace: String,
    /// bulwark leaves the namespace alone (`exemptNamespaces`, or bulwark's own).
    pub exempt: bool,
    pub limits: Limits,
    pub pods: PodTally,
    /// Pods waiting behind bulwark's scheduling gate (hold mode), beside `pods.pending`;
    /// `None` when there are none.
    pub held: Option<u32>,
    /// Refusals over the last ten minutes by reason; `None` when bulwark's Events could not
    /// be read.
    pub refusals: Option<Refusals>,
}

/// The limit a namespace is nearest to, and how much of it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nearest {
    pub limit: &'static str,
    pub percent: u64,
}

fn percent(used: u32, limit: u32) -> u64 {
    match limit {
        // Nothing may be created: at the limit whatever it holds.
        0 => 100,
        l => u64::from(used) * 100 / u64::from(l),
    }
}

/// Creations a rate allows over a minute, sustained.
fn per_minute(rate: &Rate) -> f64 {
    60.0 / rate.interval.as_secs_f64().max(f64::MIN_POSITIVE)
}

impl Row {
    /// `enforce`, `warn`, `off`, or `exempt`.
    pub fn mode(&self) -> &'static str {
        if self.exempt {
            return "exempt";
        }
        match self.limits.mode.value {
            Mode::Enforce => "enforce",
            Mode::Warn => "warn",
            Mode::Off => "off",
        }
    }

    /// The limit closest to being reached; `None` where bulwark limits nothing (exempt, mode
    /// off, every limit unlimited).
    pub fn nearest(&self) -> Option<Nearest> {
        if self.exempt || self.limits.mode.value == Mode::Off {
            return None;
        }
        let l = &self.limits;
        let counts = [
            (
                "max-pods",
                l.max_pods.value.map(|m| percent(self.pods.live, m)),
            ),
            (
                "max-pending-pods",
                l.max_pending_pods
                    .value
                    .map(|m| percent(self.pods.pending, m)),
            ),
            (
                "pod-rate",
                l.pod_rate.value.as_ref().map(|r| {
                    // Whole percents of a finite, non-negative ratio.
                    (f64::from(self.pods.created_last_minute) * 100.0 / per_minute(r)) as u64
                }),
            ),
        ];
        counts
            .into_iter()
            .filter_map(|(limit, p)| Some(Nearest { limit, percent: p? }))
            // The first of equals: counts before the rate.
            .reduce(|best, n| if n.percent > best.percent { n } else { best })
    }

    fn refused_total(&self) -> u64 {
        self.refusals.iter().flat_map(|r| r.values()).sum()
    }
}

/// The rows of `namespaces`, sorted: nearest to a limit first.
pub fn rows(
    defaults: &Defaults,
    own_namespace: &str,
    namespaces: &[Namespace],
    pods: &BTreeMap<String, PodTally>,
    refusals: Option<&BTreeMap<String, Refusals>>,
) -> Vec<Row> {
    let mut rows: Vec<Row> = namespaces
        .iter()
        .filter_map(|ns| {
            let name = ns.metadata.name.clone()?;
            Some(Row {
                exempt: name == own_namespace || defaults.pods.is_exempt_namespace(&name),
                limits: limits(defaults, ns.metadata.annotations.as_ref()),
                pods: pods.get(&name).copied().unwrap_or_default(),
                held: pods.get(&name).map(|t| t.held).filter(|h| *h > 0),
                refusals: refusals.map(|r| r.get(&name).cloned().unwrap_or_default()),
                namespace: name,
            })
        })
        .collect();
    rows.sort_by(|a, b| {
        let closeness = |r: &Row| r.nearest().map(|n| n.percent);
        closeness(b)
            .cmp(&closeness(a))
            .then(b.refused_total().cmp(&a.refused_total()))
            .then(a.namespace.cmp(&b.namespace))
    });
    rows
}

fn count(n: Option<u32>) -> String {
    n.map_or_else(|| "unlimited".to_owned(), |n| n.to_string())
}

fn rate(r: Option<&Rate>) -> String {
    r.map_or_else(|| "unlimited".to_owned(), ToString::to_string)
}

/// `used/limit (source)`.
fn used_of(used: u32, limit: &Limit<Option<u32>>) -> String {
    format!("{used}/{} ({})", count(limit.value), limit.source.label())
}

/// The webhook's reason labels as the knobs read: `max_pending` is `max-pending`.
fn reason(label: &str) -> String {
    label.replace('_', "-")
}

fn refused(row: &Row) -> String {
    match &row.refusals {
        None => "<unknown>".to_owned(),
        Some(r) if r.values().all(|n| *n == 0) => "0".to_owned(),
        Some(r) => {
            let mut by: Vec<(&String, &u64)> = r.iter().filter(|(_, n)| **n > 0).collect();
            by.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            by.iter()
                .map(|(label, n)| format!("{n} {}", reason(label)))
                .collect::<Vec<_>>()
                .join(", ")
        }
    }
}

fn problems(limits: &Limits, wide: bool) -> String {
    if limits.problems.is_empty() {
        return "<none>".to_owned();
    }
    let each: Vec<String> = limits
        .problems
        .iter()
        .map(|p| {
            if wide {
                p.to_string()
            } else {
                format!("{}={:?}", p.annotation, p.value)
            }
        })
        .collect();
    each.join(if wide { "; " } else { ", " })
}

/// Columns padded like `kubectl get` (three spaces between them).
fn columns(table: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..table.first().map_or(0, Vec::len))
        .map(|c| {
            table
                .iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in table {
        let last = row.len().saturating_sub(1);
        for (c, cell) in row.iter().enumerate() {
            out.push_str(cell);
            if c < last {
                let pad = widths[c] - cell.chars().count() + 3;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push('\n');
    }
    out
}

/// The table; `wide` adds the burst, the source of the mode and each problem in full.
pub fn text(rows: &[Row], wide: bool) -> String {
    let mut header = vec![
        "NAMESPACE",
        "MODE",
        "LIVE/MAX-PODS",
        "PENDING/MAX-PENDING",
        "CREATED-1M/POD-RATE",
    ];
    if wide {
        header.push("POD-BURST");
    }
    header.extend(["REFUSED-10M", "NEAREST", "PROBLEMS"]);
    let mut table = vec![header.into_iter().map(str::to_owned).collect::<Vec<_>>()];
    for row in rows {
        let l = &row.limits;
        let mut mode = row.mode().to_owned();
        if wide && !row.exempt {
            mode = format!("{mode} ({})", l.mode.source.label());
        }
        let mut cells = vec![
            row.namespace.clone(),
            mode,
            used_of(row.pods.live, &l.max_pods),
            match row.held {
                Some(held) => format!(
                    "{} +{held} held",
                    used_of(row.pods.pending, &l.max_pending_pods)
                ),
                None => used_of(row.pods.pending, &l.max_pending_pods),
            },
            format!(
                "{} of {} ({})",
                row.pods.created_last_minute,
                rate(l.pod_rate.value.as_ref()),
                l.pod_rate.source.label()
            ),
        ];
        if wide {
            cells.push(format!(
                "{} ({})",
                l.pod_burst.value,
                l.pod_burst.source.label()
            ));
        }
        cells.push(refused(row));
        cells.push(row.nearest().map_or_else(
            || "<none>".to_owned(),
            |n| format!("{} {}%", n.limit, n.percent),
        ));
        cells.push(problems(l, wide));
        table.push(cells);
    }
    columns(&table)
}

fn limit_json<T>(l: &Limit<T>, value: Value) -> Value {
    json!({"value": value, "source": l.source.label()})
}

/// Everything the table says, for scripts.
pub fn json(rows: &[Row], defaults: &Defaults) -> Value {
    let defaults = match &defaults.origin {
        Origin::ConfigMap(from) => json!({"from": from}),
        Origin::Assumed(why) => json!({"from": "built-in", "assumedBecause": why}),
    };
    let namespaces: Vec<Value> = rows
        .iter()
        .map(|row| {
            let l = &row.limits;
            let nearest = row
                .nearest()
                .map(|n| json!({"limit": n.limit, "percent": n.percent}));
            let mut pods = json!({
                "live": row.pods.live,
                "pending": row.pods.pending,
                "createdLastMinute": row.pods.created_last_minute,
            });
            if let Some(held) = row.held {
                pods["held"] = json!(held);
            }
            json!({
                "name": row.namespace,
                "mode": row.mode(),
                "limits": {
                    "mode": limit_json(&l.mode, json!(row.mode())),
                    "maxPods": limit_json(&l.max_pods, json!(l.max_pods.value)),
                    "maxPendingPods": limit_json(&l.max_pending_pods, json!(l.max_pending_pods.value)),
                    "podRate": limit_json(&l.pod_rate, json!(l.pod_rate.value.map(|r| r.to_string()))),
                    "podBurst": limit_json(&l.pod_burst, json!(l.pod_burst.value)),
                },
                "pods": pods,
                "refusalsLast10m": row.refusals,
                "nearest": nearest,
                "problems": l.problems.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"defaults": defaults, "namespaces": namespaces})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        policy::pod::PodRules,
        status::{
            limits::Source,
            usage::{count_event, count_pod},
        },
    };
    use k8s_openapi::{
        api::core::v1::{Event, Pod},
        jiff::Timestamp,
    };

    /// A small cluster as the API server would list it: namespaces, pods, bulwark's Events.
    fn fixture() -> (Vec<Namespace>, Vec<Pod>, Vec<Event>) {
        let ns = |name: &str, ann: Value| -> Namespace {
            serde_json::from_value(json!({"metadata": {"name": name, "annotations": ann}})).unwrap()
        };
        let namespaces = vec![
            ns("quiet", json!({})),
            ns("tiny", json!({"bulwark.io/max-pods": "1"})),
            ns(
                "batch",
                json!({"bulwark.io/max-pending-pods": "20", "bulwark.io/pod-rate": "1/s"}),
            ),
            ns(
                "typo",
                json!({"bulwark.io/pod-burst": "many", "bulwark.io/max-pods": "10"}),
            ),
            ns(
                "relaxed",
                json!({"bulwark.io/mode": "off", "bulwark.io/max-pods": "1"}),
            ),
            ns("kube-system", json!({})),
        ];
        let pod = |ns: &str, phase: &str, created: &str| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": "p", "namespace": ns, "creationTimestamp": created},
                "status": {"phase": phase},
            }))
            .unwrap()
        };
        let mut pods = vec![
            pod("tiny", "Running", "2026-03-01T09:00:00Z"),
            pod("typo", "Running", "2026-03-01T09:00:00Z"),
            pod("typo", "Running", "2026-03-01T09:00:00Z"),
            pod("relaxed", "Running", "2026-03-01T09:00:00Z"),
            pod("relaxed", "Running", "2026-03-01T09:00:00Z"),
            pod("kube-system", "Pending", "2026-03-01T09:59:00Z"),
        ];
        // batch: 30 created in the last minute (half of its 1/s), 9 of them still pending.
        for i in 0..30 {
            let phase = if i < 9 { "Pending" } else { "Succeeded" };
            pods.push(pod(
                "batch",
                phase,
                &format!("2026-03-01T09:59:{:02}Z", i + 20),
            ));
        }
        let event = |ns: &str, at: &str, counts: &str| -> Event {
            serde_json::from_value(json!({
                "metadata": {"name": "e", "namespace": ns, "annotations": {"bulwark.io/refusals": counts}},
                "involvedObject": {"apiVersion": "v1", "kind": "Namespace", "name": ns, "namespace": ns},
                "reason": "Throttled",
                "reportingComponent": "bulwark-webhook",
                "eventTime": at,
            }))
            .unwrap()
        };
        let events = vec![
            event("batch", "2026-03-01T09:58:00Z", "max_pending=151,rate=2"),
            event("batch", "2026-03-01T09:59:00Z", "max_pending=2"),
            event("tiny", "2026-03-01T09:59:30Z", "max_pods=11"),
        ];
        (namespaces, pods, events)
    }

    fn status(events_readable: bool) -> (Defaults, Vec<Row>) {
        let now: Timestamp = "2026-03-01T10:00:00Z".parse().unwrap();
        let defaults = Defaults::from_config(
            "defaults:\n  maxPendingPods: 50\n",
            "bulwark-system/bulwark-config",
        )
        .unwrap();
        let (namespaces, pods, events) = fixture();
        let mut tallies = BTreeMap::new();
        for p in &pods {
            count_pod(&mut tallies, p, &PodRules::default(), now);
        }
        let mut refusals = BTreeMap::new();
        for e in &events {
            count_event(&mut refusals, e, now);
        }
        let rows = rows(
            &defaults,
            "bulwark-system",
            &namespaces,
            &tallies,
            events_readable.then_some(&refusals),
        );
        (defaults, rows)
    }

    #[test]
    fn the_table_from_namespaces_pods_and_events() {
        let (_, rows) = status(true);
        let order: Vec<&str> = rows.iter().map(|r| r.namespace.as_str()).collect();
        // tiny at 100% of max-pods, batch at 50% of its rate (45% of its pending cap), typo
        // 20% of max-pods, quiet at 0%; mode off and exempt namespaces limit nothing.
        assert_eq!(
            order,
            ["tiny", "batch", "typo", "quiet", "kube-system", "relaxed"]
        );
        let text = text(&rows, false);
        let expected = "\
NAMESPACE     MODE      LIVE/MAX-PODS       PENDING/MAX-PENDING   CREATED-1M/POD-RATE      REFUSED-10M               NEAREST         PROBLEMS
tiny          enforce   1/1 (annotation)    0/50 (config)         0 of 20/s (built-in)     11 max-pods               max-pods 100%   <none>
batch         enforce   9/3000 (built-in)   9/20 (annotation)     30 of 1/s (annotation)   153 max-pending, 2 rate   pod-rate 50%    <none>
typo          enforce   2/10 (annotation)   0/50 (config)         0 of 20/s (built-in)     0                         max-pods 20%    bulwark.io/pod-burst=\"many\"
quiet         enforce   0/3000 (built-in)   0/50 (config)         0 of 20/s (built-in)     0                         max-pods 0%     <none>
kube-system   exempt    1/3000 (built-in)   1/50 (config)         0 of 20/s (built-in)     0                         <none>          <none>
relaxed       off       2/1 (annotation)    0/50 (config)         0 of 20/s (built-in)     0                         <none>          <none>
";
        assert_eq!(text, expected, "\n{text}");
    }

    #[test]
    fn wide_says_more_and_json_says_everything() {
        let (defaults, rows) = status(true);
        let wide = text(&rows, true);
        let typo = wide.lines().find(|l| l.starts_with("typo")).unwrap();
        assert!(typo.contains("enforce (built-in)"), "{typo}");
        assert!(
            typo.contains("100 (invalid annotation, built-in)"),
            "{typo}"
        );
        assert!(
            typo.ends_with(
                "annotation bulwark.io/pod-burst=\"many\" is invalid: expected a whole number from 1 to 1000000; using the default"
            ),
            "{typo}"
        );
        let j = json(&rows, &defaults);
        assert_eq!(j["defaults"]["from"], "bulwark-system/bulwark-config");
        let batch = &j["namespaces"][1];
        assert_eq!(batch["name"], "batch");
        assert_eq!(
            batch["limits"]["maxPendingPods"],
            json!({"value": 20, "source": "annotation"})
        );
        assert_eq!(
            batch["limits"]["maxPods"],
            json!({"value": 3000, "source": "built-in"})
        );
        assert_eq!(
            batch["limits"]["podRate"],
            json!({"value": "1/s", "source": "annotation"})
        );
        assert_eq!(
            batch["pods"],
            json!({"live": 9, "pending": 9, "createdLastMinute": 30})
        );
        assert_eq!(
            batch["refusalsLast10m"],
            json!({"max_pending": 153, "rate": 2})
        );
        assert_eq!(
            batch["nearest"],
            json!({"limit": "pod-rate", "percent": 50})
        );
        assert!(j["namespaces"][5]["nearest"].is_null());
    }

    #[test]
    fn unreadable_events_leave_the_refusals_unknown() {
        let (_, rows) = status(false);
        assert!(rows.iter().all(|r| r.refusals.is_none()));
        let text = text(&rows, false);
        assert!(text.lines().nth(1).unwrap().contains("<unknown>"), "{text}");
        // Without refusals to weigh, equals sort by name.
        let order: Vec<&str> = rows.iter().map(|r| r.namespace.as_str()).collect();
        assert_eq!(
            order,
            ["tiny", "batch", "typo", "quiet", "kube-system", "relaxed"]
        );
    }

    #[test]
    fn limits_at_zero_and_unlimited() {
        let row = |max_pods: Option<u32>, live: u32| Row {
            namespace: "n".into(),
            exempt: false,
            limits: Limits {
                max_pods: Limit {
                    value: max_pods,
                    source: Source::Annotation,
                },
                max_pending_pods: Limit {
                    value: None,
                    source: Source::Annotation,
                },
                pod_rate: Limit {
                    value: None,
                    source: Source::Annotation,
                },
                ..limits(&Defaults::built_in("test"), None)
            },
            pods: PodTally {
                live,
                ..PodTally::default()
            },
            held: None,
            refusals: Some(Refusals::new()),
        };
        assert_eq!(
            row(Some(0), 0).nearest(),
            Some(Nearest {
                limit: "max-pods",
                percent: 100
            })
        );
        assert_eq!(row(None, 5).nearest(), None, "nothing is limited");
        let text = text(&[row(None, 5)], false);
        assert!(text.contains("5/unlimited (annotation)"), "{text}");
        assert!(text.contains("0 of unlimited (annotation)"), "{text}");
    }
}
