//! AdmissionReview in and out, with kube-rs's admission types. Everything wrong with a review
//! body becomes one [`ReviewError`]; the server turns it into an HTTP 400.

use std::collections::HashMap;

use base64::{Engine, prelude::BASE64_STANDARD};
use k8s_openapi::api::core::v1::Pod;
use kube::core::{
    DynamicObject, Status,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
    response::StatusDetails,
};
use serde::Serialize;

use super::lean::LeanPod;
use crate::policy::pod::hold_gate;

const API_VERSION: &str = "admission.k8s.io/v1";
const KIND: &str = "AdmissionReview";

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("request body is not valid JSON: {0}")]
    NotJson(String),
    #[error(
        "expected apiVersion {API_VERSION:?} and kind {KIND:?}, got {api_version:?} and {kind:?}"
    )]
    WrongType { api_version: String, kind: String },
    #[error("AdmissionReview has no request")]
    NoRequest,
    #[error("AdmissionReview does not match admission.k8s.io/v1: {0}")]
    Invalid(String),
}

impl ReviewError {
    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ReviewError::NotJson(_) => "not_json",
            ReviewError::WrongType { .. } => "wrong_type",
            ReviewError::NoRequest => "no_request",
            ReviewError::Invalid(_) => "invalid",
        }
    }
}

/// A decoded review: pods get the typed object, anything else is passed through.
#[derive(Debug)]
pub enum Review {
    Pod(Box<AdmissionRequest<Pod>>),
    Other(Box<AdmissionRequest<DynamicObject>>),
}

impl Review {
    /// The pod of a pod CREATE (not a subresource), the one thing bulwark decides.
    pub fn pod_create(&self) -> Option<(&AdmissionRequest<Pod>, &Pod)> {
        match self {
            Review::Pod(req)
                if req.operation == Operation::Create && req.sub_resource.is_none() =>
            {
                req.object.as_ref().map(|pod| (&**req, pod))
            }
            _ => None,
        }
    }

    /// A pod UPDATE (not a subresource) that removes bulwark's scheduling gate.
    pub fn gate_removal(&self) -> Option<&AdmissionRequest<Pod>> {
        let Review::Pod(req) = self else {
            return None;
        };
        let removed = req.operation == Operation::Update
            && req.sub_resource.is_none()
            && req.old_object.as_ref().and_then(hold_gate).is_some()
            && req.object.as_ref().and_then(hold_gate).is_none();
        removed.then_some(&**req)
    }

    /// An allowing response that echoes the request's uid.
    pub fn allow(&self) -> AdmissionResponse {
        match self {
            Review::Pod(req) => AdmissionResponse::from(&**req),
            Review::Other(req) => AdmissionResponse::from(&**req),
        }
    }
}

fn is_pod(req_kind: &kube::core::GroupVersionKind) -> bool {
    req_kind.group.is_empty() && req_kind.kind == "Pod"
}

fn json_error(e: &serde_json::Error) -> ReviewError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => ReviewError::NotJson(e.to_string()),
        Category::Data => ReviewError::Invalid(e.to_string()),
    }
}

fn check_type(types: &kube::core::TypeMeta) -> Result<(), ReviewError> {
    if types.api_version == API_VERSION && types.kind == KIND {
        Ok(())
    } else {
        Err(ReviewError::WrongType {
            api_version: types.api_version.clone(),
            kind: types.kind.clone(),
        })
    }
}

/// Decodes an AdmissionReview body.
pub fn decode(body: &[u8]) -> Result<Review, ReviewError> {
    // Pods are the common case: decode straight into the (lean) Pod. Other kinds fail that
    // (apiVersion and kind are checked) and are decoded generically instead.
    let pod_err = match serde_json::from_slice::<AdmissionReview<LeanPod>>(body) {
        Ok(review) => {
            check_type(&review.types)?;
            let req: AdmissionRequest<LeanPod> =
                review.try_into().map_err(|_| ReviewError::NoRequest)?;
            return Ok(Review::Pod(Box::new(AdmissionRequest {
                types: req.types,
                uid: req.uid,
                kind: req.kind,
                resource: req.resource,
                sub_resource: req.sub_resource,
                request_kind: req.request_kind,
                request_resource: req.request_resource,
                request_sub_resource: req.request_sub_resource,
                name: req.name,
                namespace: req.namespace,
                operation: req.operation,
                user_info: req.user_info,
                object: req.object.map(|p| p.0),
                old_object: req.old_object.map(|p| p.0),
                dry_run: req.dry_run,
                options: req.options,
            })));
        }
        Err(e) => e,
    };
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|e| json_error(&e))?;
    check_type(&review.types)?;
    let req: AdmissionRequest<DynamicObject> =
        review.try_into().map_err(|_| ReviewError::NoRequest)?;
    if is_pod(&req.kind) {
        // The review is sound but its pod is not.
        return Err(ReviewError::Invalid(format!("pod object: {pod_err}")));
    }
    Ok(Review::Other(Box::new(req)))
}

/// The AdmissionReview kube-apiserver reads back: kube-core's own shape, field for field,
/// except for the patch.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewOut<'a> {
    api_version: &'a str,
    kind: &'a str,
    response: ResponseOut<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseOut<'a> {
    uid: &'a str,
    allowed: bool,
    status: &'a Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    audit_annotations: &'a HashMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    warnings: Option<&'a [String]>,
}

/// Serialises a response as the AdmissionReview kube-apiserver expects.
pub fn encode(response: AdmissionResponse) -> Vec<u8> {
    let review = ReviewOut {
        api_version: &response.types.api_version,
        kind: &response.types.kind,
        response: ResponseOut {
            uid: &response.uid,
            allowed: response.allowed,
            status: &response.result,
            // Go's encoding of `[]byte`, which kube-apiserver decodes the patch with: a base64
            // string (kube-core writes its `Vec<u8>` as an array of numbers, up to 4 bytes per
            // patch byte). Encoded in one pass, not through the formatting machinery.
            patch: response.patch.as_deref().map(|p| BASE64_STANDARD.encode(p)),
            // kube-core sets the patch only with its type, JSONPatch, the one kind there is.
            patch_type: response.patch.as_ref().map(|_| "JSONPatch"),
            audit_annotations: &response.audit_annotations,
            warnings: response.warnings.as_deref(),
        },
    };
    // An AdmissionReview of plain strings and maps always serialises.
    serde_json::to_vec(&review).unwrap_or_default()
}

/// The refusal (docs/architecture.md, "The admission contract"): code 429 and reason
/// TooManyRequests, which kube-apiserver keeps. With `retry_after_seconds` it carries
/// `details.retryAfterSeconds` (at least 1), which kube-apiserver passes on as a `Retry-After`
/// header that client-go waits out inside the call; without, the call fails at once.
/// A refusal with `code` (403 Forbidden, ...) and `reason`.
pub fn denied(
    mut response: AdmissionResponse,
    message: &str,
    reason: &str,
    code: u16,
) -> AdmissionResponse {
    response.allowed = false;
    let mut status = Status::failure(message, reason);
    status.code = code;
    response.result = status;
    response
}

pub fn too_many_requests(
    mut response: AdmissionResponse,
    message: String,
    retry_after_seconds: Option<u32>,
) -> AdmissionResponse {
    response.allowed = false;
    let mut status = Status::failure(&message, "TooManyRequests");
    status.code = 429;
    status.details = retry_after_seconds.map(|seconds| StatusDetails {
        name: String::new(),
        group: String::new(),
        kind: String::new(),
        uid: String::new(),
        causes: Vec::new(),
        retry_after_seconds: seconds.max(1),
    });
    response.result = status;
    response
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::review::fixtures::Fixture;

    fn review(kind: &str, object: serde_json::Value) -> Vec<u8> {
        Fixture::pod_create()
            .uid("u-1")
            .kind(kind, "x")
            .object(object)
            .bytes()
    }

    #[test]
    fn pods_are_typed_others_pass_through() {
        let pod = review(
            "Pod",
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": []}}),
        );
        let r = decode(&pod).unwrap();
        assert!(r.pod_create().is_some());
        assert_eq!(r.allow().uid, "u-1");

        let cm = review(
            "ConfigMap",
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}),
        );
        let r = decode(&cm).unwrap();
        assert!(matches!(r, Review::Other(_)));
        assert!(r.pod_create().is_none());
    }

    #[test]
    fn bad_bodies() {
        assert!(matches!(decode(b"not json"), Err(ReviewError::NotJson(_))));
        assert!(matches!(
            decode(b"{\"apiVersion\":"),
            Err(ReviewError::NotJson(_))
        ));
        assert!(matches!(
            decode(br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":null}"#),
            Err(ReviewError::WrongType { .. })
        ));
        assert!(matches!(
            decode(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#),
            Err(ReviewError::NoRequest)
        ));
        assert!(matches!(decode(b"[1,2]"), Err(ReviewError::Invalid(_))));
        let broken_pod = review(
            "Pod",
            json!({"apiVersion": "v1", "kind": "Pod", "spec": {"containers": 7}}),
        );
        let err = decode(&broken_pod).unwrap_err();
        assert!(matches!(err, ReviewError::Invalid(_)), "{err}");
        assert!(err.to_string().contains("pod object"), "{err}");
        let deep = "[".repeat(10_000);
        assert!(decode(deep.as_bytes()).is_err());
    }

    /// The lean pod keeps every field bulwark reads, exactly as the full Pod decodes them.
    #[test]
    fn lean_pod_keeps_what_bulwark_reads() {
        let object = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "p", "namespace": "ci", "generateName": "p-",
                "labels": {"bulwark.io/workflow": "wf"},
                "annotations": {"a": "b"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "d", "uid": "u", "controller": true}],
                "managedFields": [{"manager": "kubectl", "operation": "Update", "fieldsV1": {"f:spec": {}}}]
            },
            "spec": {
                "priorityClassName": "system-node-critical",
                "nodeName": "n1",
                "schedulingGates": [{"name": "example.com/a"}, {"name": "bulwark.io/pending-cap"}],
                "initContainers": [{"name": "init", "image": "i", "resources": {"limits": {"cpu": "1"}}}],
                "containers": [
                    {"name": "a", "image": "i", "env": [{"name": "X", "value": "y"}], "resources": {"requests": {"memory": "1Gi"}}},
                    {"name": "b", "image": "i"}
                ],
                "volumes": [{"name": "v", "emptyDir": {}}],
                "tolerations": [{"key": "k", "operator": "Exists"}]
            },
            "status": {"phase": "Pending"}
        });
        let full: Pod = serde_json::from_value(object.clone()).unwrap();
        let r = decode(&review("Pod", object)).unwrap();
        let (_, lean) = r.pod_create().expect("a pod create");
        let (m, f) = (&lean.metadata, &full.metadata);
        assert_eq!(m.name, f.name);
        assert_eq!(m.namespace, f.namespace);
        assert_eq!(m.labels, f.labels);
        assert_eq!(m.annotations, f.annotations);
        assert_eq!(m.owner_references, f.owner_references);
        let (ls, fs) = (lean.spec.as_ref().unwrap(), full.spec.as_ref().unwrap());
        assert_eq!(ls.priority_class_name, fs.priority_class_name);
        assert_eq!(ls.node_name, fs.node_name);
        assert_eq!(ls.scheduling_gates, fs.scheduling_gates);
        let parts = |cs: &[k8s_openapi::api::core::v1::Container]| {
            cs.iter()
                .map(|c| (c.name.clone(), c.resources.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(parts(&ls.containers), parts(&fs.containers));
        assert_eq!(
            parts(ls.init_containers.as_deref().unwrap()),
            parts(fs.init_containers.as_deref().unwrap())
        );

        // Not a v1 Pod: not decoded as one, and a review of kind Pod with it is refused.
        let wrong = review(
            "Pod",
            json!({"apiVersion": "v2", "kind": "Pod", "spec": {"containers": []}}),
        );
        assert!(matches!(decode(&wrong), Err(ReviewError::Invalid(_))));
    }

    /// The answer is kube-core's AdmissionReview with the patch as the base64 string Go's
    /// `[]byte` decoding expects, and every other field as kube-core writes it.
    #[test]
    fn patch_is_base64_and_the_rest_is_kube_cores_shape() {
        use base64::Engine;
        let r = decode(&review(
            "Pod",
            json!({"apiVersion": "v1", "kind": "Pod", "spec": {"containers": []}}),
        ))
        .unwrap();
        let patch: json_patch::Patch = serde_json::from_value(json!([
            {"op": "add", "path": "/metadata/annotations", "value": {"a": "b"}}
        ]))
        .unwrap();
        let mut resp = r.allow().with_patch(patch.clone()).unwrap();
        resp.warnings = Some(vec!["w".into()]);
        resp.audit_annotations.insert("k".into(), "v".into());
        let ours: serde_json::Value = serde_json::from_slice(&encode(resp.clone())).unwrap();
        let mut kubes = serde_json::to_value(resp.into_review()).unwrap();

        let text = ours["response"]["patch"].as_str().expect("a string");
        let bytes = BASE64_STANDARD.decode(text).expect("base64");
        let decoded: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(decoded, patch);
        let kube_bytes: Vec<u8> =
            serde_json::from_value(kubes["response"]["patch"].take()).unwrap();
        assert_eq!(bytes, kube_bytes);
        kubes["response"]["patch"] = ours["response"]["patch"].clone();
        assert_eq!(ours, kubes);
        assert_eq!(ours["response"]["patchType"], "JSONPatch");

        let plain = r.allow();
        let ours: serde_json::Value = serde_json::from_slice(&encode(plain.clone())).unwrap();
        assert_eq!(ours, serde_json::to_value(plain.into_review()).unwrap());
        assert!(ours["response"].get("patch").is_none());
    }

    #[test]
    fn refusal_shape() {
        let r = decode(&review(
            "Pod",
            json!({"apiVersion": "v1", "kind": "Pod", "spec": {"containers": []}}),
        ))
        .unwrap();
        let resp = too_many_requests(r.allow(), "slow down".into(), Some(0));
        let v: serde_json::Value = serde_json::from_slice(&encode(resp)).unwrap();
        assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(v["kind"], "AdmissionReview");
        let resp = &v["response"];
        assert_eq!(resp["uid"], "u-1");
        assert_eq!(resp["allowed"], false);
        assert_eq!(resp["status"]["code"], 429);
        assert_eq!(resp["status"]["reason"], "TooManyRequests");
        assert_eq!(resp["status"]["message"], "slow down");
        assert_eq!(
            resp["status"]["details"]["retryAfterSeconds"], 1,
            "at least 1"
        );
    }

    #[test]
    fn refusal_without_retry_after_keeps_code_reason_and_message() {
        let r = decode(&review(
            "Pod",
            json!({"apiVersion": "v1", "kind": "Pod", "spec": {"containers": []}}),
        ))
        .unwrap();
        let resp = too_many_requests(r.allow(), "slow down".into(), None);
        let v: serde_json::Value = serde_json::from_slice(&encode(resp)).unwrap();
        let status = &v["response"]["status"];
        assert_eq!(v["response"]["allowed"], false);
        assert_eq!(status["code"], 429);
        assert_eq!(status["reason"], "TooManyRequests");
        assert_eq!(status["message"], "slow down");
        assert!(status.get("details").is_none(), "{status}");
    }
}
