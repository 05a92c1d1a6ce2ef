//! AdmissionReview in and out, with kube-rs's admission types. Everything wrong with a request
//! body becomes one [`ReviewError`], turned into an HTTP 400 in one place.

use axum::{
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use k8s_openapi::api::core::v1::Pod;
use kube::core::{
    DynamicObject, Status,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
    response::StatusDetails,
};

/// kube-apiserver's own request size limit; an AdmissionReview carries one object.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

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
    #[error("request body is larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("request body was not received within {0} seconds")]
    BodyTimeout(u64),
    #[error("reading request body: {0}")]
    Body(String),
    #[error("a client certificate signed by the --client-ca is required for reviews")]
    Unauthenticated,
}

impl ReviewError {
    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ReviewError::NotJson(_) => "not_json",
            ReviewError::WrongType { .. } => "wrong_type",
            ReviewError::NoRequest => "no_request",
            ReviewError::Invalid(_) => "invalid",
            ReviewError::TooLarge => "too_large",
            ReviewError::BodyTimeout(_) => "body_timeout",
            ReviewError::Body(_) => "body",
            ReviewError::Unauthenticated => "unauthenticated",
        }
    }
}

impl IntoResponse for ReviewError {
    fn into_response(self) -> Response {
        let (status, text) = match self {
            ReviewError::Unauthenticated => (StatusCode::UNAUTHORIZED, format!("{self}\n")),
            _ => (
                StatusCode::BAD_REQUEST,
                format!("bad AdmissionReview: {self}\n"),
            ),
        };
        (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            text,
        )
            .into_response()
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
    // Pods are the common case: decode straight into the typed Pod. Other kinds fail that
    // (k8s-openapi checks apiVersion and kind) and are decoded generically instead.
    let pod_err = match serde_json::from_slice::<AdmissionReview<Pod>>(body) {
        Ok(review) => {
            check_type(&review.types)?;
            let req: AdmissionRequest<Pod> =
                review.try_into().map_err(|_| ReviewError::NoRequest)?;
            return Ok(Review::Pod(Box::new(req)));
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

/// Serialises a response as the AdmissionReview kube-apiserver expects.
pub fn encode(response: AdmissionResponse) -> Vec<u8> {
    // An AdmissionReview of plain strings and maps always serialises.
    serde_json::to_vec(&response.into_review()).unwrap_or_default()
}

/// The refusal shape of DESIGN.md: code 429, reason TooManyRequests, retryAfterSeconds, which
/// kube-apiserver passes on as a `Retry-After` header that client-go honours.
pub fn too_many_requests(
    mut response: AdmissionResponse,
    message: String,
    retry_after_seconds: u32,
) -> AdmissionResponse {
    response.allowed = false;
    let mut status = Status::failure(&message, "TooManyRequests");
    status.code = 429;
    status.details = Some(StatusDetails {
        name: String::new(),
        group: String::new(),
        kind: String::new(),
        uid: String::new(),
        causes: Vec::new(),
        retry_after_seconds: retry_after_seconds.max(1),
    });
    response.result = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn review(kind: &str, object: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": "", "version": "v1", "kind": kind},
                "resource": {"group": "", "version": "v1", "resource": "x"},
                "namespace": "ci",
                "operation": "CREATE",
                "userInfo": {},
                "object": object,
                "dryRun": false
            }
        }))
        .unwrap()
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

    #[test]
    fn refusal_shape() {
        let r = decode(&review(
            "Pod",
            json!({"apiVersion": "v1", "kind": "Pod", "spec": {"containers": []}}),
        ))
        .unwrap();
        let resp = too_many_requests(r.allow(), "slow down".into(), 0);
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
}
