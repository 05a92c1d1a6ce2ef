//! What `bulwark status` reads, with the user's own credentials, as kubectl would: the
//! namespace (or every namespace), its pods, bulwark's Throttled Events, and bulwark's
//! ConfigMap for the defaults. It never talks to the webhook itself. What the user may not
//! read is either an error that says so (the namespaces and pods asked for) or a gap the
//! table shows (Events: refusals unknown; the ConfigMap: built-in defaults assumed).

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{ConfigMap, Event, Namespace, Pod},
    jiff::Timestamp,
};
use kube::{Api, Client, api::ListParams};
use serde::de::DeserializeOwned;

use super::{
    limits::Defaults,
    usage::{PodTally, Refusals, count_event, count_pod},
};
use crate::{cluster::throttled::REASON, policy::pod::PodRules};

/// bulwark's ConfigMap and its key.
pub const CONFIG_MAP: &str = "bulwark-config";
pub const CONFIG_KEY: &str = "bulwark.yaml";

/// Objects per list request: a large cluster is read in pages, each folded into counters.
const PAGE: u32 = 500;

/// Which namespaces to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Namespace(String),
    All,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(
        "{message}\n-A reads namespaces, pods and Events in every namespace; \
         `-n NAMESPACE` shows one namespace you may read"
    )]
    AllForbidden { message: String },
    #[error(
        "{message}\nbulwark status -n {namespace} reads the namespace (its bulwark.io/* annotations), its pods and its Events"
    )]
    Forbidden { namespace: String, message: String },
    #[error("namespace {0:?} not found")]
    NotFound(String),
    #[error("reading {what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
}

/// Everything the table is made of.
#[derive(Debug)]
pub struct Snapshot {
    pub defaults: Defaults,
    pub namespaces: Vec<Namespace>,
    pub pods: BTreeMap<String, PodTally>,
    /// Refusals by namespace, or why bulwark's Events could not be read.
    pub refusals: Result<BTreeMap<String, Refusals>, String>,
}

fn status_of(e: &kube::Error) -> Option<(u16, String)> {
    match e {
        kube::Error::Api(s) => Some((s.code, s.message.clone())),
        _ => None,
    }
}

/// Every object `api` lists with `lp`, page by page, each handed to `fold`.
async fn list_all<K>(
    api: &Api<K>,
    lp: ListParams,
    mut fold: impl FnMut(K),
) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let mut lp = lp.limit(PAGE);
    loop {
        let page = api.list(&lp).await?;
        let next = page.metadata.continue_.filter(|c| !c.is_empty());
        page.items.into_iter().for_each(&mut fold);
        match next {
            Some(token) => lp = lp.continue_token(&token),
            None => return Ok(()),
        }
    }
}

/// The defaults: bulwark's ConfigMap if this user may read it, else the built-in ones.
pub async fn defaults(client: &Client, bulwark_namespace: &str) -> Defaults {
    let origin = format!("{bulwark_namespace}/{CONFIG_MAP}");
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), bulwark_namespace);
    match api.get_opt(CONFIG_MAP).await {
        Ok(Some(cm)) => {
            let text = cm
                .data
                .as_ref()
                .and_then(|d| d.get(CONFIG_KEY))
                .cloned()
                .unwrap_or_default();
            Defaults::from_config(&text, &origin)
                .unwrap_or_else(|e| Defaults::built_in(e.to_string()))
        }
        Ok(None) => Defaults::built_in(format!("ConfigMap {origin} not found")),
        Err(e) => Defaults::built_in(match status_of(&e) {
            Some((403, _)) => format!("not allowed to read ConfigMap {origin}"),
            _ => format!("reading ConfigMap {origin}: {e}"),
        }),
    }
}

/// Reads what the table of `scope` needs; `now` dates the windows.
pub async fn read(
    client: &Client,
    scope: &Scope,
    bulwark_namespace: &str,
    now: Timestamp,
) -> Result<Snapshot, ReadError> {
    let forbidden = |e: kube::Error, what: &str| -> ReadError {
        match (status_of(&e), scope) {
            (Some((403, message)), Scope::All) => ReadError::AllForbidden { message },
            (Some((403, message)), Scope::Namespace(ns)) => ReadError::Forbidden {
                namespace: ns.clone(),
                message,
            },
            _ => ReadError::Api {
                what: what.to_owned(),
                source: e,
            },
        }
    };
    let namespaces_api: Api<Namespace> = Api::all(client.clone());
    let (namespaces, pods_api, events_api): (Vec<Namespace>, Api<Pod>, Api<Event>) = match scope {
        Scope::All => {
            let mut all = Vec::new();
            list_all(&namespaces_api, ListParams::default(), |ns| all.push(ns))
                .await
                .map_err(|e| forbidden(e, "namespaces"))?;
            (all, Api::all(client.clone()), Api::all(client.clone()))
        }
        Scope::Namespace(ns) => {
            let one = match namespaces_api.get_opt(ns).await {
                Ok(Some(one)) => one,
                Ok(None) => return Err(ReadError::NotFound(ns.clone())),
                Err(e) => return Err(forbidden(e, &format!("namespace {ns}"))),
            };
            (
                vec![one],
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            )
        }
    };
    // Which pods are held to which cap, by the built-in system namespaces (kube-system and
    // bulwark's own): a config's systemNamespaces is not read for this.
    let mut pods = BTreeMap::new();
    list_all(&pods_api, ListParams::default(), |p| {
        count_pod(&mut pods, &p, &PodRules::default(), now)
    })
    .await
    .map_err(|e| forbidden(e, "pods"))?;
    let mut refusals = BTreeMap::new();
    let events = list_all(
        &events_api,
        ListParams::default().fields(&format!("reason={REASON}")),
        |e| count_event(&mut refusals, &e, now),
    )
    .await;
    let refusals = match events {
        Ok(()) => Ok(refusals),
        Err(e) => Err(match status_of(&e) {
            Some((403, message)) => message,
            _ => e.to_string(),
        }),
    };
    Ok(Snapshot {
        defaults: defaults(client, bulwark_namespace).await,
        namespaces,
        pods,
        refusals,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        status::limits::Origin,
        testing::{ApiServer, Reply},
    };
    use serde_json::json;

    fn list(items: serde_json::Value) -> Reply {
        Reply::Json(json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items}))
    }

    const FORBIDDEN: Reply = Reply::Failure {
        code: 403,
        reason: "Forbidden",
    };

    #[tokio::test]
    async fn one_namespace_with_what_a_namespace_reader_may_read() {
        let now: Timestamp = "2026-03-01T10:00:00Z".parse().unwrap();
        let snapshot = ApiServer::new()
            .get(
                "/api/v1/namespaces/ci",
                Reply::Json(json!({"metadata": {"name": "ci", "annotations": {"bulwark.io/max-pods": "1"}}})),
            )
            .get(
                "/api/v1/namespaces/ci/pods?&limit=500",
                list(json!([{"metadata": {"name": "a", "namespace": "ci", "creationTimestamp": "2026-03-01T09:59:30Z"}, "status": {"phase": "Running"}}])),
            )
            .get(
                "/api/v1/namespaces/ci/events?&fieldSelector=reason%3DThrottled&limit=500",
                list(json!([{
                    "metadata": {"name": "e", "namespace": "ci", "annotations": {"bulwark.io/refusals": "max_pods=4"}},
                    "involvedObject": {"kind": "Namespace", "name": "ci", "namespace": "ci"},
                    "reason": "Throttled", "reportingComponent": "bulwark-webhook",
                    "eventTime": "2026-03-01T09:59:40.000000Z",
                }])),
            )
            .get("/api/v1/namespaces/bulwark-system/configmaps/bulwark-config", FORBIDDEN)
            .run(|client| async move { read(&client, &Scope::Namespace("ci".into()), "bulwark-system", now).await })
            .await
            .expect("read");
        assert_eq!(snapshot.namespaces.len(), 1);
        assert_eq!(
            snapshot.pods["ci"],
            PodTally {
                live: 1,
                pending: 0,
                held: 0,
                created_last_minute: 1
            }
        );
        let refusals = snapshot.refusals.expect("events read");
        assert_eq!(refusals["ci"], [("max_pods".to_owned(), 4)].into());
        assert_eq!(
            snapshot.defaults.origin,
            Origin::Assumed("not allowed to read ConfigMap bulwark-system/bulwark-config".into())
        );
    }

    #[tokio::test]
    async fn all_namespaces_forbidden_says_what_to_do() {
        let err = ApiServer::new()
            .get("/api/v1/namespaces?&limit=500", FORBIDDEN)
            .run(|client| async move {
                read(&client, &Scope::All, "bulwark-system", Timestamp::now()).await
            })
            .await
            .expect_err("forbidden");
        assert!(matches!(err, ReadError::AllForbidden { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("`-n NAMESPACE` shows one namespace you may read"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn pages_are_followed_and_events_may_be_unreadable() {
        let now: Timestamp = "2026-03-01T10:00:00Z".parse().unwrap();
        let pod = |name: &str| json!({"metadata": {"name": name, "namespace": "ci"}, "status": {"phase": "Pending"}});
        let snapshot = ApiServer::new()
            .get("/api/v1/namespaces/ci", Reply::Json(json!({"metadata": {"name": "ci"}})))
            .get(
                "/api/v1/namespaces/ci/pods?&limit=500",
                Reply::Json(json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"continue": "next"}, "items": [pod("a")]})),
            )
            .get("/api/v1/namespaces/ci/pods?&limit=500&continue=next", list(json!([pod("b")])))
            .get(
                "/api/v1/namespaces/ci/events?&fieldSelector=reason%3DThrottled&limit=500",
                FORBIDDEN,
            )
            .get(
                "/api/v1/namespaces/bulwark-system/configmaps/bulwark-config",
                Reply::Json(json!({"metadata": {"name": "bulwark-config"}, "data": {"bulwark.yaml": "defaults:\n  maxPods: 7\n"}})),
            )
            .run(|client| async move { read(&client, &Scope::Namespace("ci".into()), "bulwark-system", now).await })
            .await
            .expect("read");
        assert_eq!(snapshot.pods["ci"].pending, 2);
        assert_eq!(snapshot.refusals, Err("scripted Forbidden".into()));
        assert_eq!(snapshot.defaults.policy.max_pods, Some(7));
        assert_eq!(
            snapshot.defaults.origin,
            Origin::ConfigMap("bulwark-system/bulwark-config".into())
        );
    }

    #[tokio::test]
    async fn a_missing_namespace_is_not_found() {
        let err = ApiServer::new()
            .get("/api/v1/namespaces/nope", Reply::not_found())
            .run(|client| async move {
                read(
                    &client,
                    &Scope::Namespace("nope".into()),
                    "bulwark-system",
                    Timestamp::now(),
                )
                .await
            })
            .await
            .expect_err("not found");
        assert_eq!(err.to_string(), "namespace \"nope\" not found");
    }
}
