"""Real Kubernetes parts for tests and benchmarks: a loopback control plane and a single real node.

`controlplane.ControlPlane` (etcd + kube-apiserver + kube-controller-manager) and `node.Node`
(kube-scheduler + containerd + kubelet) are plain classes usable from benchmarks and the command
line; `plugin` wraps them as the session-scoped pytest fixtures `control_plane` and `node`.
"""
