//! A real bulwark server on 127.0.0.1 with freshly generated certificates, and HTTPS clients
//! that speak h2 or http/1.1 to it.

#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bulwark::{
    config::Config,
    review::fixtures::Fixture,
    serve::tls::ClientCa,
    webhook::{Certificates, Started, Webhook, WebhookOptions},
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use serde_json::Value;

pub type HttpsClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

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
        let dir = temp_dir("server");
        let ca_pem = write_certs(&dir);
        let config = Config::parse(config_yaml, "test config").expect("config");
        let started = Webhook::start(WebhookOptions {
            settings: config.webhook,
            client: None,
            own_namespace: None,
            identity: None,
            peers_service: None,
            certificates: Certificates::Files {
                cert: dir.join("tls.crt"),
                key: dir.join("tls.key"),
            },
            client_ca,
            listen: "127.0.0.1:0".parse().expect("addr"),
            metrics_listen: Some("127.0.0.1:0".parse().expect("addr")),
            reload_interval: Duration::from_millis(50),
            drain_timeout: Duration::from_secs(5),
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

/// A TLS connector that trusts only the given CAs and offers only `proto` in ALPN.
pub fn connector(
    cas: &[&str],
    proto: Proto,
) -> hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector> {
    connector_as(cas, proto, None)
}

/// [`connector`] presenting `identity` (a certificate and key, PEM) as its client certificate.
pub fn connector_as(
    cas: &[&str],
    proto: Proto,
    identity: Option<&bulwark_certs::Pair>,
) -> hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector> {
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
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    match proto {
        Proto::H2 => builder.enable_http2().build(),
        Proto::Http1 => builder.enable_http1().build(),
    }
}

/// An HTTPS client that trusts only the given CAs; `pooled: false` opens a connection (and a
/// TLS handshake) per request.
pub fn client_trusting(cas: &[&str], proto: Proto, pooled: bool) -> HttpsClient {
    client_with_body(cas, proto, pooled)
}

/// [`client_trusting`] for any request body type (e.g. one streamed in parts).
pub fn client_with_body<B>(
    cas: &[&str],
    proto: Proto,
    pooled: bool,
) -> Client<hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>, B>
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
    client.build(connector(cas, proto))
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
    send(client, "POST", url, serde_json::to_vec(body).expect("json"))
        .await
        .expect("request succeeds")
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
