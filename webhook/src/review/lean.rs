//! The borrowed view of a pod that the hot path decodes: only the fields bulwark reads.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Container, Pod, PodSchedulingGate, PodSpec, ResourceRequirements},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use serde::Deserialize;

/// A pod as bulwark reads it: metadata names, labels, annotations and owners, each
/// container's name and resources, its priority class, node name and scheduling gates. The rest of the object (env, volumes, tolerations,
/// managedFields, status...) is skipped by the parser without being built: building it made
/// decoding 43-57% of a review's instructions (bench/throughput.md), and nothing reads it.
/// apiVersion and kind are checked as k8s-openapi's Pod does, so other kinds fall through to
/// the generic decoding.
pub struct LeanPod(pub Pod);

impl k8s_openapi::Resource for LeanPod {
    const API_VERSION: &'static str = <Pod as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <Pod as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <Pod as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <Pod as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <Pod as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = <Pod as k8s_openapi::Resource>::Scope;
}

impl k8s_openapi::Metadata for LeanPod {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.0.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.0.metadata
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodView {
    api_version: String,
    kind: String,
    #[serde(default)]
    metadata: MetaView,
    spec: Option<SpecView>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct MetaView {
    name: Option<String>,
    namespace: Option<String>,
    annotations: Option<BTreeMap<String, String>>,
    labels: Option<BTreeMap<String, String>>,
    owner_references: Option<Vec<OwnerReference>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecView {
    containers: Vec<ContainerView>,
    init_containers: Option<Vec<ContainerView>>,
    priority_class_name: Option<String>,
    node_name: Option<String>,
    scheduling_gates: Option<Vec<PodSchedulingGate>>,
}

#[derive(Deserialize)]
struct ContainerView {
    name: String,
    resources: Option<ResourceRequirements>,
}

impl From<ContainerView> for Container {
    fn from(c: ContainerView) -> Container {
        Container {
            name: c.name,
            resources: c.resources,
            ..Container::default()
        }
    }
}

impl<'de> Deserialize<'de> for LeanPod {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<LeanPod, D::Error> {
        let v = PodView::deserialize(d)?;
        if v.api_version != "v1" || v.kind != "Pod" {
            return Err(serde::de::Error::custom(format!(
                "expected apiVersion \"v1\" and kind \"Pod\", got {:?} and {:?}",
                v.api_version, v.kind
            )));
        }
        let containers = |list: Vec<ContainerView>| list.into_iter().map(Container::from).collect();
        Ok(LeanPod(Pod {
            metadata: ObjectMeta {
                name: v.metadata.name,
                namespace: v.metadata.namespace,
                annotations: v.metadata.annotations,
                labels: v.metadata.labels,
                owner_references: v.metadata.owner_references,
                ..ObjectMeta::default()
            },
            spec: v.spec.map(|s| PodSpec {
                containers: containers(s.containers),
                init_containers: s.init_containers.map(containers),
                priority_class_name: s.priority_class_name,
                node_name: s.node_name,
                scheduling_gates: s.scheduling_gates,
                ..PodSpec::default()
            }),
            status: None,
        }))
    }
}
