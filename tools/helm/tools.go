//go:build tools

// Package tools pins Helm's command for the test bed (go build helm.sh/helm/v4/cmd/helm).
package tools

import _ "helm.sh/helm/v4/cmd/helm"
