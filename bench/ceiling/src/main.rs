//! The ceiling bulwark's webhook is measured against (bench/webhook-throughput.sh): the same
//! TLS and HTTP stack with the same settings (rustls with ring, TLS 1.2 and 1.3, ALPN h2 and
//! http/1.1, hyper-util's auto builder on a multi-threaded tokio runtime), reading each
//! request body in full and answering every POST with one constant AdmissionReview of the
//! size bulwark answers with. Whatever bulwark spends beyond this is decoding, deciding and
//! encoding.
//!
//! With `--allow` instead of `--response`, it is the floor any webhook costs kube-apiserver
//! (bench/pod-latency.sh): a no-op webhook that reads each AdmissionReview only for its uid and
//! allows it. `--mutate-patch FILE` adds that JSON patch to its answers on `/mutate`: the floor
//! of a defaulting webhook, which makes kube-apiserver apply a patch and decode the pod again.
//!
//! Usage: bulwark-bench-ceiling --tls-cert F --tls-key F --listen ADDR
//!          (--response FILE | --allow [--mutate-patch FILE])

use std::{convert::Infallible, net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// bulwark's own body limit, so an oversized body costs both servers the same.
const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// bulwark's HTTP/2 stream limit per connection.
const MAX_STREAMS: u32 = 256;

struct Args {
    cert: PathBuf,
    key: PathBuf,
    listen: SocketAddr,
    answer: Answer,
}

/// What every POST is answered.
#[derive(Clone)]
enum Answer {
    /// These bytes, whatever was asked.
    Constant(Bytes),
    /// Allowed, with the review's uid: the least a webhook can do; on `/mutate` with this
    /// JSON patch (base64, as kube-apiserver reads it), if any.
    Allow { mutate_patch: Option<Arc<str>> },
}

fn parse_args() -> Result<Args, String> {
    let mut cert = None;
    let mut key = None;
    let mut listen = None;
    let mut response = None;
    let mut mutate_patch = None;
    let mut allow = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--allow" {
            allow = true;
            continue;
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--tls-cert" => cert = Some(PathBuf::from(value)),
            "--tls-key" => key = Some(PathBuf::from(value)),
            "--listen" => {
                listen = Some(
                    value
                        .parse()
                        .map_err(|e| format!("--listen {value}: {e}"))?,
                )
            }
            "--response" => response = Some(PathBuf::from(value)),
            "--mutate-patch" => mutate_patch = Some(PathBuf::from(value)),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let need = |v: Option<PathBuf>, name: &str| v.ok_or_else(|| format!("{name} is required"));
    let answer = match (response, allow) {
        (Some(path), false) => Answer::Constant(Bytes::from(
            std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?,
        )),
        (None, true) => Answer::Allow {
            mutate_patch: mutate_patch.as_deref().map(read_patch).transpose()?,
        },
        _ => return Err("give either --response FILE or --allow".into()),
    };
    if matches!(answer, Answer::Constant(_)) && mutate_patch.is_some() {
        return Err("--mutate-patch goes with --allow".into());
    }
    Ok(Args {
        cert: need(cert, "--tls-cert")?,
        key: need(key, "--tls-key")?,
        listen: listen.ok_or("--listen is required")?,
        answer,
    })
}

/// The JSON patch in `path`, base64-encoded as an answer carries it.
fn read_patch(path: &std::path::Path) -> Result<Arc<str>, String> {
    use base64::Engine;
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice::<serde_json::Value>(&text)
        .ok()
        .filter(serde_json::Value::is_array)
        .ok_or_else(|| format!("{}: not a JSON patch (an array)", path.display()))?;
    Ok(base64::engine::general_purpose::STANDARD
        .encode(text)
        .into())
}

fn tls_config(args: &Args) -> Result<Arc<rustls::ServerConfig>, String> {
    let chain = CertificateDer::pem_file_iter(&args.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", args.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&args.key)
        .map_err(|e| format!("{}: {e}", args.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|e| format!("TLS configuration: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Only the uid of an AdmissionReview; everything else is skipped.
#[derive(serde::Deserialize)]
struct Review<'a> {
    #[serde(borrow)]
    request: Uid<'a>,
}

#[derive(serde::Deserialize)]
struct Uid<'a> {
    #[serde(borrow)]
    uid: std::borrow::Cow<'a, str>,
}

/// The allowing AdmissionReview for `body` (with `patch`, if given), or `None` when it is not
/// one.
fn allow(body: &[u8], patch: Option<&str>) -> Option<Bytes> {
    let review: Review = serde_json::from_slice(body).ok()?;
    let mut response = serde_json::json!({"uid": review.request.uid, "allowed": true});
    if let Some(patch) = patch {
        response["patchType"] = "JSONPatch".into();
        response["patch"] = patch.into();
    }
    let answer = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    });
    serde_json::to_vec(&answer).ok().map(Bytes::from)
}

async fn answer(
    req: Request<Incoming>,
    answer: Answer,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: Bytes| {
        let mut r = Response::new(Full::new(body));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        r
    };
    let mutating = req.uri().path() == "/mutate";
    if req.method() != Method::POST {
        return Ok(reply(StatusCode::METHOD_NOT_ALLOWED, Bytes::new()));
    }
    let Ok(body) = Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    else {
        return Ok(reply(StatusCode::BAD_REQUEST, Bytes::new()));
    };
    Ok(match answer {
        Answer::Constant(bytes) => reply(StatusCode::OK, bytes),
        Answer::Allow { mutate_patch } => match allow(
            &body.to_bytes(),
            mutate_patch.as_deref().filter(|_| mutating),
        ) {
            Some(bytes) => reply(StatusCode::OK, bytes),
            None => reply(StatusCode::BAD_REQUEST, Bytes::new()),
        },
    })
}

async fn serve(args: Args) -> Result<(), String> {
    let acceptor = TlsAcceptor::from(tls_config(&args)?);
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(true);
    builder.http2().max_concurrent_streams(MAX_STREAMS);
    eprintln!("ceiling listening on {}", args.listen);
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let response = args.answer.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = service_fn(move |req| answer(req, response.clone()));
            let _ = builder.serve_connection(TokioIo::new(tls), service).await;
        });
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bulwark-bench-ceiling: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bulwark-bench-ceiling: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulwark-bench-ceiling: {e}");
            ExitCode::FAILURE
        }
    }
}
