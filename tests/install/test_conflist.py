"""The pure chaining rules: which file the runtime uses and what our entry does to it."""

from __future__ import annotations

import json

import pytest

from cni.install import conflist as chain
from tests.install.conftest import BRIDGE_CONFLIST, BYSTANDERS, CALICO_CONFLIST, SINGLE_CONF

ENTRY = chain.EntryOptions().entry()


def test_entry_is_the_contract_4_shape() -> None:
    assert ENTRY == {
        "type": "mesh-cni",
        "capabilities": {"io.kubernetes.cri.pod-annotations": True},
        "kubeconfig": "/var/lib/mesh-cni/kubeconfig",
        "logFile": "/var/log/mesh-cni/mesh-cni.log",
        "logLevel": "info",
        "excludeNamespaces": ["kube-system"],
        "captureDNS": False,
    }


def test_primary_is_the_lexically_first_valid_file() -> None:
    files = [
        ("20-calico.conflist", CALICO_CONFLIST),
        ("10-bridge.conflist", BRIDGE_CONFLIST),
        *BYSTANDERS.items(),  # 00-broken.conflist sorts first but is not valid
        ("05-empty.conflist", b'{"name": "x", "plugins": []}'),  # no plugins: runtime rejects it
        ("01-notes.txt", b'{"type": "bridge"}'),  # wrong suffix
    ]
    found = chain.primary(files)
    assert found is not None and found.name == "10-bridge.conflist"


def test_none_while_no_valid_config() -> None:
    assert chain.plan_chain(list(BYSTANDERS.items())[:1], ENTRY) is None
    assert chain.plan_chain([], ENTRY) is None


@pytest.mark.parametrize("data", [BRIDGE_CONFLIST, CALICO_CONFLIST])
def test_appends_last_keeping_every_other_plugin(data: bytes) -> None:
    plan = chain.plan_chain([("10-x.conflist", data)], ENTRY)
    assert plan is not None and not plan.already_installed and plan.replaces is None
    before, after = json.loads(data), json.loads(plan.content)
    assert after["plugins"][:-1] == before["plugins"]
    assert after["plugins"][-1] == ENTRY
    assert {k: v for k, v in after.items() if k != "plugins"} == {
        k: v for k, v in before.items() if k != "plugins"
    }


def test_install_twice_is_install_once() -> None:
    first = chain.plan_chain([("10-x.conflist", BRIDGE_CONFLIST)], ENTRY)
    assert first is not None
    second = chain.plan_chain([("10-x.conflist", first.content)], ENTRY)
    assert second is not None and second.already_installed and second.content == first.content


def test_older_entry_of_ours_is_replaced_not_duplicated() -> None:
    old = json.loads(BRIDGE_CONFLIST)
    stale = {"type": "mesh-cni", "kubeconfig": "/old/path", "logLevel": "debug"}
    old["plugins"].insert(1, stale)  # even in the middle
    plan = chain.plan_chain([("10-x.conflist", json.dumps(old).encode())], ENTRY)
    assert plan is not None and not plan.already_installed
    types = [p["type"] for p in json.loads(plan.content)["plugins"]]
    assert types == ["bridge", "portmap", "mesh-cni"]
    assert json.loads(plan.content)["plugins"][-1] == ENTRY


def test_single_conf_becomes_a_conflist_keeping_cni_version() -> None:
    plan = chain.plan_chain([("10-mynet.conf", SINGLE_CONF)], ENTRY)
    assert plan is not None
    assert (plan.target, plan.replaces) == ("10-mynet.conflist", "10-mynet.conf")
    body = json.loads(plan.content)
    conf = json.loads(SINGLE_CONF)
    assert body["cniVersion"] == "0.4.0" and body["name"] == "mynet"
    assert body["plugins"][0] == {k: v for k, v in conf.items() if k not in ("cniVersion", "name")}
    assert body["plugins"][1] == ENTRY


def test_converted_name_sorts_where_the_conf_did() -> None:
    names = sorted(["10-mynet.conf", "05-a.conflist", "20-b.conf", "10-mynet.conflist"])
    assert names.index("10-mynet.conflist") == names.index("10-mynet.conf") + 1


def test_a_plugin_entry_without_type_makes_the_list_invalid() -> None:
    assert chain.parse_config("1.conflist", b'{"plugins": [{"type": "bridge"}, {"name": "x"}]}') is None
    assert chain.parse_config("1.conf", b'{"name": "x"}') is None
    assert chain.parse_config("1.conf", b"[1, 2]") is None


def test_stripping_our_entry_gives_back_the_other_plugins() -> None:
    plan = chain.plan_chain([("10-x.conflist", CALICO_CONFLIST)], ENTRY)
    assert plan is not None
    stripped = chain.without_our_entry(json.loads(plan.content))
    assert stripped == json.loads(CALICO_CONFLIST)
