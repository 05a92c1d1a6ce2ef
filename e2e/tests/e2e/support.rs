//! What the end-to-end tests share: the cluster, namespaces with annotations, pods and their
//! resources, kubectl, polling, metrics, and a steady load of pod creations.

use std::{
    collections::BTreeMap,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bulwark_e2e::{Cluster, State};
use k8s_openapi::{
    api::core::v1::{Namespace, Pod, ServiceAccount},
    apimachinery::pkg::api::resource::Quantity,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
    core::Status,
};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

pub struct Ctx {
    pub cluster: Cluster,
    pub client: Client,
    namespaces: Vec<String>,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The webhook's answer to a pod creation, as the API server relays it.
#[derive(Debug)]
pub enum Created {
    Pod(Box<Pod>),
    Refused(Box<Status>),
}

impl Created {
    pub fn refused(self) -> anyhow::Result<Status> {
        match self {
            Created::Refused(s) => Ok(*s),
            Created::Pod(p) => bail!(
                "pod {} was admitted, expected a refusal",
                p.metadata.name.unwrap_or_default()
            ),
        }
    }

    pub fn admitted(self) -> anyhow::Result<Pod> {
        match self {
            Created::Pod(p) => Ok(*p),
            Created::Refused(s) => bail!("refused ({} {}): {}", s.code, s.reason, s.message),
        }
    }

    pub fn is_admitted(&self) -> bool {
        matches!(self, Created::Pod(_))
    }
}

/// A pod with one pause container and no resources; `extra` is merged into it as JSON
/// (e.g. `{"spec": {"nodeSelector": ...}}`).
pub fn pod(name: &str, extra: Value) -> Pod {
    let mut base = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "containers": [{"name": "work", "image": "registry.k8s.io/pause:3.10"}],
            "terminationGracePeriodSeconds": 0,
        }
    });
    merge(&mut base, extra);
    serde_json::from_value(base).unwrap_or_default()
}

/// A pod no node can take: stays Pending for as long as it exists.
/// The CA of the client certificate kube-apiserver presents to the webhook (its key kept by
/// the e2e PKI), so tests can issue one of their own: kube-apiserver's name, or another.
pub fn webhook_client_ca(state: &State) -> anyhow::Result<bulwark_certs::Ca> {
    let pki = bulwark_e2e::pki::Pki::in_dir(&state.dir);
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    Ok(bulwark_certs::Ca::from_pem(
        &read(&pki.webhook_client_ca)?,
        &read(&pki.webhook_client_ca_key)?,
        1,
        bulwark_certs::KeyAlgorithm::default(),
    )?)
}

/// An AdmissionReview for the CREATE of [`pod`] `name` in `namespace` by `username`, as
/// kube-apiserver sends it, for tests that call the webhook themselves.
pub fn pod_create_review(namespace: &str, name: &str, username: &str) -> String {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": format!("{username}-{namespace}-{name}"),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": name,
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": username},
            "object": serde_json::to_value(pod(name, json!({}))).unwrap_or(Value::Null),
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    })
    .to_string()
}

pub fn unschedulable(name: &str) -> Pod {
    pod(
        name,
        json!({"spec": {"nodeSelector": {"bulwark-e2e/no-such-node": "true"}}}),
    )
}

fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, e) => *b = e,
    }
}

/// Resource names and quantities as written, e.g. `[("cpu", "100m")]`.
pub type Amounts = Vec<(String, String)>;

/// Requests and limits of a container.
pub fn resources(pod: &Pod, container: &str) -> (Amounts, Amounts) {
    let spec = pod.spec.clone().unwrap_or_default();
    let all = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    let Some(c) = all.into_iter().find(|c| c.name == container) else {
        return (Vec::new(), Vec::new());
    };
    let flat = |m: Option<std::collections::BTreeMap<String, Quantity>>| -> Amounts {
        m.unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect()
    };
    let r = c.resources.clone().unwrap_or_default();
    (flat(r.requests), flat(r.limits))
}

/// [`Amounts`] from literals, to compare with [`resources`].
pub fn pairs(items: &[(&str, &str)]) -> Amounts {
    items
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

impl Ctx {
    pub fn new(cluster: Cluster, client: Client) -> Self {
        Ctx {
            cluster,
            client,
            namespaces: Vec::new(),
        }
    }

    pub fn state(&self) -> &State {
        &self.cluster.state
    }

    pub fn pods(&self, ns: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), ns)
    }

    /// A fresh namespace with bulwark annotations, ready for pods (its default
    /// ServiceAccount exists), deleted after the test.
    pub async fn namespace(
        &mut self,
        prefix: &str,
        annotations: &[(&str, &str)],
    ) -> anyhow::Result<String> {
        let name = format!("{prefix}-{}", SEQ.fetch_add(1, Ordering::Relaxed));
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        self.namespaces.push(name.clone());
        let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &name);
        eventually(
            Duration::from_secs(20),
            "the default ServiceAccount",
            || {
                let sas = sas.clone();
                async move { Ok(sas.get_opt("default").await?.map(|_| ())) }
            },
        )
        .await?;
        Ok(name)
    }

    pub async fn annotate(&self, ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
        let patch = json!({"metadata": {"annotations": {key: value}}});
        Api::<Namespace>::all(self.client.clone())
            .patch(ns, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("annotating namespace {ns}"))?;
        Ok(())
    }

    /// Creates a pod; bulwark's refusals come back as `Refused`, other errors as errors.
    pub async fn create(&self, ns: &str, pod: &Pod) -> anyhow::Result<Created> {
        self.create_with(ns, pod, &PostParams::default()).await
    }

    pub async fn dry_run(&self, ns: &str, pod: &Pod) -> anyhow::Result<Created> {
        let pp = PostParams {
            dry_run: true,
            ..PostParams::default()
        };
        self.create_with(ns, pod, &pp).await
    }

    async fn create_with(&self, ns: &str, pod: &Pod, pp: &PostParams) -> anyhow::Result<Created> {
        match self.pods(ns).create(pp, pod).await {
            Ok(p) => Ok(Created::Pod(Box::new(p))),
            Err(kube::Error::Api(s)) if s.code == 429 => Ok(Created::Refused(s)),
            Err(e) => Err(e).context("creating a pod"),
        }
    }

    /// Creates the pod as soon as bulwark lets it in, trying again while it is refused.
    pub async fn create_when_room(
        &self,
        ns: &str,
        pod: &Pod,
        limit: Duration,
        what: &str,
    ) -> anyhow::Result<Pod> {
        eventually(limit, what, || async {
            Ok(match self.create(ns, pod).await? {
                Created::Pod(p) => Some(*p),
                Created::Refused(_) => None,
            })
        })
        .await
    }

    pub async fn delete_pod(&self, ns: &str, name: &str) -> anyhow::Result<()> {
        self.pods(ns)
            .delete(name, &DeleteParams::default().grace_period(0))
            .await
            .with_context(|| format!("deleting pod {ns}/{name}"))?;
        Ok(())
    }

    /// Pods of a namespace in phase Pending.
    pub async fn pending(&self, ns: Option<&str>) -> anyhow::Result<usize> {
        let api = match ns {
            Some(ns) => self.pods(ns),
            None => Api::all(self.client.clone()),
        };
        let lp = ListParams::default().fields("status.phase=Pending");
        Ok(api.list(&lp).await?.items.len())
    }

    /// Runs kubectl against the cluster; `stdin` is written to it when given.
    pub async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<Kubectl> {
        let mut cmd = tokio::process::Command::new(self.state().kubectl());
        cmd.env("KUBECONFIG", self.state().kubeconfig())
            // Plugins (`kubectl bulwark`) and kubectl itself, as `cluster env` sets them.
            .env("PATH", self.state().path())
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let start = Instant::now();
        let mut child = cmd.spawn().context("starting kubectl")?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes()).await?;
        }
        let out = child.wait_with_output().await.context("running kubectl")?;
        Ok(Kubectl {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            took: start.elapsed(),
        })
    }

    /// One sample of a metric from the webhook's /metrics (sum over matching label sets).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        metric_at(self.state().ports.webhook_metrics, name, labels)
    }

    /// One sample of a metric from kube-apiserver's /metrics, read as the test's admin.
    pub async fn apiserver_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<f64> {
        let request = http::Request::get("/metrics").body(Vec::new())?;
        let text = self.client.request_text(request).await?;
        Ok(metric_in(&text, name, labels))
    }

    /// A metric of the cluster's own node controller.
    pub fn node_controller_metric(&self, name: &str) -> anyhow::Result<f64> {
        metric_at(self.state().ports.node_controller_metrics, name, &[])
    }

    /// Deletes the namespaces the test created and waits until no pod of theirs is left,
    /// so the next test starts from an empty cluster.
    pub async fn cleanup(&mut self) -> anyhow::Result<()> {
        let api = Api::<Namespace>::all(self.client.clone());
        for ns in std::mem::take(&mut self.namespaces) {
            let _ = api.delete(&ns, &DeleteParams::background()).await;
            let pods = self.pods(&ns);
            pods.delete_collection(
                &DeleteParams::default().grace_period(0),
                &ListParams::default(),
            )
            .await
            .ok();
            eventually(
                Duration::from_secs(60),
                "pods of deleted namespaces gone",
                || {
                    let pods = pods.clone();
                    async move {
                        Ok(pods
                            .list(&ListParams::default())
                            .await?
                            .items
                            .is_empty()
                            .then_some(()))
                    }
                },
            )
            .await?;
        }
        Ok(())
    }
}

/// What kubectl did.
pub struct Kubectl {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

/// Polls `probe` every 100 ms until it yields a value; errors count as "not yet".
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    bulwark_e2e::poll::until(limit, Duration::from_millis(100), what, || Ok(()), probe).await
}

/// Polls dry-run creations until bulwark answers `admit`; returns how long that took.
pub async fn until_decision(
    ctx: &Ctx,
    ns: &str,
    admit: bool,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let probe = pod("probe", json!({}));
    eventually(limit, "bulwark's decision to change", || async {
        let created = ctx.dry_run(ns, &probe).await?;
        Ok((created.is_admitted() == admit).then_some(()))
    })
    .await?;
    Ok(start.elapsed())
}

/// The sum of a metric's samples whose labels match, from a plain-HTTP /metrics.
pub fn metric_at(port: u16, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    let text = bulwark_e2e::cluster::plain_get(port, "/metrics")?;
    Ok(metric_in(&text, name, labels))
}

/// The sum of a metric's samples whose labels match, in Prometheus text.
pub fn metric_in(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, label_text) = series.split_once('{').unwrap_or((series, ""));
        if metric != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")))
        {
            sum += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

/// Pod creations one after another at a steady pace, counting those that fail for any
/// reason (a refusal included), until [`SteadyLoad::finish`].
pub struct SteadyLoad {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU32>,
    failed: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl SteadyLoad {
    /// Creates pods `prefix-1`, `prefix-2`, ... through `pods`, one every `pause`.
    pub fn start(pods: Api<Pod>, prefix: &str, pause: Duration) -> SteadyLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let task = {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            let prefix = prefix.to_owned();
            tokio::spawn(async move {
                let mut errors = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let p = pod(&format!("{prefix}-{i}"), json!({}));
                    match pods.create(&PostParams::default(), &p).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.push(e.to_string());
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(pause).await;
                }
                errors
            })
        };
        SteadyLoad {
            stop,
            ok,
            failed,
            task,
        }
    }

    /// (created, failed) so far.
    pub fn counts(&self) -> (u32, u32) {
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    /// Stops the load: (created, failed, the errors).
    pub async fn finish(self) -> anyhow::Result<(u32, u32, Vec<String>)> {
        self.stop.store(true, Ordering::Relaxed);
        let (ok, failed) = (self.ok.clone(), self.failed.clone());
        let errors = self.task.await?;
        Ok((
            ok.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
            errors,
        ))
    }
}

/// A [`SteadyLoad`] of a pod every 50 ms in a fresh namespace (`prefix`) whose rate never
/// holds it back, already 2 s under way: what a fault test keeps running while it breaks
/// something.
pub async fn steady_load(ctx: &mut Ctx, prefix: &str) -> anyhow::Result<SteadyLoad> {
    let ns = ctx
        .namespace(
            prefix,
            &[
                ("bulwark.io/pod-rate", "1000/s"),
                ("bulwark.io/pod-burst", "1000"),
            ],
        )
        .await?;
    let load = SteadyLoad::start(ctx.pods(&ns), "steady", Duration::from_millis(50));
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(load)
}

/// How many of the Job's pods have succeeded; an error once any has failed, since every test
/// Job's pods succeed.
pub async fn job_succeeded(
    jobs: &kube::Api<k8s_openapi::api::batch::v1::Job>,
    name: &str,
) -> anyhow::Result<i32> {
    let status = jobs.get(name).await?.status.unwrap_or_default();
    anyhow::ensure!(
        status.failed.unwrap_or(0) == 0,
        "Job {name} has failed pods"
    );
    Ok(status.succeeded.unwrap_or(0))
}

/// A Job of `pods` pods run all at once (parallelism = completions), of pause containers,
/// never retried; `pod_spec` is merged into its pod template's spec.
pub fn job(
    name: &str,
    pods: i32,
    pod_spec: Value,
) -> anyhow::Result<k8s_openapi::api::batch::v1::Job> {
    let mut spec = json!({
        "restartPolicy": "Never",
        "containers": [{"name": "work", "image": "registry.k8s.io/pause:3.10"}],
    });
    merge(&mut spec, pod_spec);
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "completions": pods,
            "parallelism": pods,
            "backoffLimit": 0,
            "template": {"spec": spec},
        }
    }))?)
}

/// `kubectl run later` in namespace `ns`, whose one pending slot a blocker holds until 3 s in:
/// kubectl is refused, waits out the Retry-After it hears, and creates the pod once the
/// blocker is gone. Returns kubectl's output (`-v=4`, so its retries are logged).
pub async fn kubectl_run_while_blocked(ctx: &Ctx, ns: &str) -> anyhow::Result<Kubectl> {
    ctx.create(ns, &unschedulable("blocker"))
        .await?
        .admitted()?;
    let args = [
        "-n",
        ns,
        "-v=4",
        "run",
        "later",
        "--image",
        "registry.k8s.io/pause:3.10",
    ];
    let (out, deleted) = tokio::join!(ctx.kubectl(&args, None), async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        ctx.delete_pod(ns, "blocker").await
    });
    deleted?;
    out
}
