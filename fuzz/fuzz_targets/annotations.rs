//! Any annotations: the policy parser never panics, reports each invalid knob once, and a
//! quantity that parses prints as text that parses back to the same amount.
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use bulwark::policy::{
    Policy,
    quantity::{Cpu, Memory},
};
use libfuzzer_sys::fuzz_target;

const KEYS: [&str; 8] = [
    "bulwark.io/mode",
    "bulwark.io/pod-rate",
    "bulwark.io/pod-burst",
    "bulwark.io/max-pods",
    "bulwark.io/max-pending-pods",
    "bulwark.io/default-requests",
    "bulwark.io/default-limits",
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
    let (policy, problems) = Policy::from_annotations(&Policy::default(), Some(&annotations));
    assert!(problems.len() <= annotations.len());
    for p in &problems {
        assert_eq!(annotations.get(p.annotation), Some(&p.value));
        assert!(!p.to_string().is_empty());
    }
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
