"""mesh-injector: Istio-compatible sidecar injection as a pure core with thin shells."""
