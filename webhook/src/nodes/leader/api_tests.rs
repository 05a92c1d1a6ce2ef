//! The requests of one election round and of a release, on the Lease
//! `bulwark-system/bulwark-node-controller`.

use http::Method;
use serde_json::{Value, json};

use super::*;
use crate::testing::{ApiServer, Reply};

const NS: &str = "bulwark-system";
const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/bulwark-system/leases/bulwark-node-controller";

/// The Lease as the API server returns it: held by `holder`, last renewed `renewed_ago`, for
/// 15 s, acquired an hour before that.
fn lease(holder: &str, renewed_ago: Duration, transitions: i32) -> Value {
    let renewed = SystemTime::now() - renewed_ago;
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some("bulwark-node-controller".into()),
            namespace: Some(NS.into()),
            resource_version: Some("7".into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            acquire_time: micro(renewed - Duration::from_secs(3600)),
            renew_time: micro(renewed),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }),
    };
    serde_json::to_value(lease).expect("serializable")
}

/// An expired lease (last renewed a minute ago) held by another replica.
fn expired() -> Value {
    lease("other", Duration::from_secs(60), 2)
}

fn elector(client: kube::Client) -> Elector {
    let api = Api::namespaced(client, NS);
    Elector::new(
        api,
        "bulwark-node-controller",
        "me",
        Duration::from_secs(15),
    )
}

async fn round(server: ApiServer) -> Result<bool, String> {
    server
        .run(|client| async move { elector(client).round().await })
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn round_creates_an_absent_lease_holding_it() {
    let server = ApiServer::new()
        .get(LEASE, Reply::not_found())
        .expect(
            Method::POST,
            "/apis/coordination.k8s.io/v1/namespaces/bulwark-system/leases?",
        )
        .body(|l| {
            assert_eq!(l["metadata"]["name"], "bulwark-node-controller");
            let spec = &l["spec"];
            assert_eq!(spec["holderIdentity"], "me");
            assert_eq!(spec["leaseDurationSeconds"], 15);
            assert_eq!(spec["leaseTransitions"], 0);
            assert!(spec["acquireTime"].is_string());
            assert_eq!(spec["renewTime"], spec["acquireTime"]);
        })
        .respond(Reply::Stored);
    assert_eq!(round(server).await, Ok(true));
}

/// A round that reads `read` and replaces it; `check` gets the written spec and the one read.
async fn round_replacing(
    read: Value,
    check: impl FnOnce(&Value, &Value) + Send + 'static,
) -> Result<bool, String> {
    let before = read["spec"].clone();
    let server = ApiServer::new()
        .get(LEASE, Reply::Json(read))
        .replace(LEASE, "7")
        .body(move |l| check(&l["spec"], &before))
        .respond(Reply::Stored);
    round(server).await
}

#[tokio::test]
async fn round_renews_a_lease_it_holds() {
    let read = lease("me", Duration::from_secs(5), 3);
    let held = round_replacing(read, |spec, before| {
        assert_eq!(spec["holderIdentity"], "me");
        assert_eq!(spec["leaseTransitions"], 3);
        assert_eq!(spec["acquireTime"], before["acquireTime"]);
        assert_ne!(spec["renewTime"], before["renewTime"]);
    });
    assert_eq!(held.await, Ok(true));
}

#[tokio::test]
async fn round_takes_over_an_expired_lease() {
    let held = round_replacing(expired(), |spec, before| {
        assert_eq!(spec["holderIdentity"], "me");
        assert_eq!(spec["leaseTransitions"], 3);
        assert_eq!(spec["leaseDurationSeconds"], 15);
        assert_ne!(spec["acquireTime"], before["acquireTime"]);
        assert_eq!(spec["renewTime"], spec["acquireTime"]);
    });
    assert_eq!(held.await, Ok(true));
}

#[tokio::test]
async fn round_takes_over_a_lease_without_spec() {
    let mut read = expired();
    read.as_object_mut().expect("an object").remove("spec");
    let held = round_replacing(read, |spec, _| {
        assert_eq!(spec["holderIdentity"], "me");
        assert_eq!(spec["leaseTransitions"], 1);
        assert!(spec["acquireTime"].is_string());
    });
    assert_eq!(held.await, Ok(true));
}

#[tokio::test]
async fn round_follows_a_live_lease_without_writing() {
    let server = ApiServer::new().get(
        LEASE,
        Reply::Json(lease("other", Duration::from_secs(1), 2)),
    );
    assert_eq!(round(server).await, Ok(false));
}

#[tokio::test]
async fn round_that_loses_the_race_for_the_lease_is_not_leader() {
    let server = ApiServer::new()
        .get(LEASE, Reply::Json(expired()))
        .replace(LEASE, "7")
        .respond(Reply::conflict());
    assert_eq!(round(server).await, Ok(false));
}

#[tokio::test]
async fn release_clears_the_holder_of_a_lease_it_holds() {
    let server = ApiServer::new()
        .get(LEASE, Reply::Json(lease("me", Duration::from_secs(1), 3)))
        .replace(LEASE, "7")
        .body(|l| {
            assert!(l["spec"]["holderIdentity"].is_null(), "{l}");
            assert_eq!(l["spec"]["leaseTransitions"], 3);
        })
        .respond(Reply::Stored);
    server
        .run(|client| async move { elector(client).release().await })
        .await;
}

#[tokio::test]
async fn release_leaves_a_lease_held_by_another_alone() {
    let server = ApiServer::new().get(
        LEASE,
        Reply::Json(lease("other", Duration::from_secs(1), 3)),
    );
    server
        .run(|client| async move { elector(client).release().await })
        .await;
}

/// A time in the past (a recorded time later than now would count as now).
fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn text(t: SystemTime) -> String {
    rfc3339(t).expect("a representable time")
}

/// `lease` with the previous leader's record: a removal at `at(10)`, a hold until `at(20)`.
fn with_record(mut lease: Value) -> Value {
    lease["metadata"]["annotations"] = json!({
        LAST_REMOVAL_ANNOTATION: text(at(10)),
        LAST_HOLD_ANNOTATION: text(at(20)),
        "example.com/kept": "yes",
    });
    lease
}

fn previous_record() -> Safety {
    Safety {
        last_removal: Some(at(10)),
        last_hold: Some(at(20)),
    }
}

#[tokio::test]
async fn a_take_over_reads_the_previous_leaders_record_before_it_holds() {
    let server = ApiServer::new()
        .get(LEASE, Reply::Json(with_record(expired())))
        .replace(LEASE, "7")
        .body(|l| {
            assert_eq!(l["spec"]["holderIdentity"], "me");
            let a = &l["metadata"]["annotations"];
            assert_eq!(a[LAST_REMOVAL_ANNOTATION], text(at(10)), "handed on: {a}");
            assert_eq!(a[LAST_HOLD_ANNOTATION], text(at(20)));
            assert_eq!(a["example.com/kept"], "yes");
        })
        .respond(Reply::Stored);
    let (held, safety) = server
        .run(|client| async move {
            let e = elector(client);
            let held = e.round().await.map_err(|e| e.to_string());
            (held, e.safety())
        })
        .await;
    assert_eq!(held, Ok(true));
    assert_eq!(safety, previous_record());
}

#[tokio::test]
async fn a_renewal_writes_the_latest_hold() {
    let server = ApiServer::new()
        .get(
            LEASE,
            Reply::Json(with_record(lease("me", Duration::from_secs(2), 3))),
        )
        .replace(LEASE, "7")
        .body(|l| {
            let a = &l["metadata"]["annotations"];
            assert_eq!(a[LAST_HOLD_ANNOTATION], text(at(30)), "{a}");
            assert_eq!(a[LAST_REMOVAL_ANNOTATION], text(at(10)));
        })
        .respond(Reply::Stored);
    let held = server
        .run(|client| async move {
            let e = elector(client);
            e.note(Safety {
                last_removal: None,
                last_hold: Some(at(30)),
            });
            e.round().await.map_err(|e| e.to_string())
        })
        .await;
    assert_eq!(held, Ok(true));
}

#[tokio::test]
async fn a_removal_is_recorded_on_the_lease_it_holds() {
    let server = ApiServer::new()
        .get(LEASE, Reply::Json(lease("me", Duration::from_secs(1), 3)))
        .replace(LEASE, "7")
        .respond(Reply::conflict())
        .get(
            LEASE,
            Reply::Json(with_record(lease("me", Duration::from_secs(1), 3))),
        )
        .replace(LEASE, "7")
        .body(|l| {
            let a = &l["metadata"]["annotations"];
            assert_eq!(a[LAST_REMOVAL_ANNOTATION], text(at(40)), "{a}");
            assert_eq!(a[LAST_HOLD_ANNOTATION], text(at(20)));
        })
        .respond(Reply::Stored);
    let (recorded, safety) = server
        .run(|client| async move {
            let e = elector(client);
            let r = e.record_removal(at(40)).await.map_err(|e| e.to_string());
            (r, e.safety())
        })
        .await;
    assert_eq!(recorded, Ok(()));
    assert_eq!(safety.last_removal, Some(at(40)));
}

#[tokio::test]
async fn a_removal_is_not_recorded_on_a_lease_another_holds() {
    let server = ApiServer::new().get(
        LEASE,
        Reply::Json(lease("other", Duration::from_secs(1), 3)),
    );
    let (recorded, safety) = server
        .run(|client| async move {
            let e = elector(client);
            let r = e.record_removal(at(40)).await;
            (matches!(r, Err(LeaderError::NotHolder)), e.safety())
        })
        .await;
    assert!(recorded, "refused");
    assert_eq!(
        safety.last_removal, None,
        "an unrecorded removal spaces nothing"
    );
}
