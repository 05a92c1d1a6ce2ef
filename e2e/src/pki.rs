//! Certificates, keys and kubeconfigs of the e2e cluster, generated fresh by every `up`.
//!
//! One CA signs kube-apiserver's serving certificate and every component's client
//! certificate (the common name is the user, organizations are groups, as Kubernetes reads
//! them). bulwark's webhook gets its own CA, as in a real install, and that CA is what the
//! webhook configurations carry as `caBundle`.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use anyhow::Context;
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use bulwark_certs::{Ca, Pair, write_pem};

use crate::objects::{
    BULWARK_NAMESPACE, CABUNDLE_SERVICE_ACCOUNT, NODE_CONTROLLER_SERVICE_ACCOUNT,
    WEBHOOK_SERVICE_ACCOUNT,
};

/// The cluster IP of the `kubernetes` Service: first address of the service range.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
const DAYS: u32 = 30;

/// Paths of everything generated, all inside `<cluster dir>/pki`.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_cert: PathBuf,
    pub apiserver_cert: PathBuf,
    pub apiserver_key: PathBuf,
    /// Signs service account tokens (apiserver and controller-manager).
    pub service_account_key: PathBuf,
    /// Verifies them.
    pub service_account_pub: PathBuf,
    /// The webhook CA, as read back from the caBundle the webhook set.
    pub webhook_ca_cert: PathBuf,
    /// Signs the client certificate kube-apiserver shows the webhook (its --client-ca).
    pub webhook_client_ca: PathBuf,
    /// Its key, so tests can forge a certificate of the right CA with the wrong name.
    pub webhook_client_ca_key: PathBuf,
    /// kube-apiserver's --admission-control-config-file: which client certificate it
    /// presents to webhooks.
    pub admission_config: PathBuf,
}

impl Pki {
    /// Where [`generate`] puts each file for a cluster directory.
    pub fn in_dir(dir: &Path) -> Pki {
        let file = |name: &str| dir.join("pki").join(name);
        Pki {
            ca_cert: file("ca.crt"),
            apiserver_cert: file("apiserver.crt"),
            apiserver_key: file("apiserver.key"),
            service_account_key: file("service-account.key"),
            service_account_pub: file("service-account.pub"),
            webhook_ca_cert: file("webhook-ca.crt"),
            webhook_client_ca: file("webhook-client-ca.crt"),
            webhook_client_ca_key: file("webhook-client-ca.key"),
            admission_config: file("admission.yaml"),
        }
    }
}

/// Users the components run as.
#[derive(Debug, Clone, Copy)]
pub enum Identity {
    Admin,
    ControllerManager,
    Scheduler,
    Kwok,
    Webhook,
    NodeController,
    Cabundle,
}

impl Identity {
    pub const ALL: [Identity; 7] = [
        Identity::Admin,
        Identity::ControllerManager,
        Identity::Scheduler,
        Identity::Kwok,
        Identity::Webhook,
        Identity::NodeController,
        Identity::Cabundle,
    ];

    pub fn file_stem(self) -> &'static str {
        match self {
            Identity::Admin => "admin",
            Identity::ControllerManager => "controller-manager",
            Identity::Scheduler => "scheduler",
            Identity::Kwok => "kwok",
            Identity::Webhook => "webhook",
            Identity::NodeController => "node-controller",
            Identity::Cabundle => "cabundle",
        }
    }

    fn user(self) -> (&'static str, &'static [&'static str]) {
        match self {
            Identity::Admin => ("e2e-admin", &["system:masters"]),
            Identity::ControllerManager => ("system:kube-controller-manager", &[]),
            Identity::Scheduler => ("system:kube-scheduler", &[]),
            // kwok stands in for every kubelet, writing node and pod status of all nodes.
            Identity::Kwok => ("kwok", &["system:masters"]),
            // bulwark's components authenticate as the admin and impersonate their
            // ServiceAccounts, so they hold exactly the rights deploy/base/rbac.yaml grants.
            Identity::Webhook | Identity::NodeController | Identity::Cabundle => {
                ("e2e-admin", &["system:masters"])
            }
        }
    }

    /// The ServiceAccount user this identity acts as, if any.
    pub fn impersonates(self) -> Option<String> {
        let sa = match self {
            Identity::Webhook => WEBHOOK_SERVICE_ACCOUNT,
            Identity::NodeController => NODE_CONTROLLER_SERVICE_ACCOUNT,
            Identity::Cabundle => CABUNDLE_SERVICE_ACCOUNT,
            _ => return None,
        };
        Some(format!("system:serviceaccount:{BULWARK_NAMESPACE}:{sa}"))
    }
}

/// The kubeconfig file of an identity inside a cluster directory.
pub fn kubeconfig_path(dir: &Path, who: Identity) -> PathBuf {
    dir.join(format!("{}.kubeconfig", who.file_stem()))
}

/// The name kube-apiserver's webhook client certificate carries, as deploy/overlays/mtls
/// expects it (`--client-name`).
pub const WEBHOOK_CLIENT_NAME: &str = "kube-apiserver-webhook-client";

/// Generates everything into `<dir>/pki` and writes one kubeconfig per identity into `dir`.
pub fn generate(dir: &Path, apiserver_url: &str) -> anyhow::Result<Pki> {
    let pki_dir = dir.join("pki");
    std::fs::create_dir_all(&pki_dir).with_context(|| format!("creating {}", pki_dir.display()))?;
    let ca = Ca::new("bulwark-e2e cluster CA", DAYS)?;
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let apiserver = ca.server(
        &[
            "localhost".to_owned(),
            "kubernetes".to_owned(),
            "kubernetes.default".to_owned(),
            "kubernetes.default.svc".to_owned(),
            "kubernetes.default.svc.cluster.local".to_owned(),
        ],
        &[loopback, IpAddr::V4(KUBERNETES_SERVICE_IP)],
    )?;

    let pki = Pki::in_dir(dir);
    write_pem(&pki.ca_cert, ca.cert_pem(), false)?;
    write_pem(&pki.apiserver_key, &apiserver.key_pem, true)?;
    write_pem(&pki.apiserver_cert, &apiserver.cert_pem, false)?;
    let sa = bulwark_certs::signing_key()?;
    write_pem(&pki.service_account_key, &sa.private_pem, true)?;
    write_pem(&pki.service_account_pub, &sa.public_pem, false)?;

    // kube-apiserver authenticates to the webhook with its own client certificate (mTLS).
    let client_ca = Ca::new("bulwark-e2e webhook client CA", DAYS)?;
    let apiserver_client = client_ca.client(WEBHOOK_CLIENT_NAME, &[])?;
    write_pem(&pki.webhook_client_ca, client_ca.cert_pem(), false)?;
    write_pem(&pki.webhook_client_ca_key, client_ca.key_pem(), true)?;
    let b64 = |s: &str| BASE64.encode(s.as_bytes());
    let webhook_kubeconfig = pki_dir.join("webhook-client.kubeconfig");
    let users = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        // "*": every webhook this API server calls (here only bulwark's).
        "users": [{"name": "*", "user": {
            "client-certificate-data": b64(&apiserver_client.cert_pem),
            "client-key-data": b64(&apiserver_client.key_pem),
        }}],
    });
    write_pem(&webhook_kubeconfig, &format!("{users:#}\n"), true)?;
    let plugin = |name: &str| {
        serde_json::json!({"name": name, "configuration": {
            "apiVersion": "apiserver.config.k8s.io/v1",
            "kind": "WebhookAdmissionConfiguration",
            "kubeConfigFile": webhook_kubeconfig.display().to_string(),
        }})
    };
    let admission = serde_json::json!({
        "apiVersion": "apiserver.config.k8s.io/v1",
        "kind": "AdmissionConfiguration",
        "plugins": [plugin("MutatingAdmissionWebhook"), plugin("ValidatingAdmissionWebhook")],
    });
    write_pem(&pki.admission_config, &format!("{admission:#}\n"), false)?;

    for who in Identity::ALL {
        let (user, groups) = who.user();
        let pair = ca.client(user, groups)?;
        let config = kubeconfig(
            apiserver_url,
            ca.cert_pem(),
            user,
            &pair,
            who.impersonates().as_deref(),
        );
        write_pem(&kubeconfig_path(dir, who), &config, true)?;
    }
    Ok(pki)
}

/// A kubeconfig with everything embedded (JSON, which every kubeconfig reader accepts).
fn kubeconfig(
    server: &str,
    ca_pem: &str,
    user: &str,
    pair: &Pair,
    impersonate: Option<&str>,
) -> String {
    let b64 = |s: &str| BASE64.encode(s.as_bytes());
    let mut auth = serde_json::json!({
        "client-certificate-data": b64(&pair.cert_pem),
        "client-key-data": b64(&pair.key_pem),
    });
    if let Some(who) = impersonate {
        auth["as"] = serde_json::Value::from(who);
    }
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "bulwark-e2e", "cluster": {
            "server": server,
            "certificate-authority-data": b64(ca_pem),
        }}],
        "users": [{"name": user, "user": auth}],
        "contexts": [{"name": "bulwark-e2e", "context": {"cluster": "bulwark-e2e", "user": user}}],
        "current-context": "bulwark-e2e",
    });
    format!("{config:#}\n")
}
