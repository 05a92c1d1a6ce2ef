//! Bodies that are not a readable AdmissionReview v1: not JSON at all, or JSON of the wrong
//! shape. Each gets a 400 naming what is wrong, bounded in size, and the server stays healthy.
//! The tables run through `support::answers_are_bounded`, like those of `hostile`.

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn malformed_bodies_get_a_clear_400_and_the_server_stays_healthy() {
    let server = TestServer::start(QUIET).await;
    let big = {
        let mut p = pod("big", "ci");
        p["metadata"]["annotations"] = json!({"filler": "x".repeat(5 * 1024 * 1024)});
        bytes(&pod_review("u", "ci", p, false))
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not json", b"hello".to_vec(), "not valid JSON"),
        (
            "truncated",
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"Adm"#.to_vec(),
            "not valid JSON",
        ),
        (
            "wrong apiVersion",
            br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":null}"#
                .to_vec(),
            "expected apiVersion \"admission.k8s.io/v1\"",
        ),
        (
            "no request",
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
            "has no request",
        ),
        ("5 MiB body", big, "larger than 3145728 bytes"),
    ];
    for proto in BOTH {
        let client = server.client(proto);
        for (name, body, expect) in &cases {
            for endpoint in ["/mutate", "/validate"] {
                let reply = send(&client, "POST", &server.url(endpoint), body.clone())
                    .await
                    .unwrap_or_else(|e| panic!("{name} {endpoint} {proto:?}: {e}"));
                assert_eq!(
                    reply.status,
                    400,
                    "{name} {endpoint} {proto:?}: {}",
                    reply.text()
                );
                assert!(reply.text().contains(expect), "{name}: {}", reply.text());
            }
        }
        let health = get(&client, &server.url("/healthz"))
            .await
            .expect("healthz");
        assert_eq!((health.status, health.text().as_str()), (200, "ok\n"));
        let ready = get(&client, &server.url("/readyz")).await.expect("readyz");
        assert_eq!(ready.status, 200);
    }
    let metrics = scrape(&server).await;
    assert!(
        metrics.contains("bulwark_bad_requests_total{endpoint=\"validate\",error=\"too_large\"} 2"),
        "{metrics}"
    );
}

/// Bodies that are not JSON at all, or not one JSON document: a 400 "not valid JSON".
#[tokio::test]
async fn not_json_at_all_gets_a_400() {
    let good = good_review();
    let truncated = {
        let b = bytes(&good);
        b[..b.len() / 2].to_vec()
    };
    let cases: Vec<HostileCase> = vec![
        ("empty body", "validate", vec![], 400, "not valid JSON"),
        (
            "whitespace",
            "validate",
            b"  \n ".to_vec(),
            400,
            "not valid JSON",
        ),
        ("number", "mutate", b"1e999".to_vec(), 400, "not valid JSON"),
        (
            "non-UTF-8",
            "validate",
            b"{\"kind\":\"\xff\xfe\"}".to_vec(),
            400,
            "not valid JSON",
        ),
        (
            "UTF-8 BOM",
            "validate",
            [b"\xef\xbb\xbf".as_slice(), &bytes(&good)].concat(),
            400,
            "not valid JSON",
        ),
        (
            "trailing garbage",
            "validate",
            [bytes(&good), b"}}".to_vec()].concat(),
            400,
            "not valid JSON",
        ),
        (
            "two documents",
            "validate",
            [bytes(&good), bytes(&good)].concat(),
            400,
            "not valid JSON",
        ),
        (
            "truncated review",
            "validate",
            truncated,
            400,
            "not valid JSON",
        ),
    ];
    answers_are_bounded(&cases).await;
}

/// JSON of the wrong shape for an AdmissionReview v1 (wrong types, kinds, versions, values,
/// a duplicate key, deep nesting): a 400 naming what is wrong.
#[tokio::test]
async fn json_of_the_wrong_shape_gets_a_400() {
    let good = good_review();
    let mut uid_number = good.clone();
    uid_number["request"]["uid"] = json!(5);
    let mut operation_typo = good.clone();
    operation_typo["request"]["operation"] = json!("CREAT");
    let mut request_string = good.clone();
    request_string["request"] = json!("yes");
    let mut old_api = good.clone();
    old_api["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let duplicate_uid = String::from_utf8(bytes(&good))
        .expect("utf8")
        .replacen("\"uid\":", "\"uid\":\"dup\",\"uid\":", 1)
        .into_bytes();
    let cases: Vec<HostileCase> = vec![
        ("null", "validate", b"null".to_vec(), 400, "does not match"),
        ("array", "validate", b"[]".to_vec(), 400, "does not match"),
        (
            "string",
            "mutate",
            b"\"AdmissionReview\"".to_vec(),
            400,
            "does not match",
        ),
        (
            "5000-deep nesting",
            "validate",
            format!("{}{}", "[".repeat(5000), "]".repeat(5000)).into_bytes(),
            400,
            "does not match",
        ),
        (
            "wrong kind",
            "validate",
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"Pod","request":null}"#.to_vec(),
            400,
            "expected apiVersion",
        ),
        (
            "request is a string",
            "validate",
            bytes(&request_string),
            400,
            "does not match",
        ),
        (
            "uid is a number",
            "mutate",
            bytes(&uid_number),
            400,
            "expected a string",
        ),
        (
            "operation typo",
            "validate",
            bytes(&operation_typo),
            400,
            "does not match",
        ),
        (
            "admission.k8s.io/v1beta1",
            "validate",
            bytes(&old_api),
            400,
            "expected apiVersion",
        ),
        (
            "duplicate uid key",
            "validate",
            duplicate_uid,
            400,
            "duplicate field",
        ),
    ];
    answers_are_bounded(&cases).await;
}
