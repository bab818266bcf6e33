"""One pod's row and the totals: which revision it runs, which one selects it now, stale or not."""

from __future__ import annotations

from typing import Any

import pytest

from injector.audit import Summary, audit_pod, wanted_revision
from injector.configwatch import builtin_config
from injector.core import inject
from injector.documents import config_for_revision


def pod(name: str = "web-1", labels: dict[str, str] | None = None, **meta: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "shop", "labels": labels or {"app": "web"}, **meta},
            "spec": {"containers": [{"name": "app", "image": "busybox"}]}}


def injected_by(revision: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    config = config_for_revision(builtin_config(), revision)
    result = inject(base or pod(), config=config, namespace_labels={"istio.io/rev": revision},
                    namespace="shop")
    assert result.decision.value == "inject"
    return result.mutated


def row(obj: dict[str, Any], ns_labels: dict[str, str]) -> Any:
    return audit_pod(obj, namespace_labels=ns_labels, config=builtin_config(),
                     config_for_revision=config_for_revision)


def test_a_namespace_moved_to_canary_shows_its_default_pods_as_stale() -> None:
    audited = row(injected_by("default"), {"istio.io/rev": "canary"})
    assert (audited.revision, audited.wanted_revision) == ("default", "canary")
    assert audited.stale is True and audited.needs_restart and audited.should_inject


def test_pods_already_on_the_wanted_revision_are_not_stale() -> None:
    on_canary = row(injected_by("canary"), {"istio.io/rev": "canary"})
    # Another revision's config is not ours to judge: its hash is unknown here, not stale.
    assert on_canary.revision == "canary" and on_canary.stale is None
    assert not on_canary.needs_restart
    on_default = row(injected_by("default"), {"istio-injection": "enabled"})
    assert on_default.stale is False and not on_default.needs_restart


def test_another_config_of_the_same_revision_is_stale() -> None:
    obj = injected_by("default")
    status = obj["metadata"]["annotations"]["sidecar.istio.io/status"]
    obj["metadata"]["annotations"]["sidecar.istio.io/status"] = status.replace(
        builtin_config().config_hash, "0123456789abcdef")
    audited = row(obj, {"istio-injection": "enabled"})
    assert audited.stale is True and audited.needs_restart and audited.config_hash == "0123456789abcdef"


@pytest.mark.parametrize(("ns_labels", "pod_labels", "wanted"), [
    ({"istio-injection": "enabled"}, {}, "default"),
    ({"istio-injection": "enabled", "istio.io/rev": "canary"}, {}, "default"),  # the old label wins
    ({"istio.io/rev": "canary"}, {}, "canary"),
    ({}, {"istio.io/rev": "canary"}, "canary"),
    ({}, {"sidecar.istio.io/inject": "true"}, "default"),
    ({"istio.io/rev": "canary"}, {"sidecar.istio.io/inject": "false"}, None),
    ({"istio-injection": "disabled"}, {"istio.io/rev": "canary"}, None),
    ({}, {}, None),
])
def test_the_wanted_revision_follows_the_webhook_selectors(
    ns_labels: dict[str, str], pod_labels: dict[str, str], wanted: str | None
) -> None:
    assert wanted_revision(namespace="shop", namespace_labels=ns_labels, pod_labels=pod_labels) == wanted


def test_system_namespaces_want_no_revision() -> None:
    assert wanted_revision(namespace="kube-system", namespace_labels={"istio-injection": "enabled"},
                           pod_labels={}, system_namespaces={"kube-system"}) is None


def test_a_sidecar_nobody_selects_any_more_needs_a_restart() -> None:
    audited = row(injected_by("default"), {})
    assert audited.injected and not audited.should_inject and audited.needs_restart
    assert audited.reasons[0]["code"] == "NamespaceNotSelected"


def test_the_summary_counts_and_remembers_only_restartable_workloads() -> None:
    summary = Summary()
    stale = injected_by("default", pod(ownerReferences=[
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": "1", "controller": True}]))
    for obj in (stale, stale, injected_by("default")):  # two pods of db, one bare pod
        summary.add(row(obj, {"istio.io/rev": "canary"}))
    totals = summary.as_dict()
    assert totals["pods"] == 3 and totals["stale"] == 3 and totals["needsRestart"] == 3
    assert totals["revisions"] == {"default": 3}
    assert summary.workloads == {("shop", "StatefulSet", "db"): 2}
    assert summary.unrestartable == 1


def test_many_distinct_revisions_stay_bounded_and_every_pod_is_still_counted() -> None:
    summary = Summary()
    template = injected_by("default")
    base = row(template, {"istio.io/rev": "canary"})
    for i in range(300):
        base.revision = f"rev-{i}"
        summary.add(base)
    assert len(summary.revisions) == 256
    assert summary.needs_restart == 300 and summary.unrestartable == 300
