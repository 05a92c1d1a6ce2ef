#!/usr/bin/env bash
# Builds the pinned control plane for end-to-end tests from published Go modules with the
# ordinary `go` tool, once per version, into ~/.cache/bulwark/bin (override: BULWARK_CACHE):
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl  (e2e/controlplane: a
#     wrapper module pinning every k8s.io staging module to the release's v0.X.Y)
#   etcd  (e2e/etcd: etcdmain from go.etcd.io/etcd/server/v3, its sibling modules pinned)
#   kwok  (go install of sigs.k8s.io/kwok/cmd/kwok)
#   helm  (go install of helm.sh/helm/v3/cmd/helm, to render deploy/helm/bulwark)
#   promtool  (go install of github.com/prometheus/prometheus/cmd/promtool, to check the alert
#     rules in deploy/monitoring)
#   cert-manager CRDs  (Certificate, Issuer from the cert-manager module's deploy/crds, so the
#     cert-manager overlay can be checked by the API server)
#   prometheus-operator CRDs  (ServiceMonitor, PrometheusRule from the prometheus-operator
#     module's example/prometheus-operator-crd, for the monitoring component)
# Prints the directory holding the binaries. BULWARK_BUILD=cluster builds only what a cluster
# runs (etcd, Kubernetes, kwok), not the tools of the deploy/ tests (helm, promtool, CRDs).
set -euo pipefail
# A Go older than a module's `go` line fetches the matching toolchain from the module proxy
# (distribution packages often pin GOTOOLCHAIN=local).
export GOTOOLCHAIN=${GOTOOLCHAIN:-auto}
need_go() { command -v go >/dev/null 2>&1 || { echo "e2e/build.sh: building $1 needs the go tool on PATH" >&2; exit 1; }; }
here=$(cd "$(dirname "$0")" && pwd)
cache=${BULWARK_CACHE:-$HOME/.cache/bulwark}
k8s=$(sed -n 's/^require k8s.io\/kubernetes //p' "$here/controlplane/go.mod")
etcd=$(sed -n 's/^require go.etcd.io\/etcd\/server\/v3 //p' "$here/etcd/go.mod")
kwok=v0.7.0
helm=v3.19.5
# Prometheus 3.x publishes its Go module as v0.3XX.Y.
prometheus=v0.316.0
certmanager=v1.21.2
promoperator=v0.85.0
bin="$cache/bin"
mkdir -p "$bin"

stamp() { [ -x "$bin/$1" ] && [ "$(cat "$bin/$1.version" 2>/dev/null)" = "$2" ]; }
mark() { echo "$2" >"$bin/$1.version"; }

cmds=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
missing=()
for c in "${cmds[@]}"; do stamp "$c" "$k8s" || missing+=("k8s.io/kubernetes/cmd/$c"); done
if [ "${#missing[@]}" -gt 0 ]; then
  need_go "Kubernetes $k8s"
  echo "building Kubernetes $k8s: ${missing[*]##*/}" >&2
  # Stamp the release version as Kubernetes' own build does (hack/lib/version.sh), so
  # /version, kubectl and version-skew checks see v1.X.Y rather than v0.0.0-master.
  minor=${k8s#v1.}; minor=${minor%%.*}
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$k8s -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  (cd "$here/controlplane" && go build -trimpath -ldflags="$ldflags" -o "$bin/" "${missing[@]}")
  for c in "${cmds[@]}"; do mark "$c" "$k8s"; done
fi
if ! stamp etcd "$etcd"; then
  need_go "etcd $etcd"
  echo "building etcd $etcd" >&2
  (cd "$here/etcd" && go build -trimpath -ldflags='-s -w' -o "$bin/etcd" .)
  mark etcd "$etcd"
fi
if ! stamp kwok "$kwok"; then
  need_go "kwok $kwok"
  echo "building kwok $kwok" >&2
  GOBIN="$bin" go install "sigs.k8s.io/kwok/cmd/kwok@$kwok"
  mark kwok "$kwok"
fi
if [ "${BULWARK_BUILD:-all}" = cluster ]; then
  echo "$bin"
  exit 0
fi
if ! stamp helm "$helm"; then
  need_go "helm $helm"
  echo "building helm $helm" >&2
  GOBIN="$bin" GOFLAGS=-mod=mod go install "helm.sh/helm/v3/cmd/helm@$helm"
  mark helm "$helm"
fi
if ! stamp promtool "$prometheus"; then
  need_go "promtool $prometheus"
  echo "building promtool (Prometheus module $prometheus)" >&2
  GOBIN="$bin" GOFLAGS=-mod=mod go install "github.com/prometheus/prometheus/cmd/promtool@$prometheus"
  mark promtool "$prometheus"
fi
crds="$cache/crds/cert-manager-$certmanager"
if [ ! -s "$crds/cert-manager.io_issuers.yaml" ]; then
  need_go "the cert-manager CRDs"
  echo "fetching the cert-manager $certmanager CRDs" >&2
  dir=$(cd "$here/controlplane" && go mod download -json "github.com/cert-manager/cert-manager@$certmanager" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  mkdir -p "$crds"
  for f in cert-manager.io_certificates.yaml cert-manager.io_issuers.yaml; do
    cp "$dir/deploy/crds/$f" "$crds/$f.tmp" && mv "$crds/$f.tmp" "$crds/$f"
  done
fi
crds="$cache/crds/prometheus-operator-$promoperator"
if [ ! -s "$crds/monitoring.coreos.com_prometheusrules.yaml" ]; then
  need_go "the prometheus-operator CRDs"
  echo "fetching the prometheus-operator $promoperator CRDs" >&2
  dir=$(cd "$here/controlplane" && go mod download -json "github.com/prometheus-operator/prometheus-operator@$promoperator" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  mkdir -p "$crds"
  for f in monitoring.coreos.com_servicemonitors.yaml monitoring.coreos.com_prometheusrules.yaml; do
    cp "$dir/example/prometheus-operator-crd/$f" "$crds/$f.tmp" && mv "$crds/$f.tmp" "$crds/$f"
  done
fi
echo "$bin"
