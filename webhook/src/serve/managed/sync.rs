//! Keeps the certificate Secret and the served certificate in step. Reads and writes go
//! through the API server; the plan is in the parent. The webhook configurations are only
//! read here (is a staged CA trusted yet?): `bulwark cabundle` (`cabundle.rs`) writes their
//! caBundle, with a ServiceAccount of its own.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::StreamExt;
use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::{
            MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
        },
        core::v1::Secret,
    },
};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams, PostParams},
    runtime::watcher,
};

use super::{
    CA_PROMOTED_ANNOTATION, CA_STAGED_ANNOTATION, CA_TRUSTED_ANNOTATION, Observed,
    ROTATE_ANNOTATION, ROTATE_CA_ANNOTATION, ROTATED_ANNOTATION, ROTATED_CA_ANNOTATION, SecretPlan,
    Stored, Wanted, fleet, plan,
};
use crate::{
    backoff::Jittered,
    metrics::webhook::TlsMetrics,
    serve::tls::{CertStore, TlsError},
};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("certificate Secret {secret}: {source}")]
    Api { secret: String, source: kube::Error },
    #[error("generating certificates: {0}")]
    Cert(#[from] bulwark_certs::CertError),
    #[error("the Secret's serving certificate: {0}")]
    Tls(#[from] TlsError),
    #[error("certificate Secret {0}: changed by others on every attempt")]
    Contended(String),
}

/// Where the certificate lives and what it must be.
#[derive(Debug, Clone)]
pub struct ManagedOptions {
    pub namespace: String,
    pub secret: String,
    /// The webhook's Service: its ready endpoints are asked what they serve before older CAs
    /// are retired.
    pub service: String,
    /// The Mutating- and ValidatingWebhookConfiguration whose caBundle must trust a new CA
    /// before a certificate it signed is served.
    pub webhook_configuration: String,
    pub wanted: Wanted,
}

impl ManagedOptions {
    fn secret_ref(&self) -> String {
        format!("{}/{}", self.namespace, self.secret)
    }
}

const CA_CRT: &str = "ca.crt";
/// Where earlier versions kept the CA key; dropped from the Secret when found.
const CA_KEY: &str = "ca.key";
const TLS_CRT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
const NEXT_CRT: &str = "next.crt";
const NEXT_KEY: &str = "next.key";

fn text(data: &BTreeMap<String, ByteString>, key: &str) -> String {
    // A non-UTF-8 value is as unusable as a missing one; the plan replaces it.
    data.get(key)
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
        .unwrap_or_default()
}

/// The Secret's `ca.crt` as text (empty when missing or not UTF-8).
pub fn ca_bundle_text(secret: &Secret) -> String {
    secret
        .data
        .as_ref()
        .map(|d| text(d, CA_CRT))
        .unwrap_or_default()
}

impl Stored {
    pub fn from_secret(secret: &Secret) -> Stored {
        let data = secret.data.clone().unwrap_or_default();
        let annotations = secret.metadata.annotations.clone().unwrap_or_default();
        let unix = |key: &str| annotations.get(key).and_then(|v| v.parse().ok());
        Stored {
            ca_bundle: text(&data, CA_CRT),
            cert: text(&data, TLS_CRT),
            key: text(&data, TLS_KEY),
            next_cert: text(&data, NEXT_CRT),
            next_key: text(&data, NEXT_KEY),
            legacy_ca_key: data.contains_key(CA_KEY),
            rotate: annotations.get(ROTATE_ANNOTATION).cloned(),
            rotated: annotations.get(ROTATED_ANNOTATION).cloned(),
            rotate_ca: annotations.get(ROTATE_CA_ANNOTATION).cloned(),
            rotated_ca: annotations.get(ROTATED_CA_ANNOTATION).cloned(),
            ca_staged_at: unix(CA_STAGED_ANNOTATION),
            ca_trusted_at: unix(CA_TRUSTED_ANNOTATION),
            ca_promoted_at: unix(CA_PROMOTED_ANNOTATION),
        }
    }

    /// `base` with this content; its other labels and annotations are kept, its other data
    /// (a CA key of an earlier version) is not.
    fn into_secret(self, mut base: Secret) -> Secret {
        let bytes = |s: String| ByteString(s.into_bytes());
        // A Secret's type cannot change; one made by hand (Opaque) keeps its type.
        base.type_.get_or_insert_with(|| "kubernetes.io/tls".into());
        base.string_data = None;
        let mut data = BTreeMap::from([
            (CA_CRT.into(), bytes(self.ca_bundle)),
            (TLS_CRT.into(), bytes(self.cert)),
            (TLS_KEY.into(), bytes(self.key)),
        ]);
        if !self.next_cert.is_empty() || !self.next_key.is_empty() {
            data.insert(NEXT_CRT.into(), bytes(self.next_cert));
            data.insert(NEXT_KEY.into(), bytes(self.next_key));
        }
        base.data = Some(data);
        let annotations = base.metadata.annotations.get_or_insert_with(BTreeMap::new);
        for (key, value) in [
            (ROTATED_ANNOTATION, self.rotated),
            (ROTATED_CA_ANNOTATION, self.rotated_ca),
            (
                CA_STAGED_ANNOTATION,
                self.ca_staged_at.map(|t| t.to_string()),
            ),
            (
                CA_TRUSTED_ANNOTATION,
                self.ca_trusted_at.map(|t| t.to_string()),
            ),
            (
                CA_PROMOTED_ANNOTATION,
                self.ca_promoted_at.map(|t| t.to_string()),
            ),
        ] {
            match value {
                Some(v) => annotations.insert(key.into(), v),
                None => annotations.remove(key),
            };
        }
        base
    }
}

/// Whether every webhook of both configurations has `ca` in its caBundle. A configuration
/// that cannot be read (or does not exist) trusts nothing.
async fn trusted(client: &Client, name: &str, ca: &str) -> bool {
    let holds = |config: Option<&WebhookClientConfig>| {
        config
            .and_then(|c| c.ca_bundle.as_ref())
            .and_then(|b| std::str::from_utf8(&b.0).ok())
            .is_some_and(|bundle| super::pem_blocks(bundle).iter().any(|b| b == ca))
    };
    let mutating = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get_opt(name)
        .await;
    let validating = Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .get_opt(name)
        .await;
    match (mutating, validating) {
        (Ok(Some(m)), Ok(Some(v))) => {
            let m = m.webhooks.unwrap_or_default();
            let v = v.webhooks.unwrap_or_default();
            m.iter().all(|w| holds(Some(&w.client_config)))
                && v.iter().all(|w| holds(Some(&w.client_config)))
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(name, error = %e, "cannot read the webhook configurations; the new CA waits");
            false
        }
        _ => {
            tracing::warn!(
                name,
                "webhook configuration not found; the new CA waits until its caBundle holds it"
            );
            false
        }
    }
}

/// What the plan needs from beyond the Secret, asked only when it matters: the caBundles
/// while a renewal is staged, the replicas when older CAs could go.
async fn observe(client: &Client, opts: &ManagedOptions, stored: Option<&Stored>) -> Observed {
    let mut observed = Observed::default();
    let Some(s) = stored else {
        return observed;
    };
    if s.is_staged()
        && let Some(ca) = s.newest_ca()
    {
        observed.trusted = trusted(client, &opts.webhook_configuration, &ca).await;
    }
    if s.retire_due(&opts.wanted, SystemTime::now()) {
        observed.fleet_current = match fleet::service_serves(
            client,
            &opts.namespace,
            &opts.service,
            &s.cert,
        )
        .await
        {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!(error = %e, "cannot tell what the replicas serve; older CAs stay trusted");
                false
            }
        };
    }
    observed
}

/// Brings the Secret to what the plan wants and returns it with the time to look again.
/// Concurrent writers are resolved by the resourceVersion: a loser reads again and, finding
/// the winner's certificate good, keeps it.
async fn settle(
    client: &Client,
    api: &Api<Secret>,
    opts: &ManagedOptions,
    metrics: &TlsMetrics,
) -> Result<(Stored, SystemTime), SyncError> {
    let api_err = |source| SyncError::Api {
        secret: opts.secret_ref(),
        source,
    };
    for _ in 0..8 {
        let current = api.get_opt(&opts.secret).await.map_err(api_err)?;
        let stored = current.as_ref().map(Stored::from_secret);
        let observed = observe(client, opts, stored.as_ref()).await;
        let (next, why) = match plan(stored.as_ref(), &opts.wanted, observed, SystemTime::now())? {
            SecretPlan::Keep { recheck_at } => match stored {
                Some(s) => return Ok((s, recheck_at)),
                None => continue,
            },
            SecretPlan::Write { next, why } => (next, why),
        };
        let result = match current {
            None => {
                let mut base = Secret::default();
                base.metadata.name = Some(opts.secret.clone());
                base.metadata.namespace = Some(opts.namespace.clone());
                let labels = base.metadata.labels.get_or_insert_with(BTreeMap::new);
                labels.insert("app.kubernetes.io/name".into(), "bulwark".into());
                labels.insert("app.kubernetes.io/component".into(), "webhook".into());
                api.create(&PostParams::default(), &next.into_secret(base))
                    .await
            }
            // The resourceVersion read above travels with `base`: a replace after someone
            // else's write is refused with 409.
            Some(base) => {
                api.replace(
                    &opts.secret,
                    &PostParams::default(),
                    &next.into_secret(base),
                )
                .await
            }
        };
        match result {
            Ok(_) => {
                metrics.cert_writes.with_label_values(&[why.as_str()]).inc();
                tracing::info!(secret = %opts.secret_ref(), why = why.as_str(), "certificate Secret written");
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                tracing::debug!(secret = %opts.secret_ref(), "another replica wrote the Secret first; reading it again");
            }
            Err(e) => return Err(api_err(e)),
        }
    }
    Err(SyncError::Contended(opts.secret_ref()))
}

/// Serves the Secret's pair. `false` when it is unusable, so the caller looks again soon.
fn publish(
    opts: &ManagedOptions,
    stored: &Stored,
    store: &CertStore,
    metrics: &TlsMetrics,
) -> bool {
    match store.replace(&stored.cert, &stored.key) {
        Ok(true) => tracing::info!(secret = %opts.secret_ref(), "serving certificate rotated"),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(secret = %opts.secret_ref(), error = %e, "the Secret's serving pair is unusable; serving the current one");
            return false;
        }
    }
    if let Ok(f) = bulwark_certs::facts(&stored.cert) {
        let secs = f
            .not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        metrics.cert_not_after.set(secs as f64);
    }
    true
}

/// How soon to look again when everything is in order (renewals are planned by time and
/// changes are watched; this is the safety net for a missed event).
const RECHECK: Duration = Duration::from_secs(300);
/// How soon to look again after a failure.
const RETRY: Duration = Duration::from_secs(10);
/// Start-up attempts before giving up with the error (the Pod restarts with back-off).
const START_ATTEMPTS: u32 = 6;

/// Settles the Secret, loads its certificate and keeps everything current in the background.
pub async fn start(
    client: Client,
    opts: ManagedOptions,
    metrics: TlsMetrics,
) -> Result<Arc<CertStore>, SyncError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &opts.namespace);
    let mut backoff = Jittered::new(Duration::from_millis(500), Duration::from_secs(8));
    let mut attempt = 0;
    let (stored, recheck) = loop {
        match settle(&client, &api, &opts, &metrics).await {
            Ok(settled) => break settled,
            Err(e) if attempt + 1 >= START_ATTEMPTS => return Err(e),
            Err(e) => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "certificate Secret not ready; retrying");
                tokio::time::sleep(backoff.next().unwrap_or(RETRY)).await;
            }
        }
    };
    let store = CertStore::from_pem(&stored.cert, &stored.key)?;
    let published = publish(&opts, &stored, &store, &metrics);
    let first = if published {
        recheck
    } else {
        SystemTime::now() + RETRY
    };
    tokio::spawn(keep_current(
        client,
        api,
        opts,
        store.clone(),
        metrics,
        first,
    ));
    Ok(store)
}

fn sleep_until(t: SystemTime) -> tokio::time::Sleep {
    let wait = t
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    tokio::time::sleep(wait.min(RECHECK))
}

type Changes = futures::stream::BoxStream<'static, Result<(), (&'static str, watcher::Error)>>;

/// Changes of the one object called `name`.
pub(super) fn named_watch<K>(api: Api<K>, name: &str, what: &'static str) -> Changes
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    crate::backoff::watch(api, config)
        .map(move |event| event.map(|_| ()).map_err(|e| (what, e)))
        .boxed()
}

/// Changes of the certificate Secret `secret` and of the two webhook configurations called
/// `configurations`: what both the certificate sync and `bulwark cabundle` react to.
pub(super) fn secret_and_configurations(
    secrets: Api<Secret>,
    secret: &str,
    client: &Client,
    configurations: &str,
) -> futures::stream::SelectAll<Changes> {
    futures::stream::select_all([
        named_watch(secrets, secret, "certificate Secret"),
        named_watch(
            Api::<MutatingWebhookConfiguration>::all(client.clone()),
            configurations,
            "MutatingWebhookConfiguration",
        ),
        named_watch(
            Api::<ValidatingWebhookConfiguration>::all(client.clone()),
            configurations,
            "ValidatingWebhookConfiguration",
        ),
    ])
}

/// Reacts to every change of the Secret and of the two webhook configurations (a caBundle
/// that now holds a staged CA moves the renewal on), and to the planned times.
async fn keep_current(
    client: Client,
    api: Api<Secret>,
    opts: ManagedOptions,
    store: Arc<CertStore>,
    metrics: TlsMetrics,
    mut next: SystemTime,
) {
    // The Secret (another replica's write, `bulwark certs rotate`) and the two configurations
    // (`bulwark cabundle` setting the caBundle, or an edit dropping it).
    let mut events = secret_and_configurations(
        api.clone(),
        &opts.secret,
        &client,
        &opts.webhook_configuration,
    );
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(())) => {}
                Some(Err((what, e))) => {
                    tracing::warn!(what, error = %e, "watch failed; retrying");
                    continue;
                }
                None => return,
            },
            () = sleep_until(next) => {}
        }
        next = match settle(&client, &api, &opts, &metrics).await {
            Ok((stored, recheck)) => {
                if publish(&opts, &stored, &store, &metrics) {
                    recheck.min(SystemTime::now() + RECHECK)
                } else {
                    SystemTime::now() + RETRY
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "certificate Secret not settled; retrying");
                SystemTime::now() + RETRY
            }
        };
    }
}

/// Asks the replicas for a new serving certificate, or with `ca` for a new CA first
/// (`bulwark certs rotate [--ca]`). Returns the annotation set and its value.
pub async fn request_rotation(
    client: Client,
    namespace: &str,
    secret: &str,
    ca: bool,
) -> Result<(&'static str, String), kube::Error> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let value = format!("{}.{:09}", now.as_secs(), now.subsec_nanos());
    let key = if ca {
        ROTATE_CA_ANNOTATION
    } else {
        ROTATE_ANNOTATION
    };
    let patch = serde_json::json!({"metadata": {"annotations": {key: value}}});
    Api::<Secret>::namespaced(client, namespace)
        .patch(secret, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok((key, value))
}

#[cfg(test)]
mod api_tests;
