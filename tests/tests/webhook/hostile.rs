//! Hostile and odd reviews of the right shape, each with the bounded answer it must get: a 400
//! where the pod cannot be read or the body is over the limit, else an ordinary answer that
//! leaves what the user wrote to the API server's own validation. The server stays healthy
//! throughout. The tables run through `support::answers_are_bounded`.

use serde_json::{Value, json};

use crate::support::*;

/// Reviews of odd pods (wrong types, absurd quantities, huge or odd names, many containers,
/// deep nesting in an unknown field) and of other kinds and operations.
#[tokio::test]
async fn odd_pods_and_other_kinds_get_bounded_answers() {
    let good = good_review();
    let mut no_object = good.clone();
    no_object["request"]["object"] = Value::Null;
    let mut containers_number = good.clone();
    containers_number["request"]["object"]["spec"]["containers"] = json!(5);
    let deep_object = {
        let mut v = good.clone();
        v["request"]["object"]["metadata"]["annotations"] = Value::Null;
        let mut text = String::from_utf8(bytes(&v)).expect("utf8");
        let nest = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        text = text.replace(
            "\"annotations\":null",
            &format!("\"annotations\":null,\"x-unknown\":{nest}"),
        );
        text.into_bytes()
    };
    let many_containers = {
        let mut p = pod("p", "ci");
        p["spec"]["containers"] = Value::Array(
            (0..5000)
                .map(|i| json!({"name": format!("c{i}"), "image": "i"}))
                .collect(),
        );
        bytes(&pod_review("u-hostile", "ci", p, false))
    };
    let long_name = bytes(&pod_review(
        "u-hostile",
        "ci",
        pod(&"n".repeat(100_000), "ci"),
        false,
    ));
    let mut configmap_as_pod = good.clone();
    configmap_as_pod["request"]["object"] =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}});
    let mut connect = good.clone();
    connect["request"]["operation"] = json!("CONNECT");
    let nul_name = bytes(&pod_review("u-hostile", "ci", pod("a\u{0}b", "ci"), false));
    let cases: Vec<HostileCase> = vec![
        (
            "5000-deep nesting in an unknown pod field is skipped",
            "mutate",
            deep_object.clone(),
            200,
            "\"allowed\":true",
        ),
        (
            "containers is a number",
            "mutate",
            bytes(&containers_number),
            400,
            "pod object",
        ),
        (
            "pod CREATE without object",
            "validate",
            bytes(&no_object),
            200,
            "\"allowed\":true",
        ),
        (
            "unknown kind passes",
            "validate",
            bytes(&review_of(
                "Widget",
                "widgets",
                json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}),
            )),
            200,
            "\"allowed\":true",
        ),
        (
            "a Deployment passes",
            "mutate",
            bytes(&review_of(
                "Deployment",
                "deployments",
                json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}}),
            )),
            200,
            "\"allowed\":true",
        ),
        (
            "absurd cpu limit kept for the API server to judge",
            "mutate",
            bytes(&pod_review(
                "u-hostile",
                "ci",
                with_resources(json!({"limits": {"cpu": "1e400"}})),
                false,
            )),
            200,
            "\"allowed\":true",
        ),
        (
            "negative memory kept",
            "mutate",
            bytes(&pod_review(
                "u-hostile",
                "ci",
                with_resources(json!({"requests": {"memory": "-5Gi"}})),
                false,
            )),
            200,
            "\"allowed\":true",
        ),
        (
            "unreadable quantity kept",
            "validate",
            bytes(&pod_review(
                "u-hostile",
                "ci",
                with_resources(json!({"limits": {"cpu": "lots"}})),
                false,
            )),
            200,
            "\"allowed\":true",
        ),
        (
            "request above limit kept",
            "mutate",
            bytes(&pod_review(
                "u-hostile",
                "ci",
                with_resources(json!({"requests": {"cpu": "2"}, "limits": {"cpu": "1"}})),
                false,
            )),
            200,
            "\"allowed\":true",
        ),
        (
            "5000 containers",
            "mutate",
            many_containers,
            200,
            "bulwark.io/defaulted",
        ),
        (
            "100 kB pod name",
            "validate",
            long_name,
            200,
            "\"allowed\":true",
        ),
        (
            "a ConfigMap as the pod",
            "mutate",
            bytes(&configmap_as_pod),
            400,
            "pod object",
        ),
        (
            "CONNECT on a pod passes",
            "validate",
            bytes(&connect),
            200,
            "\"allowed\":true",
        ),
        (
            "NUL in a pod name",
            "validate",
            nul_name,
            200,
            "\"allowed\":true",
        ),
    ];
    answers_are_bounded(&cases).await;
}

/// Bodies just under and just over the 3 MiB body limit: answered, and a 400 naming the
/// limit.
#[tokio::test]
async fn bodies_under_and_over_the_size_limit_get_bounded_answers() {
    let near_limit = with_annotation(2_900_000);
    let over_limit = with_annotation(3_200_000);
    let cases: Vec<HostileCase> = vec![
        (
            "a 2.9 MB pod, under the body limit",
            "mutate",
            near_limit,
            200,
            "\"allowed\":true",
        ),
        (
            "a 3.2 MB body, over the limit",
            "validate",
            over_limit,
            400,
            "3145728",
        ),
    ];
    answers_are_bounded(&cases).await;
}

/// An AdmissionReview for `object` of `kind`, as a JSON value to be mangled by the cases.
fn review_of(kind: &str, resource: &str, object: Value) -> Value {
    bulwark::review::fixtures::Fixture::pod_create()
        .uid("u-hostile")
        .kind(kind, resource)
        .object(object)
        .into_value()
}

fn with_resources(resources: Value) -> Value {
    let mut p = pod("p", "ci");
    p["spec"]["containers"][0]["resources"] = resources;
    p
}

/// The good review with an annotation of `len` bytes on its pod.
fn with_annotation(len: usize) -> Vec<u8> {
    let mut p = pod("p", "ci");
    p["metadata"]["annotations"] = json!({"big": "x".repeat(len)});
    bytes(&pod_review("u-hostile", "ci", p, false))
}
