//! One full review decision (decode, decide, encode) for both webhooks, next to a baseline
//! that only parses and re-serialises the same body as untyped JSON: the floor any JSON
//! webhook pays. The ratio of the two is what the README reports.

use std::{hint::black_box, time::Instant};

use bulwark::{config::Config, review::fixtures::Fixture, serve::http::Endpoint, webhook::Webhook};
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::Value;

/// A realistic Job pod of about 3 KiB (tests/data/job-pod-create.json), in one of 50
/// namespaces.
fn review(i: usize) -> Vec<u8> {
    Fixture::job_pod_create()
        .uid(&format!("0c9a8d74-9cb7-44dd-b98e-{i:012}"))
        .namespace(&format!("ci-{}", i % 50))
        .bytes()
}

fn bench(c: &mut Criterion) {
    let config = Config::parse(
        "defaults:\n  podRate: unlimited\n  maxPods: unlimited\n  maxPendingPods: unlimited\ncluster:\n  maxPendingPods: unlimited\n",
        "bench",
    )
    .expect("config");
    let webhook = Webhook::new(config.webhook, true);
    let bodies: Vec<Vec<u8>> = (0..256).map(review).collect();
    let mut group = c.benchmark_group("review");
    group.bench_function("baseline: parse + serialise as untyped JSON", |b| {
        let mut i = 0;
        b.iter(|| {
            i += 1;
            let v: Value = serde_json::from_slice(&bodies[i % bodies.len()]).expect("json");
            black_box(serde_json::to_vec(&v["request"]["uid"]).expect("json"))
        })
    });
    for (name, endpoint) in [
        (
            "validate: decode + quota decision + encode",
            Endpoint::Validate,
        ),
        ("mutate: decode + defaults patch + encode", Endpoint::Mutate),
    ] {
        group.bench_function(name, |b| {
            let mut i = 0;
            b.iter(|| {
                i += 1;
                let answer = webhook.answer(endpoint, &bodies[i % bodies.len()], Instant::now());
                black_box(answer.expect("decodes"))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
