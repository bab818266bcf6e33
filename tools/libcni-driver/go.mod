// The reference runtime library at the version containerd v2.4.2 uses (its go.mod).
module mesh-injector.test/tools/libcni-driver

go 1.26.0

require github.com/containernetworking/cni v1.3.1

require (
	go.opentelemetry.io/otel v1.29.0 // indirect
	go.opentelemetry.io/otel/trace v1.29.0 // indirect
)
