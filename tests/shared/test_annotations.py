"""The shared traffic vocabulary: what the injector accepts is exactly what the plugin can program."""

from __future__ import annotations

import ipaddress
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cni import annotations as a


def test_defaults_redirect_everything_but_the_proxy_ports() -> None:
    resolved = a.resolve_traffic({})
    plan = resolved.plan
    assert plan.redirects
    assert plan.inbound_ports is None and plan.outbound_include_cidrs is None
    assert set(a.PROXY_INBOUND_PORTS) <= set(plan.inbound_exclude_ports)
    assert (plan.proxy_uid, plan.proxy_gid) == (1337, 1337)
    assert resolved.annotations[a.INCLUDE_INBOUND_PORTS] == "*"
    assert resolved.annotations[a.INCLUDE_OUTBOUND_IP_RANGES] == "*"


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        (a.EXCLUDE_INBOUND_PORTS, "80,abc", "'abc' is not a port number"),
        (a.EXCLUDE_OUTBOUND_PORTS, "70000", "outside 1-65535"),
        (a.INCLUDE_INBOUND_PORTS, "80,*", "must stand alone"),
        (a.EXCLUDE_INBOUND_PORTS, "*", "not allowed"),
        (a.EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/33", "not an IP address or CIDR"),
        (a.INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8,bogus", "'bogus'"),
        (a.INTERCEPTION_MODE, "TPROXY", "not supported"),
        (a.INTERCEPTION_MODE, "MAGIC", "REDIRECT or NONE"),
        (a.EXCLUDE_INTERFACES, "eth0,a/b", "not a valid interface name"),
        (a.CAPTURE_DNS, "maybe", "true or false"),
        (a.PROXY_UID, "-1", "uid"),
        (a.STATUS_PORT, "65536", "outside"),
        (a.EXCLUDE_INBOUND_PORTS, "8\u00b2", "'8\u00b2' is not a port number"),
        (a.EXCLUDE_OUTBOUND_PORTS, "\u0668\u0660", "is not a port number"),
        (a.PROXY_UID, "\u0661\u0663\u0663\u0667", "uid"),
        (a.EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/\u0668", "not an IP address or CIDR"),
        (a.EXCLUDE_INBOUND_PORTS, "9" * 5000, "outside"),
    ],
)
def test_bad_values_name_the_annotation_and_value(key: str, value: str, fragment: str) -> None:
    with pytest.raises(a.AnnotationError) as caught:
        a.resolve_traffic({key: value})
    assert caught.value.annotation == key
    assert caught.value.value == value
    assert key in str(caught.value) and fragment in str(caught.value)


def test_values_are_normalised_and_round_trip() -> None:
    resolved = a.resolve_traffic(
        {
            a.EXCLUDE_OUTBOUND_IP_RANGES: "10.1.2.3/8,fd00::1/64,10.0.0.0/8",
            a.INCLUDE_INBOUND_PORTS: "9090, 80,80",
            a.EXCLUDE_INTERFACES: "eth1,eth0",
            a.INTERCEPTION_MODE: "redirect",
            a.STATUS_PORT: "15999",
        }
    )
    ann = resolved.annotations
    assert ann[a.EXCLUDE_OUTBOUND_IP_RANGES] == "10.0.0.0/8,fd00::/64"
    assert ann[a.INCLUDE_INBOUND_PORTS] == "80,9090"
    assert ann[a.EXCLUDE_INTERFACES] == "eth0,eth1"
    assert ann[a.INTERCEPTION_MODE] == "REDIRECT"
    assert 15999 in resolved.plan.inbound_exclude_ports
    # The plugin reading the resolved annotations, without the injector's defaults, gets the same plan.
    assert a.plan_from_annotations(ann, a.TrafficDefaults(proxy_uid=1, capture_dns=True)) == resolved.plan


@pytest.mark.parametrize(("value", "fragment"), [
    ("10.0.0.0/8, 172.16.0.0/12", "' 172.16.0.0/12' contains white space"),
    ("10.0.0.0/8 ", "'10.0.0.0/8 ' contains white space"),
    (" * ", "' * ' contains white space"),
    ("10.0.0.0/8,,172.16.0.0/12", "empty item"),
    ("10.0.0.0/8,", "empty item"),
    ("10.0.0.1", "'10.0.0.1' has no prefix length (write 10.0.0.1/32"),
    ("fd00::1", "(write fd00::1/128"),
    ("10.0.0.0/08", "leading zero in its prefix length"),
    ("010.0.0.0/8", "'010.0.0.0/8' is not an IP address"),
    ("fe80::1%eth0/64", "is not an IP address"),
    ("10.0.0.0/8,*", "'*' must stand alone"),
])
def test_cidr_lists_are_read_as_strictly_as_istio_does(value: str, fragment: str) -> None:
    """Istio refuses the pod on each of these (tests/istio asked istioctl); so do we, injector and
    plugin alike, naming the annotation and the item."""
    for key in (a.INCLUDE_OUTBOUND_IP_RANGES, a.EXCLUDE_OUTBOUND_IP_RANGES):
        with pytest.raises(a.AnnotationError) as caught:
            a.resolve_traffic({key: value})
        assert key in str(caught.value) and fragment in str(caught.value)


def test_cidr_host_bits_are_accepted_and_masked_as_istio_accepts_them() -> None:
    ann = a.resolve_traffic({a.INCLUDE_OUTBOUND_IP_RANGES: "172.16.0.1/12,FD00::1/8,0.0.0.0/0"}).annotations
    assert ann[a.INCLUDE_OUTBOUND_IP_RANGES] == "0.0.0.0/0,172.16.0.0/12,fd00::/8"


def test_empty_include_means_none_not_all() -> None:
    plan = a.resolve_traffic({a.INCLUDE_INBOUND_PORTS: "", a.INCLUDE_OUTBOUND_IP_RANGES: ""}).plan
    assert plan.inbound_ports == () and plan.outbound_include_cidrs == ()


def test_mesh_defaults_apply_only_where_the_pod_is_silent() -> None:
    defaults = a.TrafficDefaults(exclude_outbound_ports="3306", capture_dns=True)
    plan = a.resolve_traffic({a.CAPTURE_DNS: "false"}, defaults).plan
    assert plan.outbound_exclude_ports == (3306,)
    assert plan.capture_dns is False


def test_redirect_decision_follows_the_status_annotation_only() -> None:
    def status(*inits: str) -> str:
        return a.InjectionStatus(init_containers=inits, containers=(a.PROXY_CONTAINER,)).to_json()

    assert a.redirect_decision({}).reason == a.ReasonCode.NOT_INJECTED
    assert a.redirect_decision({a.STATUS: status(a.VALIDATION_CONTAINER)}).redirect
    assert a.redirect_decision({a.STATUS: status(a.INIT_CONTAINER, a.PROXY_CONTAINER)}).redirect
    # The injector decided (a label "true" beats an annotation "false"): the plugin does not re-decide.
    assert a.redirect_decision({a.STATUS: status(a.VALIDATION_CONTAINER), a.INJECT: "false"}).redirect
    assert a.redirect_decision({a.STATUS: status()}).reason == a.ReasonCode.NO_CAPTURE
    for garbage in ("{", "[]", '{"initContainers": 1}', "[" * 100_000):
        assert a.redirect_decision({a.STATUS: garbage}).reason == a.ReasonCode.INVALID_STATUS


def test_numbers_are_ascii_digits_only() -> None:
    assert a.parse_uint("k", " 42 ") == 42
    for bad in ("\u00b2", "\u0664\u0662", "\uff14\uff12", "-1", "+1", "1_000", "", "0x10"):
        with pytest.raises(a.AnnotationError, match="is not a number"):
            a.parse_uint("k", bad)
    with pytest.raises(a.AnnotationError, match="outside 1-9"):
        a.parse_uint("k", "10", low=1, high=9)


def test_status_port_zero_means_no_status_port() -> None:
    plan = a.resolve_traffic({a.STATUS_PORT: "0"}).plan
    assert plan.status_port == 0 and 0 not in plan.inbound_exclude_ports


def test_reason_codes_are_unique_strings() -> None:
    assert len(set(a.REASON_CODES.values())) == len(a.REASON_CODES)
    for code in ("InternalError", "NotPod", "NotCreate", "Subresource", "RequestTooLarge", "Timeout"):
        assert code in a.REASON_CODES.values()


def test_status_round_trips_and_rejects_garbage() -> None:
    status = a.InjectionStatus(
        init_containers=("istio-validation",), containers=("istio-proxy",), volumes=("istio-envoy",),
        revision="canary", templates=("sidecar",), config_hash="abc",
    )
    assert a.parse_status(status.to_json()) == status
    for bad in ("{", "[]", '{"containers": "istio-proxy"}'):
        with pytest.raises(a.AnnotationError):
            a.parse_status(bad)


ports = st.lists(st.integers(1, 65535), max_size=6)
cidrs = st.lists(st.one_of(st.ip_addresses(v=4).map(lambda ip: f"{ip}/{ip.max_prefixlen - 8}"),
                           st.ip_addresses(v=6).map(lambda ip: f"{ip}/64")), max_size=4)


@given(ports, ports, cidrs)
def test_resolution_is_a_fixed_point(inbound: list[int], outbound: list[int], ranges: list[str]) -> None:
    first = a.resolve_traffic({
        a.EXCLUDE_INBOUND_PORTS: ",".join(map(str, inbound)),
        a.INCLUDE_OUTBOUND_PORTS: ",".join(map(str, outbound)),
        a.EXCLUDE_OUTBOUND_IP_RANGES: ",".join(ranges),
    })
    again = a.resolve_traffic(first.annotations)
    assert again == first
    for net in again.plan.outbound_exclude_cidrs:
        assert any(str(net) == str(ipaddress.ip_network(r, strict=False)) for r in ranges)


@given(st.one_of(st.ip_addresses(v=4).flatmap(lambda ip: st.tuples(st.just(ip), st.integers(0, 32))),
                 st.ip_addresses(v=6).flatmap(lambda ip: st.tuples(st.just(ip), st.integers(0, 128)))))
def test_cidr_masks_like_the_standard_library(address_and_prefix: tuple[object, int]) -> None:
    """Our light CIDR parser (no ipaddress import on the hot path) agrees with ipaddress."""
    address, prefix = address_and_prefix
    ours = a.Cidr(f"{address}/{prefix}")
    reference = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    assert (ours.version, ours.packed, ours.prefixlen) == (
        reference.version, reference.network_address.packed, reference.prefixlen)
    assert a.Cidr(str(ours)) == ours


def test_records_are_immutable_values() -> None:
    plan = a.RedirectPlan()
    with pytest.raises(AttributeError):
        plan.mode = "NONE"  # type: ignore[misc]
    assert plan.replace(mode="NONE") == a.RedirectPlan(mode="NONE") != plan
    assert hash(plan) == hash(a.RedirectPlan())
    with pytest.raises(TypeError, match="no field"):
        a.RedirectPlan(mood="happy")


def test_module_is_stdlib_only_and_cheap_to_import() -> None:
    """The CNI hot path imports this module: it must pull in nothing outside the standard library."""
    code = (
        "import sys; before = set(sys.modules); import cni.annotations; "
        "print('\\n'.join(sorted(set(sys.modules) - before)))"
    )
    root = str(a.__file__).rsplit("/cni/", 1)[0]
    script = f"import sys; sys.path.insert(0, {root!r}); {code}"
    out = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, check=True)
    tops = {m.split(".")[0] for m in out.stdout.split()}
    third_party = sorted(t for t in tops if t not in sys.stdlib_module_names and t != "cni")
    assert third_party == []


def test_the_readme_lists_every_reason_code() -> None:
    """Codes are API: each one a user can meet is in the README's table."""
    from pathlib import Path

    readme = (Path(a.__file__).resolve().parent.parent / "README.md").read_text()
    missing = [code for code in a.REASON_CODES.values() if f"`{code}`" not in readme]
    assert missing == []
