//! A real bulwark server on 127.0.0.1 with freshly generated certificates, HTTPS clients
//! that speak h2 or http/1.1 to it, and the helpers the tests share: reviews from
//! `tests/data`, reading answers, streaming a body in parts, scraping `/metrics`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bulwark::{
    config::Config,
    review::fixtures::Fixture,
    serve::{conn::Limits, tls::ClientCa},
    webhook::{Certificates, Started, Webhook, WebhookOptions},
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, channel::Channel};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use serde_json::Value;

/// Config with no rate limit: only what a test adds (quotas, mode) refuses.
pub const QUIET: &str = "defaults:\n  podRate: unlimited\n";

/// The TLS connector every client here uses.
pub type Connector =
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

pub type HttpsClient = Client<Connector, Full<Bytes>>;

pub struct TestServer {
    pub started: Option<Started>,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub dir: PathBuf,
    pub ca_pem: String,
    pub webhook: Webhook,
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "bulwark-it-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Generates a CA and a serving certificate for 127.0.0.1/localhost into `dir`.
pub fn write_certs(dir: &Path) -> String {
    let bundle = bulwark_certs::generate(&bulwark_certs::Request {
        dns_names: vec!["localhost".into()],
        ips: vec!["127.0.0.1".parse().expect("ip")],
        days: 1,
        key: bulwark_certs::KeyAlgorithm::default(),
    })
    .expect("certs");
    bulwark_certs::write(&bundle, dir).expect("write certs");
    bundle.ca_cert_pem
}

impl TestServer {
    pub async fn start(config_yaml: &str) -> TestServer {
        TestServer::start_with(config_yaml, None).await
    }

    /// With `client_ca`, reviews need a client certificate it signed (mTLS). Started offline
    /// through the same entry `bulwark webhook` uses.
    pub async fn start_with(config_yaml: &str, client_ca: Option<ClientCa>) -> TestServer {
        TestServer::start_limited(config_yaml, client_ca, Limits::default()).await
    }

    /// [`TestServer::start_with`] with connection limits other than production's (short
    /// timeouts, small bounds), so a test need not wait minutes or open thousands.
    pub async fn start_limited(
        config_yaml: &str,
        client_ca: Option<ClientCa>,
        limits: Limits,
    ) -> TestServer {
        let dir = temp_dir("server");
        let ca_pem = write_certs(&dir);
        let config = Config::parse(config_yaml, "test config").expect("config");
        let started = Webhook::start(WebhookOptions {
            settings: config.webhook,
            client: None,
            own_namespace: None,
            identity: None,
            peers_service: None,
            peer_listen: None,
            certificates: Certificates::Files {
                cert: dir.join("tls.crt"),
                key: dir.join("tls.key"),
            },
            client_ca,
            listen: "127.0.0.1:0".parse().expect("addr"),
            metrics_listen: Some("127.0.0.1:0".parse().expect("addr")),
            reload_interval: Duration::from_millis(50),
            drain_timeout: Duration::from_secs(5),
            limits,
            releaser: None,
        })
        .await
        .expect("server starts");
        TestServer {
            addr: started.addr(),
            metrics_addr: started.metrics_addr().expect("metrics listener"),
            webhook: started.webhook.clone(),
            started: Some(started),
            dir,
            ca_pem,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    pub fn client(&self, proto: Proto) -> HttpsClient {
        client_trusting(&[&self.ca_pem], proto, true)
    }

    /// POSTs to `/validate` the review (uid "u", not a dry run) of the fixture's pod, named
    /// `name` in `namespace`.
    pub async fn validate_pod(&self, client: &HttpsClient, namespace: &str, name: &str) -> Reply {
        let review = pod_review("u", namespace, pod(name, namespace), false);
        post(client, &self.url("/validate"), &review).await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    H2,
    Http1,
}

pub const BOTH: [Proto; 2] = [Proto::H2, Proto::Http1];

/// A TLS connector that trusts only the given CAs, offers only `proto` in ALPN and, with
/// `identity` (a certificate and key, PEM), presents it as its client certificate.
pub fn connector_as(
    cas: &[&str],
    proto: Proto,
    identity: Option<&bulwark_certs::Pair>,
) -> Connector {
    connector_from(cas, proto, identity, None)
}

/// [`connector_as`], connecting from the local address `source` if given (e.g. 127.0.0.2,
/// to be another client than the tests' 127.0.0.1).
pub fn connector_from(
    cas: &[&str],
    proto: Proto,
    identity: Option<&bulwark_certs::Pair>,
    source: Option<std::net::IpAddr>,
) -> Connector {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
            roots.add(cert.expect("CA pem")).expect("add CA");
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    let tls = match identity {
        None => tls.with_no_client_auth(),
        Some(pair) => {
            let chain = CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("client cert pem");
            let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes())
                .expect("client key pem");
            tls.with_client_auth_cert(chain, key).expect("client cert")
        }
    };
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_local_address(source);
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    match proto {
        Proto::H2 => builder.enable_http2().wrap_connector(http),
        Proto::Http1 => builder.enable_http1().wrap_connector(http),
    }
}

/// An HTTPS client that trusts only the given CAs; `pooled: false` opens a connection (and a
/// TLS handshake) per request.
pub fn client_trusting(cas: &[&str], proto: Proto, pooled: bool) -> HttpsClient {
    client_as(cas, proto, pooled, None)
}

/// [`client_trusting`] for any request body type (e.g. one streamed in parts), presenting
/// `identity`, if any, as its client certificate (see [`connector_as`]).
pub fn client_as<B>(
    cas: &[&str],
    proto: Proto,
    pooled: bool,
    identity: Option<&bulwark_certs::Pair>,
) -> Client<Connector, B>
where
    B: hyper::body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut client = Client::builder(TokioExecutor::new());
    client.http2_only(proto == Proto::H2);
    if !pooled {
        client.pool_max_idle_per_host(0);
    }
    client.build(connector_as(cas, proto, identity))
}

pub struct Reply {
    pub status: u16,
    pub version: http::Version,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn send(
    client: &HttpsClient,
    method: &str,
    url: &str,
    body: impl Into<Bytes>,
) -> Result<Reply, String> {
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    read_reply(resp).await
}

/// Reads a whole answer: its status, HTTP version and body.
pub async fn read_reply(resp: http::Response<hyper::body::Incoming>) -> Result<Reply, String> {
    let status = resp.status().as_u16();
    let version = resp.version();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Reply {
        status,
        version,
        body,
    })
}

pub async fn post(client: &HttpsClient, url: &str, body: &Value) -> Reply {
    send(client, "POST", url, bytes(body))
        .await
        .expect("request succeeds")
}

/// A GET without a body, e.g. a probe.
pub async fn get(client: &HttpsClient, url: &str) -> Result<Reply, String> {
    send(client, "GET", url, "").await
}

/// A client whose request bodies are streamed in parts through a [`Channel`].
pub type StreamingClient = Client<Connector, Channel<Bytes>>;

/// A request whose body is still arriving: the sender for the rest of it, and the task that
/// waits for the answer.
pub struct Streaming {
    pub tx: http_body_util::channel::Sender<Bytes>,
    pub answer: tokio::task::JoinHandle<
        Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error>,
    >,
}

/// POSTs to `url` with a body of which only `first` is sent; the rest goes through `tx`.
pub async fn post_streaming(client: &StreamingClient, url: &str, first: &[u8]) -> Streaming {
    let (mut tx, channel) = Channel::<Bytes>::new(1);
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .body(channel)
        .expect("request");
    let answer = tokio::spawn(client.request(req));
    tx.send_data(Bytes::copy_from_slice(first))
        .await
        .expect("first half");
    Streaming { tx, answer }
}

/// The `response` of an AdmissionReview answer, after checking it is a 200 and a v1 review.
pub fn response(reply: &Reply) -> Value {
    assert_eq!(reply.status, 200, "{}", reply.text());
    let v = reply.json();
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(v["kind"], "AdmissionReview");
    v["response"].clone()
}

/// The value of the metric line that starts with `series` (name and labels) on `/metrics`.
pub async fn metric(server: &TestServer, series: &str) -> f64 {
    let page = scrape(server).await;
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The server's `/metrics` page, read over plain HTTP/1.0 from its metrics listener.
pub async fn scrape(server: &TestServer) -> String {
    scrape_at(server.metrics_addr).await
}

/// The `/metrics` page of the metrics listener at `addr`, over plain HTTP/1.0.
pub async fn scrape_at(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect metrics");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    out
}

pub fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("json")
}

/// An AdmissionReview for a pod CREATE, as kube-apiserver sends it (tests/data).
pub fn pod_review(uid: &str, namespace: &str, pod: Value, dry_run: bool) -> Value {
    Fixture::pod_create()
        .uid(uid)
        .namespace(namespace)
        .object(pod)
        .dry_run(dry_run)
        .into_value()
}

/// The pod of the fixture, named `name` in `namespace`.
pub fn pod(name: &str, namespace: &str) -> Value {
    let mut review = Fixture::pod_create().name(name).namespace(namespace);
    review.object_mut().take()
}

/// One hostile case: (name, endpoint, body, status, text the answer must contain).
pub type HostileCase = (&'static str, &'static str, Vec<u8>, u16, &'static str);

/// The well-formed review the cases mangle; still answered normally after each table.
pub fn good_review() -> Value {
    pod_review("u-hostile", "ci", pod("p", "ci"), false)
}

/// Sends each hostile case over h2 to a fresh server and checks its status, its text and the
/// size of its answer; then that the server is still healthy and answers a good review
/// normally.
pub async fn answers_are_bounded(cases: &[HostileCase]) {
    let server = TestServer::start(QUIET).await;
    let client = server.client(Proto::H2);
    for (name, endpoint, body, status, expect) in cases {
        let reply = send(
            &client,
            "POST",
            &server.url(&format!("/{endpoint}")),
            body.clone(),
        )
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(reply.status, *status, "{name}: {}", reply.text());
        let text = reply.text();
        assert!(
            text.contains(expect),
            "{name}: {}",
            &text[..text.len().min(400)]
        );
        // Bounded by the request: a mutate patch for many containers is the largest answer,
        // about 10 times its pod for 5000 containers (a JSONPatch op and an annotation entry per
        // container, in base64). Written as JSON arrays of byte values it was 28 times.
        assert!(
            text.len() <= 12 * body.len() + 64 * 1024,
            "{name}: a {} byte answer to {} bytes",
            text.len(),
            body.len()
        );
    }
    let health = get(&client, &server.url("/healthz"))
        .await
        .expect("healthz");
    assert_eq!(health.status, 200);
    // A good review is still answered normally after all of them.
    let reply = post(&client, &server.url("/validate"), &good_review()).await;
    assert_eq!(response(&reply)["allowed"], true);
}
