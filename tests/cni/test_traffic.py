"""Real traffic through pods wired by bridge + host-local + mesh-cni (libcni): where it lands."""

from __future__ import annotations

import pytest

from tests.cni.cnitest import INJECTED, CniBed, Listeners, Pod, connect

PROXY = 1337
OUT, IN, DNS = 15001, 15006, 15053


@pytest.fixture(scope="module")
def server(bed: CniBed) -> Pod:
    """An uninjected pod: the far end for outbound tests and the client for inbound ones."""
    return bed.add_pod("meshnet", {}, name="server")


def injected(bed: CniBed, **annotations: str) -> Pod:
    return bed.add_pod("meshnet", {**INJECTED, **annotations})


def test_outbound_is_redirected_and_proxy_uid_bypasses(bed: CniBed, server: Pod) -> None:
    pod = injected(bed)
    with Listeners(pod, (OUT, IN)) as local, Listeners(server, (8080,)) as remote:
        assert connect(pod, server.ipv4, 8080) == "connected"
        landing = local.next()
        assert landing is not None and landing.port == OUT
        assert landing.original == (server.ipv4, 8080)
        assert remote.next(0.3) is None

        assert connect(pod, server.ipv4, 8080, uid=PROXY) == "connected"
        direct = remote.next()
        assert direct is not None and direct.peer[0] == pod.ipv4
        assert local.next(0.3) is None
        # The proxy's gid alone (another uid) also bypasses, as Istio's gid rules do.
        assert connect(pod, server.ipv4, 8080, uid=4242, gid=PROXY) == "connected"
        assert remote.next() is not None


def test_ipv6_outbound_is_redirected(bed: CniBed, server: Pod) -> None:
    pod = injected(bed)
    with Listeners(pod, (OUT,)) as local, Listeners(server, (8080,)) as remote:
        assert connect(pod, server.ipv6, 8080) == "connected"
        landing = local.next()
        assert landing is not None and landing.port == OUT and landing.original == (server.ipv6, 8080)
        assert connect(pod, server.ipv6, 8080, uid=PROXY) == "connected"
        assert remote.next() is not None


def test_excluded_outbound_ports_and_cidrs_bypass(bed: CniBed, server: Pod) -> None:
    pod = injected(bed, **{"traffic.sidecar.istio.io/excludeOutboundPorts": "8080",
                           "traffic.sidecar.istio.io/excludeOutboundIPRanges": f"{server.ipv4}/32"})
    with Listeners(pod, (OUT,)) as local, Listeners(server, (8080, 9090)) as remote:
        assert connect(pod, server.ipv4, 8080) == "connected"  # excluded port
        assert remote.next() is not None
        assert connect(pod, server.ipv4, 9090) == "connected"  # excluded CIDR
        assert remote.next() is not None
        assert local.next(0.3) is None
        assert connect(pod, server.ipv6, 9090) == "connected"  # the v6 address is not excluded
        landing = local.next()
        assert landing is not None and landing.original == (server.ipv6, 9090)


def test_include_lists_are_respected(bed: CniBed, server: Pod) -> None:
    pod = injected(bed, **{"traffic.sidecar.istio.io/includeOutboundIPRanges": "192.0.2.0/24",
                           "traffic.sidecar.istio.io/includeOutboundPorts": "9090"})
    with Listeners(pod, (OUT,)) as local, Listeners(server, (8080, 9090)) as remote:
        assert connect(pod, "192.0.2.7", 80) == "connected"  # in the included range
        landing = local.next()
        assert landing is not None and landing.original == ("192.0.2.7", 80)
        assert connect(pod, server.ipv4, 8080) == "connected"  # outside it: direct
        assert remote.next() is not None and local.next(0.3) is None
        assert connect(pod, server.ipv4, 9090) == "connected"  # included port: captured anywhere
        landing = local.next()
        assert landing is not None and landing.original == (server.ipv4, 9090)


def test_inbound_is_redirected_except_proxy_and_excluded_ports(bed: CniBed, server: Pod) -> None:
    pod = injected(bed, **{"traffic.sidecar.istio.io/excludeInboundPorts": "9000"})
    with Listeners(pod, (IN, 8080, 9000, 15020, 15021, 15090)) as local:
        assert connect(server, pod.ipv4, 8080) == "connected"
        landing = local.next()
        assert landing is not None and landing.port == IN and landing.original == (pod.ipv4, 8080)
        for port in (9000, 15020, 15021, 15090):
            assert connect(server, pod.ipv4, port) == "connected"
            landing = local.next()
            assert landing is not None and landing.port == port, port
        assert connect(server, pod.ipv6, 8080) == "connected"
        landing = local.next()
        assert landing is not None and landing.port == IN and landing.original == (pod.ipv6, 8080)


def test_only_included_inbound_ports_are_redirected(bed: CniBed, server: Pod) -> None:
    pod = injected(bed, **{"traffic.sidecar.istio.io/includeInboundPorts": "8080"})
    with Listeners(pod, (IN, 8080, 8081)) as local:
        assert connect(server, pod.ipv4, 8080) == "connected"
        landing = local.next()
        assert landing is not None and landing.port == IN
        assert connect(server, pod.ipv4, 8081) == "connected"
        landing = local.next()
        assert landing is not None and landing.port == 8081


def test_loopback_rules(bed: CniBed) -> None:
    pod = injected(bed)
    with Listeners(pod, (OUT, IN, 8080)) as local:
        # The app talking to itself over localhost or its own pod IP is never captured.
        assert connect(pod, "127.0.0.1", 8080) == "connected"
        assert local.next().port == 8080  # type: ignore[union-attr]
        assert connect(pod, pod.ipv4, 8080) == "connected"
        assert local.next().port == 8080  # type: ignore[union-attr]
        # The proxy reaching the app via the pod IP goes back through inbound ...
        assert connect(pod, pod.ipv4, 8080, uid=PROXY) == "connected"
        landing = local.next()
        assert landing is not None and landing.port == IN and landing.original == (pod.ipv4, 8080)
        # ... unless it is the inbound passthrough from 127.0.0.6.
        assert connect(pod, pod.ipv4, 8080, uid=PROXY, source="127.0.0.6") == "connected"
        assert local.next().port == 8080  # type: ignore[union-attr]
        # The proxy on 127.0.0.1 is left alone too.
        assert connect(pod, "127.0.0.1", 8080, uid=PROXY) == "connected"
        assert local.next().port == 8080  # type: ignore[union-attr]


def test_dns_capture_when_enabled(bed: CniBed, server: Pod) -> None:
    plain = injected(bed)
    pod = injected(bed, **{"traffic.mesh-injector.io/captureDNS": "true"})
    with Listeners(pod, (DNS,), (DNS,)) as local:
        assert connect(pod, "192.0.2.53", 53, proto="udp") == "connected"
        landing = local.next()
        assert landing is not None and landing.port == DNS
        assert connect(pod, "192.0.2.53", 53) == "connected"  # TCP DNS
        landing = local.next()
        assert landing is not None and landing.port == DNS and landing.original == ("192.0.2.53", 53)
        connect(pod, "192.0.2.53", 53, uid=PROXY, proto="udp")  # the proxy's own DNS is not captured
        assert local.next(0.3) is None
    with Listeners(plain, (OUT, DNS), (DNS,)) as local:
        connect(plain, "192.0.2.53", 53, proto="udp")
        assert local.next(0.3) is None  # no DNS capture unless enabled


def test_excluded_interfaces_are_not_captured(bed: CniBed, server: Pod) -> None:
    pod = injected(bed, **{"traffic.sidecar.istio.io/excludeInterfaces": "eth0"})
    with Listeners(pod, (OUT, IN, 8080)) as local, Listeners(server, (8080,)) as remote:
        assert connect(pod, server.ipv4, 8080) == "connected"
        assert remote.next() is not None and local.next(0.3) is None
        assert connect(server, pod.ipv4, 8080) == "connected"
        assert local.next().port == 8080  # type: ignore[union-attr]


def test_uninjected_and_excluded_pods_are_left_alone(bed: CniBed, server: Pod) -> None:
    from tests.cni.cnitest import nft_ruleset

    opted_out = bed.add_pod("meshnet", {"sidecar.istio.io/inject": "false"})
    none_mode = bed.add_pod("meshnet", {**INJECTED, "sidecar.istio.io/interceptionMode": "NONE"})
    system = bed.add_pod("meshnet", INJECTED, namespace="kube-system")
    own = bed.add_pod("meshnet", INJECTED, name="mesh-cni-node-x1")
    for pod in (server, opted_out, none_mode, system, own):
        assert "mesh_cni" not in nft_ruleset(pod.netns), pod.name
    # Each skip names its own reason: an excluded namespace is not the CNI's own pod.
    log = bed.log_file.read_text()
    assert "namespace kube-system is excluded (reason ExcludedNamespace)" in log
    assert "pod mesh-cni-node-x1 is the CNI's own pod (reason OwnPod)" in log
    # The injector decided (label beats annotation); the plugin follows its status, never re-decides.
    injected_anyway = bed.add_pod("meshnet", {**INJECTED, "sidecar.istio.io/inject": "false"})
    assert "mesh_cni" in nft_ruleset(injected_anyway.netns)


def test_ipv6_loopback_and_exclusions(bed: CniBed, server: Pod) -> None:
    pod = injected(bed, **{"traffic.sidecar.istio.io/excludeOutboundIPRanges": f"{server.ipv6}/128"})
    with Listeners(pod, (OUT, IN, 8080)) as local, Listeners(server, (8080,)) as remote:
        assert connect(pod, server.ipv6, 8080) == "connected"  # excluded v6 address: direct
        assert remote.next() is not None and local.next(0.3) is None
        assert connect(pod, server.ipv4, 8080) == "connected"  # its v4 address is still captured
        assert local.next().port == OUT  # type: ignore[union-attr]
        assert connect(pod, "::1", 8080) == "connected"
        assert local.next().port == 8080  # type: ignore[union-attr]
        assert connect(pod, pod.ipv6, 8080, uid=PROXY) == "connected"  # proxy -> own app: inbound
        landing = local.next()
        assert landing is not None and landing.port == IN and landing.original == (pod.ipv6, 8080)
        assert connect(pod, pod.ipv6, 8080) == "connected"  # app -> itself: direct
        assert local.next().port == 8080  # type: ignore[union-attr]
        # The proxy's inbound passthrough from ::6 (which ADD put on lo) reaches the app directly.
        assert connect(pod, pod.ipv6, 8080, uid=PROXY, source="::6") == "connected"
        assert local.next().port == 8080  # type: ignore[union-attr]
