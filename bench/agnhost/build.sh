#!/usr/bin/env bash
# Builds agnhost, the Kubernetes e2e test image whose `webhook` subcommand is the Go admission
# webhook peer of bench/webhook-throughput.sh, from the Go module proxy with the ordinary `go`
# tool: this module pins k8s.io/kubernetes and its staging modules to the release the e2e
# control plane uses. Once per version, into ~/.cache/bulwark/bin (override: BULWARK_CACHE).
# Prints the directory holding the binary.
set -euo pipefail
export GOTOOLCHAIN=${GOTOOLCHAIN:-auto}
here=$(cd "$(dirname "$0")" && pwd)
bin=${BULWARK_CACHE:-$HOME/.cache/bulwark}/bin
k8s=$(sed -n 's/^require k8s.io\/kubernetes //p' "$here/go.mod")
mkdir -p "$bin"
if [ ! -x "$bin/agnhost" ] || [ "$(cat "$bin/agnhost.version" 2>/dev/null)" != "$k8s" ]; then
  command -v go >/dev/null 2>&1 || { echo "bench/agnhost/build.sh: needs the go tool on PATH" >&2; exit 1; }
  echo "building agnhost from Kubernetes $k8s" >&2
  (cd "$here" && go build -trimpath -ldflags='-s -w' -o "$bin/agnhost" k8s.io/kubernetes/test/images/agnhost)
  echo "$k8s" >"$bin/agnhost.version"
fi
echo "$bin"
