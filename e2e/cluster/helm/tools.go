//go:build tools

// Package tools pins Helm (helm.sh/helm/v3) with go.mod/go.sum: scripts/setup.sh builds
// `helm` from this module (go build helm.sh/helm/v3/cmd/helm), so the tests run a real Helm
// of a known version without a download outside the Go module proxy.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
