//! `bulwark cabundle`: keeps the caBundle of the webhook configurations equal to the
//! certificate Secret's `ca.crt`.
//!
//! A process of its own, with its own ServiceAccount, so that the webhook pods, which every
//! review reaches, cannot write the webhook configurations: RBAC cannot limit an `update` to
//! the caBundle field, and whoever may update a configuration may widen its rules to be sent
//! every object written in the cluster. This process listens on no port and serves nothing;
//! it reads one Secret and changes only the caBundle of the two configurations it is named.

use std::time::Duration;

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
use kube::{Api, Client, Resource, api::PostParams};

use super::{
    pem_blocks,
    sync::{ca_bundle_text, secret_and_configurations},
};

#[derive(Debug, thiserror::Error)]
pub enum CaBundleError {
    #[error("certificate Secret {secret}: {source}")]
    Secret { secret: String, source: kube::Error },
    #[error("certificate Secret {0} not found (the webhook creates it)")]
    NoSecret(String),
    #[error("certificate Secret {secret}: ca.crt is not a bundle of certificates: {why}")]
    BadBundle { secret: String, why: String },
    #[error("{kind} {name}: {source}")]
    Configuration {
        kind: &'static str,
        name: String,
        source: kube::Error,
    },
}

/// Which Secret to read and which configurations to keep.
#[derive(Debug, Clone)]
pub struct CaBundleOptions {
    pub namespace: String,
    pub secret: String,
    pub webhook_configuration: String,
}

/// How soon to look again when nothing changed (changes are watched; a safety net), and after
/// a failure.
const RECHECK: Duration = Duration::from_secs(300);
const RETRY: Duration = Duration::from_secs(5);

fn client_configs_mutating(c: &mut MutatingWebhookConfiguration) -> Vec<&mut WebhookClientConfig> {
    c.webhooks
        .iter_mut()
        .flatten()
        .map(|w| &mut w.client_config)
        .collect()
}

fn client_configs_validating(
    c: &mut ValidatingWebhookConfiguration,
) -> Vec<&mut WebhookClientConfig> {
    c.webhooks
        .iter_mut()
        .flatten()
        .map(|w| &mut w.client_config)
        .collect()
}

/// Sets the caBundle of every webhook in the named configuration. `Ok(false)`: it does not
/// exist (yet: an install applies it alongside the Deployment).
async fn sync_bundle<K>(
    api: Api<K>,
    name: &str,
    bundle: &ByteString,
    configs: fn(&mut K) -> Vec<&mut WebhookClientConfig>,
) -> Result<bool, kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    K::DynamicType: Default,
{
    let Some(mut obj) = api.get_opt(name).await? else {
        return Ok(false);
    };
    let mut changed = false;
    for c in configs(&mut obj) {
        if c.ca_bundle.as_ref() != Some(bundle) {
            c.ca_bundle = Some(bundle.clone());
            changed = true;
        }
    }
    if changed {
        api.replace(name, &PostParams::default(), &obj).await?;
        tracing::info!(
            kind = %K::kind(&Default::default()),
            name,
            "caBundle updated"
        );
    }
    Ok(true)
}

/// Sets `bundle_pem` as the caBundle of every webhook in the Mutating- and the
/// ValidatingWebhookConfiguration called `name`; for each, `Ok(false)` if it does not exist.
pub async fn set_ca_bundle(
    client: &Client,
    name: &str,
    bundle_pem: &str,
) -> [Result<bool, kube::Error>; 2] {
    let bundle = ByteString(bundle_pem.as_bytes().to_vec());
    [
        sync_bundle(
            Api::<MutatingWebhookConfiguration>::all(client.clone()),
            name,
            &bundle,
            client_configs_mutating,
        )
        .await,
        sync_bundle(
            Api::<ValidatingWebhookConfiguration>::all(client.clone()),
            name,
            &bundle,
            client_configs_validating,
        )
        .await,
    ]
}

/// The kinds [`set_ca_bundle`] answers for, in its order.
pub const CONFIGURATION_KINDS: [&str; 2] = [
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
];

/// Pure: the bundle to set, if `ca_crt` is one: certificates only, at least one, each
/// parseable. A Secret being rewritten by hand must not empty the caBundle.
pub fn usable_bundle(ca_crt: &str) -> Result<String, String> {
    let blocks = pem_blocks(ca_crt);
    if blocks.is_empty() {
        return Err("no certificate".into());
    }
    for block in &blocks {
        bulwark_certs::facts(block).map_err(|e| e.to_string())?;
    }
    Ok(blocks.concat())
}

/// Sets the caBundles from the Secret once; `Ok(false)` when a configuration does not exist
/// (yet: an install applies it alongside).
pub async fn sync_once(client: &Client, opts: &CaBundleOptions) -> Result<bool, CaBundleError> {
    let secret = format!("{}/{}", opts.namespace, opts.secret);
    let found = Api::<Secret>::namespaced(client.clone(), &opts.namespace)
        .get_opt(&opts.secret)
        .await
        .map_err(|source| CaBundleError::Secret {
            secret: secret.clone(),
            source,
        })?
        .ok_or_else(|| CaBundleError::NoSecret(secret.clone()))?;
    let bundle = usable_bundle(&ca_bundle_text(&found))
        .map_err(|why| CaBundleError::BadBundle { secret, why })?;
    let name = &opts.webhook_configuration;
    let mut all = true;
    for (kind, r) in CONFIGURATION_KINDS
        .iter()
        .zip(set_ca_bundle(client, name, &bundle).await)
    {
        match r {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    kind,
                    name,
                    "webhook configuration not found; its caBundle is set once it exists"
                );
                all = false;
            }
            Err(source) => {
                return Err(CaBundleError::Configuration {
                    kind,
                    name: name.clone(),
                    source,
                });
            }
        }
    }
    Ok(all)
}

/// Keeps the caBundles current until `shutdown`: on every change of the Secret or of either
/// configuration (an edit or re-install that drops the caBundle is repaired at once).
pub async fn run(client: Client, opts: CaBundleOptions, shutdown: impl Future<Output = ()>) {
    let name = &opts.webhook_configuration;
    let mut events = secret_and_configurations(
        Api::<Secret>::namespaced(client.clone(), &opts.namespace),
        &opts.secret,
        &client,
        name,
    );
    let mut shutdown = std::pin::pin!(shutdown);
    let mut wait = Duration::ZERO;
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
            () = tokio::time::sleep(wait) => {}
            () = &mut shutdown => return,
        }
        wait = match sync_once(&client, &opts).await {
            Ok(true) => RECHECK,
            Ok(false) => RETRY,
            Err(e) => {
                tracing::warn!(error = %e, "caBundle not updated; retrying");
                RETRY
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_bundle_of_certificates_is_set() {
        let ca = bulwark_certs::Ca::new("a", 2).unwrap();
        let other = bulwark_certs::Ca::new("b", 2).unwrap();
        let two = format!("{}{}", ca.cert_pem(), other.cert_pem());
        assert_eq!(usable_bundle(&two), Ok(two.clone()));
        assert!(usable_bundle("").is_err());
        assert!(usable_bundle(ca.key_pem()).is_err(), "a key is no bundle");
        let broken = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n";
        assert!(usable_bundle(&format!("{two}{broken}")).is_err());
    }
}
