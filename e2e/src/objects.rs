//! The API objects `up` creates: kwok nodes and bulwark's webhook registrations. bulwark's
//! namespace, ServiceAccounts and RBAC come from deploy/base, as an install has them.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        admissionregistration::v1::{
            MatchCondition, MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations,
            ValidatingWebhook, ValidatingWebhookConfiguration, WebhookClientConfig,
        },
        core::v1::{Node, NodeSpec, NodeStatus},
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta},
    },
};

/// bulwark's namespace and the ServiceAccounts its components act as (deploy/base).
pub const BULWARK_NAMESPACE: &str = "bulwark-system";
pub const WEBHOOK_SERVICE_ACCOUNT: &str = "bulwark-webhook";
pub const NODE_CONTROLLER_SERVICE_ACCOUNT: &str = "bulwark-node-controller";
pub const CABUNDLE_SERVICE_ACCOUNT: &str = "bulwark-cabundle";
/// Registered webhook names: what kubectl shows in "admission webhook ... denied the request".
pub const MUTATE_WEBHOOK: &str = "mutate.bulwark.io";
pub const VALIDATE_WEBHOOK: &str = "validate.bulwark.io";
/// Hold mode's gate, registered as deploy/components/hold does.
pub const HOLD_WEBHOOK: &str = "hold.bulwark.io";
/// The guard of bulwark's gate: only the releaser removes it.
pub const GATE_WEBHOOK: &str = "gate.bulwark.io";
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
/// reservations (allocatable below capacity), with `pods` pod slots. Nodes alternate between
/// two zones.
pub fn kwok_node(index: u32, pods: u32) -> Node {
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
            ("pods".to_owned(), Quantity(pods.to_string())),
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

fn pods_create() -> Option<Vec<RuleWithOperations>> {
    pods_rule("CREATE")
}

fn pods_rule(operation: &str) -> Option<Vec<RuleWithOperations>> {
    Some(vec![RuleWithOperations {
        api_groups: Some(strings(&[""])),
        api_versions: Some(strings(&["v1"])),
        operations: Some(strings(&[operation])),
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

/// A container lacking one of the requests or limits bulwark sets, as CEL over `c`.
const LACKS: &str = "!has(c.resources) || !has(c.resources.requests) || !has(c.resources.limits) \
    || !('cpu' in c.resources.requests) || !('memory' in c.resources.requests) \
    || !('cpu' in c.resources.limits) || !('memory' in c.resources.limits)";

/// The mutating webhook is called only for pods it may change, as deploy/base registers it.
pub fn mutate_conditions() -> Vec<MatchCondition> {
    vec![
        MatchCondition {
            name: "pod-create".to_owned(),
            expression: "request.operation == 'CREATE'".to_owned(),
        },
        MatchCondition {
            name: "lacks-requests-or-limits".to_owned(),
            expression: format!(
                "object.spec.containers.exists(c, {LACKS}) || (has(object.spec.initContainers) \
                 && object.spec.initContainers.exists(c, {LACKS}))"
            ),
        },
    ]
}

/// A pod UPDATE that removes bulwark's scheduling gate, as deploy/base matches it.
pub const GATE_REMOVED: &str = "request.operation == 'UPDATE' && has(oldObject.spec.schedulingGates) \
    && oldObject.spec.schedulingGates.exists(g, g.name == 'bulwark.io/pending-cap') \
    && !(has(object.spec.schedulingGates) && object.spec.schedulingGates.exists(g, g.name == 'bulwark.io/pending-cap'))";

fn client_config(url: String) -> WebhookClientConfig {
    WebhookClientConfig {
        url: Some(url),
        ca_bundle: None,
        service: None,
    }
}

fn mutating_webhook(
    name: &str,
    client_config: WebhookClientConfig,
    match_conditions: Option<Vec<MatchCondition>>,
) -> MutatingWebhook {
    MutatingWebhook {
        name: name.to_owned(),
        client_config,
        rules: pods_create(),
        admission_review_versions: strings(&["v1"]),
        side_effects: "NoneOnDryRun".to_owned(),
        timeout_seconds: Some(3),
        failure_policy: Some("Fail".to_owned()),
        namespace_selector: not_excluded(),
        reinvocation_policy: Some("Never".to_owned()),
        match_conditions,
        ..MutatingWebhook::default()
    }
}

fn validating_webhook(
    name: &str,
    client_config: WebhookClientConfig,
    rules: Option<Vec<RuleWithOperations>>,
    match_conditions: Option<Vec<MatchCondition>>,
) -> ValidatingWebhook {
    ValidatingWebhook {
        name: name.to_owned(),
        client_config,
        rules,
        admission_review_versions: strings(&["v1"]),
        // The gate check has no side effects at all, which NoneOnDryRun covers too.
        side_effects: "NoneOnDryRun".to_owned(),
        timeout_seconds: Some(3),
        failure_policy: Some("Fail".to_owned()),
        namespace_selector: not_excluded(),
        match_conditions,
        ..ValidatingWebhook::default()
    }
}

/// The registrations (mutate and hold, validate) for a webhook served at `base_url` (e.g. `https://127.0.0.1:8443`),
/// with the settings docs/architecture.md asks for ("Registration"): pods CREATE only,
/// `NoneOnDryRun`, a short timeout, exempt namespaces excluded. The e2e cluster fails closed so
/// a broken webhook shows. No caBundle: `bulwark cabundle` sets it from the webhook's Secret.
pub fn webhook_configurations(
    base_url: &str,
) -> (MutatingWebhookConfiguration, ValidatingWebhookConfiguration) {
    let meta = ObjectMeta {
        name: Some(WEBHOOK_CONFIGURATION.to_owned()),
        ..ObjectMeta::default()
    };
    let url = |path: &str| client_config(format!("{base_url}{path}"));
    let mutating = MutatingWebhookConfiguration {
        metadata: meta.clone(),
        webhooks: Some(vec![
            mutating_webhook(MUTATE_WEBHOOK, url("/mutate"), Some(mutate_conditions())),
            // Every pod: a fully specified one may need holding too.
            mutating_webhook(HOLD_WEBHOOK, url("/hold"), None),
        ]),
    };
    let validating = ValidatingWebhookConfiguration {
        metadata: meta,
        webhooks: Some(vec![
            validating_webhook(VALIDATE_WEBHOOK, url("/validate"), pods_create(), None),
            validating_webhook(
                GATE_WEBHOOK,
                url("/validate"),
                pods_rule("UPDATE"),
                Some(vec![MatchCondition {
                    name: "removes-bulwarks-gate".to_owned(),
                    expression: GATE_REMOVED.to_owned(),
                }]),
            ),
        ]),
    };
    (mutating, validating)
}

/// How many webhooks [`webhook_configurations`] registers, over both configurations.
pub fn registered_webhooks() -> usize {
    let (m, v) = webhook_configurations("https://127.0.0.1");
    m.webhooks.map_or(0, |w| w.len()) + v.webhooks.map_or(0, |w| w.len())
}
