//go:build tools

// Package agnhost pins the Kubernetes e2e test image agnhost (its `webhook` subcommand is the Go
// admission webhook peer in bench/webhook-throughput.sh) to the same release as the e2e control
// plane.
package agnhost

import (
	_ "k8s.io/kubernetes/test/images/agnhost"
)
