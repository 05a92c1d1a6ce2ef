"""A small Kubernetes API client for the benchmarks: one persistent HTTPS connection per
instance (keep-alive), the admin client certificate of an e2e cluster directory, and the
latency of every request. Standard library only."""

import base64
import http.client
import json
import os
import ssl
import tempfile
import time


class Cluster:
    """What the benchmarks need from an e2e cluster directory (`e2e/cluster --dir D up`)."""

    def __init__(self, directory):
        self.dir = os.path.abspath(directory)
        with open(os.path.join(self.dir, "cluster.json")) as f:
            self.state = json.load(f)
        with open(os.path.join(self.dir, "admin.kubeconfig")) as f:
            text = f.read()
        try:
            kc = json.loads(text)
        except ValueError:
            import yaml  # only if the kubeconfig is YAML

            kc = yaml.safe_load(text)
        cluster = kc["clusters"][0]["cluster"]
        user = kc["users"][0]["user"]
        self.server = cluster["server"]
        self._tmp = tempfile.mkdtemp(prefix="bench-kube-")
        self.ca = self._file("ca.crt", cluster["certificate-authority-data"])
        self.cert = self._file("client.crt", user["client-certificate-data"])
        self.key = self._file("client.key", user["client-key-data"])
        self.ports = self.state["ports"]

    def _file(self, name, b64):
        path = os.path.join(self._tmp, name)
        with open(path, "wb") as f:
            f.write(base64.b64decode(b64))
        os.chmod(path, 0o600)
        return path

    def pid(self, name):
        """The pid of a component (kube-apiserver, etcd, kube-scheduler, bulwark-webhook...)."""
        with open(os.path.join(self.dir, "run", f"{name}.pid")) as f:
            return int(f.read().strip())

    def client(self, timeout=30.0):
        return Client(self, timeout)


class ApiError(Exception):
    def __init__(self, status, body):
        super().__init__(f"HTTP {status}: {body[:300]!r}")
        self.status = status
        self.body = body


class Client:
    def __init__(self, cluster, timeout=30.0):
        host_port = cluster.server.split("://", 1)[1]
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.timeout = timeout
        ctx = ssl.create_default_context(cafile=cluster.ca)
        ctx.load_cert_chain(cluster.cert, cluster.key)
        self.ctx = ctx
        self.conn = None

    def _connect(self):
        self.conn = http.client.HTTPSConnection(
            self.host, self.port, context=self.ctx, timeout=self.timeout
        )
        self.conn.connect()

    def request(self, method, path, body=None, content_type="application/json"):
        """(status, headers, body bytes, seconds). Reconnects once if the connection broke."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        for attempt in (0, 1):
            if self.conn is None:
                self._connect()
            t0 = time.perf_counter()
            try:
                self.conn.request(method, path, body=data, headers=headers)
                resp = self.conn.getresponse()
                payload = resp.read()
                elapsed = time.perf_counter() - t0
                return resp.status, dict(resp.getheaders()), payload, elapsed
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt == 1:
                    raise
        raise RuntimeError("unreachable")

    def json(self, method, path, body=None, ok=(200, 201), content_type="application/json"):
        status, _, payload, _ = self.request(method, path, body, content_type)
        if status not in ok:
            raise ApiError(status, payload.decode(errors="replace"))
        return json.loads(payload) if payload else None

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


WEBHOOK_KINDS = {
    "mutatingwebhookconfigurations": "MutatingWebhookConfiguration",
    "validatingwebhookconfigurations": "ValidatingWebhookConfiguration",
}
WEBHOOK_BASE = "/apis/admissionregistration.k8s.io/v1/"


def save_webhooks(client, name="bulwark"):
    """bulwark's two registrations as they are, ready to be created again."""
    saved = {}
    for plural in WEBHOOK_KINDS:
        obj = client.json("GET", f"{WEBHOOK_BASE}{plural}/{name}")
        meta = obj["metadata"]
        obj["metadata"] = {"name": meta["name"], "labels": meta.get("labels", {})}
        saved[plural] = obj
    return saved


def delete_webhooks(client, name="bulwark"):
    for plural in WEBHOOK_KINDS:
        client.json("DELETE", f"{WEBHOOK_BASE}{plural}/{name}", ok=(200, 202, 404))


def create_webhooks(client, saved):
    for plural, obj in saved.items():
        client.json("POST", f"{WEBHOOK_BASE}{plural}", obj, ok=(201, 409))


def bulwark_active(client, namespace):
    """True when a dry-run pod create in `namespace` comes back defaulted by bulwark."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "bench-dry-"},
        "spec": {"containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]},
    }
    status, _, payload, _ = client.request(
        "POST", f"/api/v1/namespaces/{namespace}/pods?dryRun=All", pod
    )
    if status != 201:
        # A refusal from bulwark (e.g. its cluster pending cap) also shows it is called.
        return b"bulwark" in payload and b"admission webhook" in payload
    annotations = json.loads(payload)["metadata"].get("annotations") or {}
    return "bulwark.io/defaulted" in annotations


def wait_bulwark(client, namespace, want, limit=60.0):
    """Waits until the API server calls bulwark (want=True) or no longer does (want=False)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if bulwark_active(client, namespace) == want:
            return
        time.sleep(0.2)
    raise RuntimeError(f"bulwark registration still {'absent' if want else 'present'}")


def ensure_namespace(client, name, annotations=None):
    body = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "annotations": annotations or {}},
    }
    client.json("POST", "/api/v1/namespaces", body, ok=(201, 409))


def percentile(values, q):
    """Nearest-rank percentile of a list (q in 0..100); None for an empty list."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, int(round(q / 100.0 * len(ordered) + 0.4999)))
    return ordered[min(rank, len(ordered)) - 1]


def proc_sample(pid):
    """(RSS bytes, CPU seconds user+system) of a process, or (None, None) if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = (int(fields[11]) + int(fields[12])) / ticks
        return rss, cpu
    except (OSError, StopIteration, ValueError, IndexError):
        return None, None
