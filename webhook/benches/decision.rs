//! One full review decision (decode, decide, encode) for both webhooks, next to a baseline
//! that only parses and re-serialises the same body as untyped JSON: the floor any JSON
//! webhook pays. The ratio of the two is what the README reports.

use std::{hint::black_box, sync::Arc, time::Instant};

use bulwark::{admission, config::Config, server::App};
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};

fn review(i: usize) -> Vec<u8> {
    // A realistic Job pod of about 3 KiB, as kube-apiserver sends it after defaulting.
    let env: Vec<Value> = (0..12)
        .map(|n| json!({"name": format!("VAR_{n}"), "value": format!("value-{n}-{}", "x".repeat(40))}))
        .collect();
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": format!("0c9a8d74-9cb7-44dd-b98e-{i:012}"),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": format!("ci-{}", i % 50),
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:job-controller", "groups": ["system:serviceaccounts"]},
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "generateName": "build-7-", "namespace": format!("ci-{}", i % 50),
                    "labels": {"batch.kubernetes.io/job-name": "build-7", "bulwark.io/workflow": "wf-7", "controller-uid": "4f1c"},
                    "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "build-7", "uid": "4f1c", "controller": true, "blockOwnerDeletion": true}]
                },
                "spec": {
                    "containers": [{
                        "name": "build", "image": "registry.example.com/ci/builder:1.2.3",
                        "command": ["/bin/sh", "-c", "make test"], "env": env,
                        "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
                        "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"
                    }],
                    "restartPolicy": "Never", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
                    "serviceAccountName": "default", "schedulerName": "default-scheduler", "priority": 0,
                    "tolerations": [
                        {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
                    ],
                    "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}]}}]
                },
                "status": {}
            },
            "dryRun": false
        }
    }))
    .expect("review serialises")
}

fn bench(c: &mut Criterion) {
    let config = Config::parse(
        "defaults:\n  podRate: unlimited\n  maxPods: unlimited\n  maxPendingPods: unlimited\ncluster:\n  maxPendingPods: unlimited\n",
        "bench",
    )
    .expect("config");
    let app = App::new(Arc::new(config), true);
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
    group.bench_function("validate: decode + quota decision + encode", |b| {
        let mut i = 0;
        b.iter(|| {
            i += 1;
            let r = admission::decode(&bodies[i % bodies.len()]).expect("decodes");
            let (resp, _) = app.admitter.validate(&r, Instant::now());
            black_box(admission::encode(resp))
        })
    });
    group.bench_function("mutate: decode + defaults patch + encode", |b| {
        let mut i = 0;
        b.iter(|| {
            i += 1;
            let r = admission::decode(&bodies[i % bodies.len()]).expect("decodes");
            let (resp, _) = app.admitter.mutate(&r);
            black_box(admission::encode(resp))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
