//! Any annotations: the policy parser never panics; every knob whose value is invalid is
//! reported once, by its annotation and value, and keeps the default; every valid one is
//! applied, whatever the other annotations hold; nothing else is reported. A quantity that
//! parses prints as text that parses back to the same amount.
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use bulwark::policy::{
    KNOBS, Policy,
    quantity::{Cpu, Memory},
};
use libfuzzer_sys::fuzz_target;

const KEYS: [&str; 9] = [
    "bulwark.io/mode",
    "bulwark.io/pod-rate",
    "bulwark.io/pod-burst",
    "bulwark.io/max-pods",
    "bulwark.io/max-pending-pods",
    "bulwark.io/default-requests",
    "bulwark.io/default-limits",
    "bulwark.io/pending-action",
    "bulwark.io/other",
];

#[derive(Debug, Arbitrary)]
struct Input {
    values: Vec<(u8, String)>,
    quantity: String,
}

fuzz_target!(|input: Input| {
    let annotations: BTreeMap<String, String> = input
        .values
        .into_iter()
        .map(|(k, v)| (KEYS[usize::from(k) % KEYS.len()].to_owned(), v))
        .collect();
    let defaults = Policy::default();
    let (policy, problems) = Policy::from_annotations(&defaults, Some(&annotations));
    for p in &problems {
        assert_eq!(annotations.get(p.annotation), Some(&p.value));
        assert!(p.to_string().contains(p.annotation), "{p}");
    }
    // Each knob on its own: a fresh default policy with only that knob set must agree with the
    // combined policy on that knob, so no annotation affects another's outcome.
    for (knob, annotation, _) in KNOBS {
        let reported = problems
            .iter()
            .filter(|p| p.annotation == annotation)
            .count();
        let Some(value) = annotations.get(annotation) else {
            assert_eq!(reported, 0, "{annotation} reported without being set");
            continue;
        };
        let mut alone = defaults.clone();
        match alone.set(knob, value) {
            Ok(()) => assert_eq!(reported, 0, "valid {annotation}={value:?} reported"),
            Err(_) => {
                assert_eq!(
                    reported, 1,
                    "invalid {annotation}={value:?} reported {reported} times"
                );
                assert_eq!(alone, defaults, "a refused value changed the policy");
            }
        }
        let mut combined_knob = defaults.clone();
        let mut alone_knob = defaults.clone();
        // Copy the one knob from each policy onto the defaults and compare.
        copy_knob(&mut combined_knob, &policy, knob);
        copy_knob(&mut alone_knob, &alone, knob);
        assert_eq!(combined_knob, alone_knob, "{annotation}={value:?}");
    }
    // Unknown bulwark.io/ annotations are neither knobs nor problems.
    assert!(problems.iter().all(|p| p.annotation != "bulwark.io/other"));
    // Whatever was accepted is usable: a burst of zero would refuse every pod.
    if policy.rate.is_some() {
        assert!(policy.burst >= 1, "{policy:?}");
    }
    if let Ok(cpu) = Cpu::parse(&input.quantity) {
        assert_eq!(
            Cpu::parse(&cpu.to_string()),
            Ok(cpu),
            "{:?}",
            input.quantity
        );
    }
    if let Ok(memory) = Memory::parse(&input.quantity) {
        assert_eq!(
            Memory::parse(&memory.to_string()),
            Ok(memory),
            "{:?}",
            input.quantity
        );
    }
});

/// `into` with `knob` taken from `from`.
fn copy_knob(into: &mut Policy, from: &Policy, knob: bulwark::policy::Knob) {
    use bulwark::policy::Knob;
    match knob {
        Knob::Mode => into.mode = from.mode,
        Knob::PodRate => into.rate = from.rate,
        Knob::PodBurst => into.burst = from.burst,
        Knob::MaxPods => into.max_pods = from.max_pods,
        Knob::MaxPendingPods => into.max_pending_pods = from.max_pending_pods,
        Knob::DefaultRequests => into.default_requests = from.default_requests,
        Knob::DefaultLimits => into.default_limits = from.default_limits,
        Knob::PendingAction => into.pending_action = from.pending_action,
    }
}
