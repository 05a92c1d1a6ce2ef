//! A scripted API server behind a real `kube::Client`, for tests of the exact requests
//! bulwark's kube adapters make, without a cluster.
//!
//! A scenario is a list of expected requests, each with its answer, run in order against the
//! code under test:
//!
//! ```ignore
//! let outcome = ApiServer::new()
//!     .get("/api/v1/nodes/n1", Reply::Json(node_at_version_7))
//!     .replace("/api/v1/nodes/n1", "7") // PUT /api/v1/nodes/n1? carrying resourceVersion 7
//!     .body(|node| assert_eq!(node["spec"]["unschedulable"], true))
//!     .respond(Reply::Stored)
//!     .run(|client| async move { executor(client).apply(&taint, &view).await })
//!     .await;
//! ```
//!
//! The test fails when a request differs from the next expected one (method, path with
//! query, body checks), when a request comes after the last expected one, when an expected
//! request never comes, or when the scenario takes longer than [`TIMEOUT`]. The client must
//! not outlive the code under test (no task spawned with a clone of it): the end of its
//! requests is what tells the server that no more will come.

use std::{future::Future, time::Duration};

use http::{Method, Request, Response, StatusCode};
use kube::{Client, client::Body};
use serde_json::{Value, json};
use tower_test::mock;

/// The longest a scenario may take: a test never hangs on a request that does not come.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// What the API server answers to one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 with this object.
    Json(Value),
    /// The request's own body as the API server stores it: a new `metadata.resourceVersion`,
    /// 201 for a POST and 200 otherwise.
    Stored,
    /// 200 with what the last [`Reply::Stored`] write stored (a read after a write).
    LastStored,
    /// A `Status` failure, e.g. 404 NotFound or 409 Conflict.
    Failure { code: u16, reason: &'static str },
}

impl Reply {
    pub fn not_found() -> Reply {
        Reply::Failure {
            code: 404,
            reason: "NotFound",
        }
    }

    pub fn conflict() -> Reply {
        Reply::Failure {
            code: 409,
            reason: "Conflict",
        }
    }
}

/// A check of a request's JSON body (`Value::Null` when it has none); it panics on a
/// mismatch.
type BodyCheck = Box<dyn FnOnce(&Value) + Send>;

struct Step {
    method: Method,
    path: String,
    checks: Vec<BodyCheck>,
    reply: Reply,
}

/// The scripted API server: the requests it expects, in order.
#[derive(Default)]
pub struct ApiServer {
    steps: Vec<Step>,
}

/// An expected request whose answer is still to be given.
pub struct Expect {
    server: ApiServer,
    method: Method,
    path: String,
    checks: Vec<BodyCheck>,
}

impl Expect {
    /// Checks the request's JSON body.
    pub fn body(mut self, check: impl FnOnce(&Value) + Send + 'static) -> Expect {
        self.checks.push(Box::new(check));
        self
    }

    /// The write carries the resourceVersion it read, so a concurrent write makes it a 409.
    pub fn carries_resource_version(self, version: &'static str) -> Expect {
        self.body(move |body| {
            assert_eq!(
                body["metadata"]["resourceVersion"], version,
                "the write carries the resourceVersion it read"
            );
        })
    }

    pub fn respond(mut self, reply: Reply) -> ApiServer {
        self.server.steps.push(Step {
            method: self.method,
            path: self.path,
            checks: self.checks,
            reply,
        });
        self.server
    }
}

/// A `kube::core::Status` failure as the API server sends it.
pub fn status(code: u16, reason: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": format!("scripted {reason}"),
        "reason": reason,
        "code": code,
    })
}

fn response(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).expect("valid status code"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(body).expect("serializable")))
        .expect("valid response")
}

impl ApiServer {
    pub fn new() -> ApiServer {
        ApiServer::default()
    }

    /// The next request must be `method` on `path` (with its query, as the client sends it:
    /// kube ends the path of a write with `?`).
    pub fn expect(self, method: Method, path: &str) -> Expect {
        Expect {
            server: self,
            method,
            path: path.to_owned(),
            checks: Vec::new(),
        }
    }

    /// A GET of `path`, answered with `reply`.
    pub fn get(self, path: &str, reply: Reply) -> ApiServer {
        self.expect(Method::GET, path).respond(reply)
    }

    /// The PUT that replaces the object at `path`, carrying the resourceVersion it read.
    pub fn replace(self, path: &str, resource_version: &'static str) -> Expect {
        self.expect(Method::PUT, &format!("{path}?"))
            .carries_resource_version(resource_version)
    }

    /// Runs `test` with a client of this server and answers its requests; returns what `test`
    /// returned once every expected request was made and answered.
    pub async fn run<T, F, Fut>(self, test: F) -> T
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = T>,
    {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        // `join!` drops `test`'s future (and with it the client) as soon as it is done, which
        // ends the request stream the server reads after its last step.
        let both = async { tokio::join!(test(client), self.serve(handle)) };
        let (out, ()) = tokio::time::timeout(TIMEOUT, both)
            .await
            .unwrap_or_else(|_| panic!("the scenario did not finish within {TIMEOUT:?}"));
        out
    }

    async fn serve(self, mut handle: mock::Handle<Request<Body>, Response<Body>>) {
        let mut stored = None::<Value>;
        let mut version = 100;
        for (n, step) in self.steps.into_iter().enumerate() {
            let n = n + 1;
            let Some((request, send)) = handle.next_request().await else {
                panic!(
                    "request {n}: expected {} {}, but no more requests came",
                    step.method, step.path
                );
            };
            let method = request.method().clone();
            let path = request
                .uri()
                .path_and_query()
                .map(ToString::to_string)
                .unwrap_or_default();
            assert!(
                method == step.method && path == step.path,
                "request {n}: expected {} {}, got {method} {path}",
                step.method,
                step.path
            );
            let bytes = request
                .into_body()
                .collect_bytes()
                .await
                .expect("readable request body");
            let body = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).expect("a JSON request body")
            };
            for check in step.checks {
                check(&body);
            }
            let (code, reply) = match step.reply {
                Reply::Json(v) => (200, v),
                Reply::Stored => {
                    let mut object = body;
                    version += 1;
                    object["metadata"]["resourceVersion"] = json!(version.to_string());
                    stored = Some(object.clone());
                    (if method == Method::POST { 201 } else { 200 }, object)
                }
                Reply::LastStored => (
                    200,
                    stored
                        .clone()
                        .unwrap_or_else(|| panic!("request {n}: nothing was stored yet")),
                ),
                Reply::Failure { code, reason } => (code, status(code, reason)),
            };
            send.send_response(response(code, &reply));
        }
        if let Some((request, _)) = handle.next_request().await {
            panic!(
                "unexpected request after the last expected one: {} {}",
                request.method(),
                request.uri()
            );
        }
    }
}
