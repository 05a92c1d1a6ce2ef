//! The API objects `up` creates: kwok nodes, bulwark's RBAC and its webhook registrations.

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::{
            MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ValidatingWebhook,
            ValidatingWebhookConfiguration, WebhookClientConfig,
        },
        core::v1::{Node, NodeSpec, NodeStatus},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject},
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta},
    },
};

/// The identity (client certificate common name) bulwark's webhook runs as.
pub const WEBHOOK_USER: &str = "bulwark-webhook";
/// The identity bulwark's node controller runs as.
pub const NODE_CONTROLLER_USER: &str = "bulwark-node-controller";
/// Registered webhook names: what kubectl shows in "admission webhook ... denied the request".
pub const MUTATE_WEBHOOK: &str = "mutate.bulwark.io";
pub const VALIDATE_WEBHOOK: &str = "validate.bulwark.io";
pub const WEBHOOK_CONFIGURATION: &str = "bulwark";
/// Namespaces the webhooks are never called for.
pub const EXCLUDED_NAMESPACES: [&str; 2] = ["kube-system", "bulwark-system"];

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn map(items: &[(&str, &str)]) -> BTreeMap<String, String> {
    items
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A fake node managed by kwok, shaped like a 32-core cloud machine with kube and system
/// reservations (allocatable below capacity). Nodes alternate between two zones.
pub fn kwok_node(index: u32) -> Node {
    let name = format!("kwok-node-{index}");
    let zone = if index.is_multiple_of(2) {
        "zone-a"
    } else {
        "zone-b"
    };
    let quantities = |cpu: &str, memory: &str| {
        Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpu.to_owned())),
            ("memory".to_owned(), Quantity(memory.to_owned())),
            ("pods".to_owned(), Quantity("110".to_owned())),
            ("ephemeral-storage".to_owned(), Quantity("200Gi".to_owned())),
        ]))
    };
    Node {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            annotations: Some(map(&[
                ("kwok.x-k8s.io/node", "fake"),
                ("node.alpha.kubernetes.io/ttl", "0"),
            ])),
            labels: Some(map(&[
                ("kubernetes.io/hostname", &name),
                ("kubernetes.io/os", "linux"),
                ("kubernetes.io/arch", "amd64"),
                ("node.kubernetes.io/instance-type", "fake-32x128"),
                ("topology.kubernetes.io/zone", zone),
                ("type", "kwok"),
            ])),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec::default()),
        status: Some(NodeStatus {
            capacity: quantities("32", "128Gi"),
            allocatable: quantities("31500m", "124Gi"),
            ..NodeStatus::default()
        }),
    }
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(strings(groups)),
        resources: Some(strings(resources)),
        verbs: strings(verbs),
        ..PolicyRule::default()
    }
}

/// A ClusterRole with `rules`, bound to the user of the same name.
fn role_for_user(user: &str, rules: Vec<PolicyRule>) -> (ClusterRole, ClusterRoleBinding) {
    let meta = ObjectMeta {
        name: Some(user.to_owned()),
        ..ObjectMeta::default()
    };
    let role = ClusterRole {
        metadata: meta.clone(),
        rules: Some(rules),
        ..ClusterRole::default()
    };
    let binding = ClusterRoleBinding {
        metadata: meta,
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "ClusterRole".to_owned(),
            name: user.to_owned(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".to_owned()),
            kind: "User".to_owned(),
            name: user.to_owned(),
            ..Subject::default()
        }]),
    };
    (role, binding)
}

/// Read access to what the webhook caches, and Events for invalid annotations.
pub fn webhook_rbac() -> (ClusterRole, ClusterRoleBinding) {
    role_for_user(
        WEBHOOK_USER,
        vec![
            rule(
                &[""],
                &["pods", "namespaces", "nodes"],
                &["get", "list", "watch"],
            ),
            rule(&["", "events.k8s.io"], &["events"], &["create", "patch"]),
        ],
    )
}

/// Nodes to watch, taint, mark and (action delete-node) delete; node Leases to read; its own
/// leader Lease; Events; Cluster API Machines to annotate (action cluster-api).
pub fn node_controller_rbac() -> (ClusterRole, ClusterRoleBinding) {
    role_for_user(
        NODE_CONTROLLER_USER,
        vec![
            rule(
                &[""],
                &["nodes"],
                &["get", "list", "watch", "update", "patch", "delete"],
            ),
            rule(
                &["coordination.k8s.io"],
                &["leases"],
                &["get", "list", "watch", "create", "update"],
            ),
            rule(&["", "events.k8s.io"], &["events"], &["create", "patch"]),
            rule(&["cluster.x-k8s.io"], &["machines"], &["get", "patch"]),
        ],
    )
}

fn pods_create() -> Option<Vec<RuleWithOperations>> {
    Some(vec![RuleWithOperations {
        api_groups: Some(strings(&[""])),
        api_versions: Some(strings(&["v1"])),
        operations: Some(strings(&["CREATE"])),
        resources: Some(strings(&["pods"])),
        scope: Some("Namespaced".to_owned()),
    }])
}

fn not_excluded() -> Option<LabelSelector> {
    Some(LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "kubernetes.io/metadata.name".to_owned(),
            operator: "NotIn".to_owned(),
            values: Some(strings(&EXCLUDED_NAMESPACES)),
        }]),
        ..LabelSelector::default()
    })
}

fn client_config(url: String, ca_pem: &str) -> WebhookClientConfig {
    WebhookClientConfig {
        url: Some(url),
        ca_bundle: Some(ByteString(ca_pem.as_bytes().to_vec())),
        service: None,
    }
}

/// The two registrations for a webhook served at `base_url` (e.g. `https://127.0.0.1:8443`),
/// with the settings DESIGN.md asks for: pods CREATE only, `NoneOnDryRun`, a short timeout,
/// exempt namespaces excluded. The e2e cluster fails closed so a broken webhook shows.
pub fn webhook_configurations(
    base_url: &str,
    ca_pem: &str,
) -> (MutatingWebhookConfiguration, ValidatingWebhookConfiguration) {
    let meta = ObjectMeta {
        name: Some(WEBHOOK_CONFIGURATION.to_owned()),
        ..ObjectMeta::default()
    };
    let mutating = MutatingWebhookConfiguration {
        metadata: meta.clone(),
        webhooks: Some(vec![MutatingWebhook {
            name: MUTATE_WEBHOOK.to_owned(),
            client_config: client_config(format!("{base_url}/mutate"), ca_pem),
            rules: pods_create(),
            admission_review_versions: strings(&["v1"]),
            side_effects: "NoneOnDryRun".to_owned(),
            timeout_seconds: Some(3),
            failure_policy: Some("Fail".to_owned()),
            namespace_selector: not_excluded(),
            reinvocation_policy: Some("Never".to_owned()),
            ..MutatingWebhook::default()
        }]),
    };
    let validating = ValidatingWebhookConfiguration {
        metadata: meta,
        webhooks: Some(vec![ValidatingWebhook {
            name: VALIDATE_WEBHOOK.to_owned(),
            client_config: client_config(format!("{base_url}/validate"), ca_pem),
            rules: pods_create(),
            admission_review_versions: strings(&["v1"]),
            side_effects: "NoneOnDryRun".to_owned(),
            timeout_seconds: Some(3),
            failure_policy: Some("Fail".to_owned()),
            namespace_selector: not_excluded(),
            ..ValidatingWebhook::default()
        }]),
    };
    (mutating, validating)
}
