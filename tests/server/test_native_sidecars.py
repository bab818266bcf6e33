"""``nativeSidecars: auto`` follows the cluster: the API server's version at start and on reload,
else the config's ``kubernetesVersion``, else off with a warning."""

from __future__ import annotations

import time
from pathlib import Path

from tests.server.fake_apiserver import FakeApiServer
from tests.server.helpers import RunningServer, decoded_patch, review, start_server, typical_pod


def proxy_is_native(server: RunningServer) -> bool:
    import jsonpatch

    with server.client() as client:
        answer = client.post("/inject", json=review(typical_pod())).json()
    pod = jsonpatch.apply_patch(typical_pod(), decoded_patch(answer))
    init = {c["name"]: c for c in pod["spec"].get("initContainers", [])}
    app = {c["name"] for c in pod["spec"]["containers"]}
    assert ("istio-proxy" in init) != ("istio-proxy" in app)
    return "istio-proxy" in init and init["istio-proxy"].get("restartPolicy") == "Always"


def serve(tmp_path: Path, fake: FakeApiServer | None, kubernetes_version: str = "",
          kubeconfig: Path | None = None) -> RunningServer:
    config_dir = tmp_path / "config"
    config_dir.mkdir(exist_ok=True)
    # An empty config dir is refused (issue 14): "policy: enabled" is the built-in default.
    (config_dir / "config.yaml").write_text(
        f'values:\n  mesh:\n    kubernetesVersion: "{kubernetes_version}"\n' if kubernetes_version
        else "policy: enabled\n")
    args = ["--no-events"]
    if fake is not None:
        kubeconfig = fake.kubeconfig(tmp_path / "kubeconfig")
    if kubeconfig is not None:
        args += ["--kubeconfig", str(kubeconfig)]
    return start_server(tmp_path, config_dir=config_dir, extra_args=args)


def test_the_api_servers_version_decides_and_is_read_again_on_reload(tmp_path: Path) -> None:
    fake = FakeApiServer(version={"major": "1", "minor": "33", "gitVersion": "v1.33.2"}).start()
    server = serve(tmp_path, fake, kubernetes_version="1.27")  # the cluster beats the config
    try:
        assert proxy_is_native(server)
        assert fake.calls("/version")
        fake.version = {"major": "1", "minor": "28", "gitVersion": "v1.28.9"}
        assert server.config_dir is not None
        (server.config_dir / "config.yaml").write_text("values:\n  mesh:\n    clusterId: other\n")
        deadline = time.monotonic() + 20
        while proxy_is_native(server):
            assert time.monotonic() < deadline, "the reload did not read the version again"
            time.sleep(0.2)
    finally:
        server.stop()
        fake.stop()


def test_without_the_api_the_configs_version_decides(tmp_path: Path) -> None:
    unreachable = tmp_path / "unreachable-kubeconfig"
    unreachable.write_text(
        '{"apiVersion": "v1", "kind": "Config", "current-context": "x", '
        '"clusters": [{"name": "x", "cluster": {"server": "http://127.0.0.1:9"}}], '
        '"users": [{"name": "x", "user": {"token": "t"}}], '
        '"contexts": [{"name": "x", "context": {"cluster": "x", "user": "x"}}]}')
    server = serve(tmp_path, None, kubernetes_version="1.30", kubeconfig=unreachable)
    try:
        assert proxy_is_native(server)
        assert any("cannot read the API server's version" in str(e.get("msg")) for e in server.logs())
    finally:
        server.stop()


def test_neither_known_means_off_with_a_warning(tmp_path: Path) -> None:
    server = serve(tmp_path, None)
    try:
        assert not proxy_is_native(server)
        warnings = [e for e in server.logs() if e.get("level") == "warning"]
        assert any("native sidecars off" in str(e.get("msg")) for e in warnings)
    finally:
        server.stop()
