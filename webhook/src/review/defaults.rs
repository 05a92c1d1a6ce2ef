//! Mutation: default CPU/memory requests and limits for every container and init container
//! that lacks them, as a JSONPatch. The result is always a valid pod: a defaulted request
//! never exceeds the container's limit and a defaulted limit never falls below its request.

use std::collections::BTreeMap;

use json_patch::{AddOperation, Patch, PatchOperation, jsonptr::PointerBuf};
use k8s_openapi::{
    api::core::v1::{Container, Pod, ResourceRequirements},
    apimachinery::pkg::api::resource::Quantity,
};
use serde_json::{Map, Value};

use crate::{
    policy::ResourceDefaults,
    policy::quantity::{Cpu, Memory},
};

pub const DEFAULTED_ANNOTATION: &str = "bulwark.io/defaulted";

/// Warnings beyond this many are summarised: clients print each one.
const MAX_WARNINGS: usize = 5;

/// What the mutation set, for the patch, the annotation and the warnings.
#[derive(Debug, Default, PartialEq)]
pub struct Mutation {
    pub patch: Vec<PatchOperation>,
    /// One entry per container that was changed: (`init:`-prefixed name, what was set).
    pub changed: Vec<(String, Vec<(&'static str, String)>)>,
}

impl Mutation {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty()
    }

    /// The value of the `bulwark.io/defaulted` annotation:
    /// `app: requests.cpu=100m,limits.memory=512Mi; init:setup: requests.cpu=100m`.
    pub fn annotation(&self) -> String {
        let mut out = String::with_capacity(64 * self.changed.len());
        for (i, (name, items)) in self.changed.iter().enumerate() {
            if i > 0 {
                out.push_str("; ");
            }
            out.push_str(name);
            out.push_str(": ");
            push_items(&mut out, items);
        }
        out
    }

    pub fn warnings(&self, namespace: &str) -> Vec<String> {
        // Built by hand: `format!` was a third of what a mutation cost (callgrind).
        let mut out: Vec<String> = self
            .changed
            .iter()
            .take(MAX_WARNINGS)
            .map(|(name, items)| {
                let mut w = String::with_capacity(96 + namespace.len());
                w.push_str("bulwark: container \"");
                push_escaped(&mut w, name);
                w.push_str("\": set ");
                push_items(&mut w, items);
                w.push_str(" (defaults of namespace \"");
                push_escaped(&mut w, namespace);
                w.push_str("\")");
                w
            })
            .collect();
        if self.changed.len() > MAX_WARNINGS {
            out.push(format!(
                "bulwark: {} more containers defaulted; see annotation {DEFAULTED_ANNOTATION}",
                self.changed.len() - MAX_WARNINGS
            ));
        }
        out
    }

    /// The whole JSONPatch, the annotation included.
    pub fn into_patch(mut self, pod: &Pod) -> Patch {
        if self.is_empty() {
            return Patch(Vec::new());
        }
        let value = Value::String(self.annotation());
        let op = if pod.metadata.annotations.is_some() {
            add(
                PointerBuf::from_tokens(["metadata", "annotations", DEFAULTED_ANNOTATION]),
                value,
            )
        } else {
            add(
                PointerBuf::from_tokens(["metadata", "annotations"]),
                Value::Object(Map::from_iter([(DEFAULTED_ANNOTATION.to_owned(), value)])),
            )
        };
        self.patch.push(op);
        Patch(self.patch)
    }
}

/// `requests.cpu=100m,limits.memory=512Mi`.
fn push_items(out: &mut String, items: &[(&'static str, String)]) {
    for (i, (k, v)) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
}

/// `s` as `{:?}` writes it between its quotes: printable ASCII as it is, anything else
/// through Debug, so every name reads as it always has.
fn push_escaped(out: &mut String, s: &str) {
    if s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.push_str(s);
    } else {
        let quoted = format!("{s:?}");
        out.push_str(&quoted[1..quoted.len() - 1]);
    }
}

fn add(path: PointerBuf, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path, value })
}

/// Computes the defaults for every container and init container of `pod`.
pub fn mutate(pod: &Pod, requests: &ResourceDefaults, limits: &ResourceDefaults) -> Mutation {
    let mut m = Mutation::default();
    let Some(spec) = &pod.spec else {
        return m;
    };
    let lists: [(&str, &str, &[Container]); 2] = [
        (
            "initContainers",
            "init:",
            spec.init_containers.as_deref().unwrap_or_default(),
        ),
        ("containers", "", &spec.containers),
    ];
    for (list, prefix, containers) in lists {
        for (i, c) in containers.iter().enumerate() {
            let base = PointerBuf::from_tokens(["spec", list, &i.to_string()]);
            if let Some(items) = default_container(&mut m.patch, base, c, requests, limits) {
                m.changed.push((format!("{prefix}{}", c.name), items));
            }
        }
    }
    m
}

/// The values to add to one container; `None` when it already has everything.
fn plan(
    resources: Option<&ResourceRequirements>,
    requests: &ResourceDefaults,
    limits: &ResourceDefaults,
) -> (
    BTreeMap<&'static str, String>,
    BTreeMap<&'static str, String>,
) {
    fn get<'a>(map: Option<&'a BTreeMap<String, Quantity>>, key: &str) -> Option<&'a str> {
        map.and_then(|m| m.get(key)).map(|q| q.0.as_str())
    }
    let have_req = resources.and_then(|r| r.requests.as_ref());
    let have_lim = resources.and_then(|r| r.limits.as_ref());
    let mut add_req = BTreeMap::new();
    let mut add_lim = BTreeMap::new();

    // An existing quantity that does not parse is left alone and treated as present: the API
    // server validated it, and guessing around it could produce an invalid pod.
    macro_rules! resource {
        ($key:literal, $ty:ty, $field:ident) => {{
            let req = get(have_req, $key).map(<$ty>::parse);
            let lim = get(have_lim, $key).map(<$ty>::parse);
            let mut effective_req = req.clone().and_then(Result::ok);
            if req.is_none()
                && let Some(default) = requests.$field
            {
                let value = match &lim {
                    Some(Ok(l)) => default.min(*l),
                    _ => default,
                };
                effective_req = Some(value);
                add_req.insert($key, value.to_string());
            }
            if lim.is_none()
                && let Some(default) = limits.$field
            {
                let value = effective_req.map_or(default, |r| default.max(r));
                add_lim.insert($key, value.to_string());
            }
        }};
    }
    resource!("cpu", Cpu, cpu);
    resource!("memory", Memory, memory);
    (add_req, add_lim)
}

fn default_container(
    patch: &mut Vec<PatchOperation>,
    base: PointerBuf,
    c: &Container,
    requests: &ResourceDefaults,
    limits: &ResourceDefaults,
) -> Option<Vec<(&'static str, String)>> {
    let resources = c.resources.as_ref();
    let (add_req, add_lim) = plan(resources, requests, limits);
    if add_req.is_empty() && add_lim.is_empty() {
        return None;
    }
    let to_object = |m: &BTreeMap<&'static str, String>| {
        Value::Object(
            m.iter()
                .map(|(k, v)| ((*k).to_owned(), Value::String(v.clone())))
                .collect(),
        )
    };
    let res_path = base.with_trailing_token("resources");
    match resources {
        None => {
            let mut obj = Map::new();
            if !add_req.is_empty() {
                obj.insert("requests".into(), to_object(&add_req));
            }
            if !add_lim.is_empty() {
                obj.insert("limits".into(), to_object(&add_lim));
            }
            patch.push(add(res_path, Value::Object(obj)));
        }
        Some(r) => {
            for (field, existing, adds) in [
                ("requests", r.requests.is_some(), &add_req),
                ("limits", r.limits.is_some(), &add_lim),
            ] {
                if adds.is_empty() {
                    continue;
                }
                let field_path = res_path.with_trailing_token(field);
                if existing {
                    for (k, v) in adds {
                        patch.push(add(
                            field_path.with_trailing_token(*k),
                            Value::String(v.clone()),
                        ));
                    }
                } else {
                    patch.push(add(field_path, to_object(adds)));
                }
            }
        }
    }
    let mut items: Vec<(&'static str, String)> = Vec::new();
    for (k, v) in &add_req {
        items.push((
            if *k == "cpu" {
                "requests.cpu"
            } else {
                "requests.memory"
            },
            v.clone(),
        ));
    }
    for (k, v) in &add_lim {
        items.push((
            if *k == "cpu" {
                "limits.cpu"
            } else {
                "limits.memory"
            },
            v.clone(),
        ));
    }
    Some(items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_resources;
    use serde_json::json;

    fn defaults() -> (ResourceDefaults, ResourceDefaults) {
        (
            parse_resources("cpu=100m,memory=128Mi").unwrap(),
            parse_resources("cpu=1,memory=512Mi").unwrap(),
        )
    }

    /// Applies the mutation and returns the resulting pod, which must still parse.
    fn apply(pod: Value) -> (Pod, Mutation) {
        let typed: Pod = serde_json::from_value(pod.clone()).unwrap();
        let (req, lim) = defaults();
        let m = mutate(&typed, &req, &lim);
        let shown = Mutation {
            patch: Vec::new(),
            changed: m.changed.clone(),
        };
        let patch = m.into_patch(&typed);
        let mut doc = pod;
        json_patch::patch(&mut doc, &patch).unwrap();
        (
            serde_json::from_value(doc).expect("patched pod parses"),
            shown,
        )
    }

    fn resources(
        pod: &Pod,
        init: bool,
        i: usize,
    ) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
        let spec = pod.spec.as_ref().unwrap();
        let c = if init {
            &spec.init_containers.as_ref().unwrap()[i]
        } else {
            &spec.containers[i]
        };
        let r = c.resources.clone().unwrap_or_default();
        let flat = |m: Option<BTreeMap<String, Quantity>>| {
            m.unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect()
        };
        (flat(r.requests), flat(r.limits))
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn no_resources_gets_everything() {
        let (pod, m) = apply(json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "app", "image": "x"}]}
        }));
        assert_eq!(
            resources(&pod, false, 0),
            (
                map(&[("cpu", "100m"), ("memory", "128Mi")]),
                map(&[("cpu", "1"), ("memory", "512Mi")])
            )
        );
        assert_eq!(
            pod.metadata.annotations.unwrap()[DEFAULTED_ANNOTATION],
            "app: requests.cpu=100m,requests.memory=128Mi,limits.cpu=1,limits.memory=512Mi"
        );
        assert_eq!(m.warnings("ci").len(), 1);
        assert_eq!(
            m.warnings("ci")[0],
            "bulwark: container \"app\": set requests.cpu=100m,requests.memory=128Mi,limits.cpu=1,limits.memory=512Mi (defaults of namespace \"ci\")"
        );
    }

    #[test]
    fn partial_resources_are_completed_and_kept_valid() {
        let (pod, _) = apply(json!({
            "metadata": {"name": "p", "annotations": {"keep": "me"}},
            "spec": {"containers": [
                // A limit below the default request: the request follows the limit.
                {"name": "small", "resources": {"limits": {"cpu": "50m"}}},
                // A request above the default limit: the limit follows the request.
                {"name": "big", "resources": {"requests": {"memory": "2Gi"}}},
                // Complete already: untouched.
                {"name": "done", "resources": {
                    "requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "1Gi"}}},
                {"name": "empty", "resources": {}}
            ]}
        }));
        assert_eq!(
            resources(&pod, false, 0),
            (
                map(&[("cpu", "50m"), ("memory", "128Mi")]),
                map(&[("cpu", "50m"), ("memory", "512Mi")])
            )
        );
        assert_eq!(
            resources(&pod, false, 1),
            (
                map(&[("cpu", "100m"), ("memory", "2Gi")]),
                map(&[("cpu", "1"), ("memory", "2Gi")])
            )
        );
        assert_eq!(
            resources(&pod, false, 2),
            (
                map(&[("cpu", "1"), ("memory", "1Gi")]),
                map(&[("cpu", "2"), ("memory", "1Gi")])
            )
        );
        assert_eq!(resources(&pod, false, 3).0.len(), 2);
        let ann = pod.metadata.annotations.unwrap();
        assert_eq!(ann["keep"], "me");
        assert!(!ann[DEFAULTED_ANNOTATION].contains("done"));
    }

    #[test]
    fn init_containers_and_many_containers() {
        let containers: Vec<Value> = (0..40).map(|i| json!({"name": format!("c{i}")})).collect();
        let (pod, m) = apply(json!({
            "metadata": {"name": "p"},
            "spec": {
                "initContainers": [{"name": "setup"}],
                "containers": containers
            }
        }));
        assert_eq!(resources(&pod, true, 0).0["cpu"], "100m");
        for i in 0..40 {
            assert_eq!(
                resources(&pod, false, i).1["memory"],
                "512Mi",
                "container {i}"
            );
        }
        assert!(
            pod.metadata.annotations.unwrap()[DEFAULTED_ANNOTATION].starts_with("init:setup: ")
        );
        let w = m.warnings("ci");
        assert_eq!(w.len(), MAX_WARNINGS + 1);
        assert!(w[MAX_WARNINGS].contains("36 more containers"));
    }

    #[test]
    fn nothing_to_do_is_an_empty_patch() {
        let pod: Pod = serde_json::from_value(json!({"spec": {"containers": [
            {"name": "a", "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}}}
        ]}}))
        .unwrap();
        let (req, lim) = defaults();
        let m = mutate(&pod, &req, &lim);
        assert!(m.is_empty());
        assert!(m.into_patch(&pod).0.is_empty());
        let none = ResourceDefaults::default();
        let bare: Pod =
            serde_json::from_value(json!({"spec": {"containers": [{"name": "a"}]}})).unwrap();
        assert!(mutate(&bare, &none, &none).is_empty());
    }

    #[test]
    fn applying_twice_changes_nothing() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app"}]}});
        let (once, _) = apply(pod);
        let (req, lim) = defaults();
        assert!(mutate(&once, &req, &lim).is_empty());
    }

    #[test]
    fn warnings_quote_names_as_debug_does() {
        let m = Mutation {
            patch: Vec::new(),
            changed: vec![
                ("plain-1".into(), vec![("requests.cpu", "100m".into())]),
                (
                    "odd\"name\\é\u{7}".into(),
                    vec![("limits.memory", "1Gi".into())],
                ),
            ],
        };
        for (w, (name, items)) in m.warnings("ns\"x").iter().zip(&m.changed) {
            let items: Vec<String> = items.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let want = format!(
                "bulwark: container {name:?}: set {} (defaults of namespace {:?})",
                items.join(","),
                "ns\"x"
            );
            assert_eq!(w, &want);
        }
        assert_eq!(
            m.annotation(),
            "plain-1: requests.cpu=100m; odd\"name\\é\u{7}: limits.memory=1Gi"
        );
    }
}
