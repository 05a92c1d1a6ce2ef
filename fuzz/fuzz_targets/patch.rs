//! Any pod and namespace defaults: the patch applies, the patched pod parses, every quantity
//! bulwark wrote keeps limits >= requests, and defaulting the patched pod again changes nothing.
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use bulwark::{
    policy::{
        ResourceDefaults,
        quantity::{Cpu, Memory},
    },
    review::defaults::mutate,
};
use k8s_openapi::{
    api::core::v1::{Container, Pod, PodSpec, ResourceRequirements},
    apimachinery::pkg::api::resource::Quantity,
};
use libfuzzer_sys::fuzz_target;

const QUANTITIES: [&str; 10] = [
    "0", "1", "100m", "250m", "2", "64Mi", "1Gi", "1.5", "1e3", "bad",
];

#[derive(Debug, Arbitrary)]
enum Q {
    Known(u8),
    Any(String),
}

impl Q {
    fn text(&self) -> String {
        match self {
            Q::Known(i) => QUANTITIES[usize::from(*i) % QUANTITIES.len()].to_owned(),
            Q::Any(s) => s.clone(),
        }
    }
}

#[derive(Debug, Arbitrary)]
struct C {
    name: String,
    resources: Option<(Option<Vec<(bool, Q)>>, Option<Vec<(bool, Q)>>)>,
}

#[derive(Debug, Arbitrary)]
struct Input {
    containers: Vec<C>,
    init: Vec<C>,
    annotations: bool,
    requests: (Option<u32>, Option<u32>),
    limits: (Option<u32>, Option<u32>),
}

fn map(items: &Option<Vec<(bool, Q)>>) -> Option<BTreeMap<String, Quantity>> {
    items.as_ref().map(|items| {
        items
            .iter()
            .map(|(cpu, q)| {
                (
                    (if *cpu { "cpu" } else { "memory" }).to_owned(),
                    Quantity(q.text()),
                )
            })
            .collect()
    })
}

fn container(c: &C) -> Container {
    Container {
        name: c.name.clone(),
        resources: c.resources.as_ref().map(|(req, lim)| ResourceRequirements {
            requests: map(req),
            limits: map(lim),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn defaults((cpu, memory): (Option<u32>, Option<u32>)) -> ResourceDefaults {
    ResourceDefaults {
        cpu: cpu.map(|m| Cpu(u64::from(m))),
        memory: memory.map(|b| Memory(u64::from(b) * 1024)),
    }
}

fn get<'a>(m: Option<&'a BTreeMap<String, Quantity>>, key: &str) -> Option<&'a str> {
    m.and_then(|m| m.get(key)).map(|q| q.0.as_str())
}

fuzz_target!(|input: Input| {
    let mut pod = Pod {
        spec: Some(PodSpec {
            containers: input.containers.iter().map(container).collect(),
            init_containers: Some(input.init.iter().map(container).collect()),
            ..Default::default()
        }),
        ..Default::default()
    };
    if input.annotations {
        pod.metadata.annotations = Some(BTreeMap::from([("a".to_owned(), "b".to_owned())]));
    }
    let (requests, limits) = (defaults(input.requests), defaults(input.limits));
    let m = mutate(&pod, &requests, &limits);
    let touched: Vec<String> = m.changed.iter().map(|(name, _)| name.clone()).collect();
    let patch = m.into_patch(&pod);
    let mut doc = serde_json::to_value(&pod).expect("pod serialises");
    json_patch::patch(&mut doc, &patch).expect("the patch applies to the pod it was made for");
    let patched: Pod = serde_json::from_value(doc).expect("the patched pod parses");

    let spec = patched.spec.as_ref().expect("spec kept");
    let all = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| (format!("init:{}", c.name), c));
    let all = all.chain(spec.containers.iter().map(|c| (c.name.clone(), c)));
    for (name, c) in all {
        let r = c.resources.as_ref();
        let (req, lim) = (
            r.and_then(|r| r.requests.as_ref()),
            r.and_then(|r| r.limits.as_ref()),
        );
        if !touched.contains(&name) {
            continue;
        }
        if let (Some(Ok(q)), Some(Ok(l))) = (
            get(req, "cpu").map(Cpu::parse),
            get(lim, "cpu").map(Cpu::parse),
        ) {
            assert!(
                l >= q || before_had_both(&pod, &name, "cpu"),
                "{name}: cpu limit {l} < request {q}"
            );
        }
        if let (Some(Ok(q)), Some(Ok(l))) = (
            get(req, "memory").map(Memory::parse),
            get(lim, "memory").map(Memory::parse),
        ) {
            assert!(
                l >= q || before_had_both(&pod, &name, "memory"),
                "{name}: memory limit {l} < request {q}"
            );
        }
    }
    assert!(
        mutate(&patched, &requests, &limits).is_empty(),
        "defaulting twice changed something"
    );
});

/// The user set both (possibly request > limit, which the API server rejects): not bulwark's.
fn before_had_both(pod: &Pod, name: &str, key: &str) -> bool {
    let spec = pod.spec.as_ref().expect("spec");
    let all = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| (format!("init:{}", c.name), c));
    let mut all = all.chain(spec.containers.iter().map(|c| (c.name.clone(), c)));
    all.any(|(n, c)| {
        let r = c.resources.as_ref();
        n == name
            && get(r.and_then(|r| r.requests.as_ref()), key).is_some()
            && get(r.and_then(|r| r.limits.as_ref()), key).is_some()
    })
}
