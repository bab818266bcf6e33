"""Webhook-level selection as data: the one definition of which pods the API server sends us.

``webhook_selectors()`` is what the MutatingWebhookConfiguration carries (the manifests render
it); ``evaluate_selection()`` applies the same definition offline, for the dry-run endpoint,
the CLI and the audit, where no API server filters for us. The shapes follow Istio's revision
and namespace/object selectors, so namespaces and pods labelled for Istio are selected as-is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cni import annotations as ann

NAMESPACE_INJECTION_LABEL = "istio-injection"  # namespace: enabled / disabled
REVISION_LABEL = "istio.io/rev"  # namespace or pod
INJECT_LABEL = ann.INJECT  # pod: true / false
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set on every namespace by the API server
WEBHOOK_SUFFIX = "sidecar-injector.mesh-injector.io"

Selector = dict[str, Any]


@dataclass(frozen=True)
class WebhookSelector:
    """One webhook entry's selectors: a pod is sent when both match."""

    name: str
    namespace_selector: Selector
    object_selector: Selector


def _expr(key: str, operator: str, values: Sequence[str] = ()) -> dict[str, Any]:
    body: dict[str, Any] = {"key": key, "operator": operator}
    if values:
        body["values"] = list(values)
    return body


def webhook_selectors(
    revision: str = "default", system_namespaces: Iterable[str] = ()
) -> list[WebhookSelector]:
    """The selectors for one revision (Istio's layout).

    - ``rev.namespace``: namespace ``istio.io/rev=<rev>`` (and no ``istio-injection`` label);
    - ``rev.object``: pod ``istio.io/rev=<rev>`` in a namespace with neither label;
    - default revision only: ``namespace`` (``istio-injection=enabled``) and ``object`` (pod
      ``sidecar.istio.io/inject=true`` in an unlabelled namespace).
    A pod labelled ``sidecar.istio.io/inject=false`` is never sent; system namespaces neither.
    """
    system = sorted(set(system_namespaces))
    not_system = [_expr(NAMESPACE_NAME_LABEL, "NotIn", system)] if system else []
    not_opted_out = _expr(INJECT_LABEL, "NotIn", ["false"])
    out = [
        WebhookSelector(
            f"rev.namespace.{WEBHOOK_SUFFIX}",
            {
                "matchExpressions": [
                    _expr(REVISION_LABEL, "In", [revision]),
                    _expr(NAMESPACE_INJECTION_LABEL, "DoesNotExist"),
                    *not_system,
                ]
            },
            {"matchExpressions": [not_opted_out]},
        ),
        WebhookSelector(
            f"rev.object.{WEBHOOK_SUFFIX}",
            {
                "matchExpressions": [
                    _expr(REVISION_LABEL, "DoesNotExist"),
                    _expr(NAMESPACE_INJECTION_LABEL, "DoesNotExist"),
                    *not_system,
                ]
            },
            {"matchExpressions": [not_opted_out, _expr(REVISION_LABEL, "In", [revision])]},
        ),
    ]
    if revision == "default":
        out += [
            WebhookSelector(
                f"namespace.{WEBHOOK_SUFFIX}",
                {"matchExpressions": [_expr(NAMESPACE_INJECTION_LABEL, "In", ["enabled"]), *not_system]},
                {"matchExpressions": [not_opted_out]},
            ),
            WebhookSelector(
                f"object.{WEBHOOK_SUFFIX}",
                {
                    "matchExpressions": [
                        _expr(NAMESPACE_INJECTION_LABEL, "DoesNotExist"),
                        _expr(REVISION_LABEL, "DoesNotExist"),
                        *not_system,
                    ]
                },
                {
                    "matchExpressions": [
                        _expr(INJECT_LABEL, "In", ["true"]),
                        _expr(REVISION_LABEL, "DoesNotExist"),
                    ]
                },
            ),
        ]
    return out


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes LabelSelector semantics (an empty selector matches everything)."""
    if not selector:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or ():
        key, op = expr["key"], expr["operator"]
        present = key in labels
        if op == "In":
            ok = present and labels[key] in expr.get("values", ())
        elif op == "NotIn":
            ok = not present or labels[key] not in expr.get("values", ())
        elif op == "Exists":
            ok = present
        elif op == "DoesNotExist":
            ok = not present
        else:
            return False
        if not ok:
            return False
    return True


@dataclass(frozen=True)
class Selection:
    selected: bool
    webhook: str | None  # the first webhook whose selectors match
    why: str


def evaluate_selection(
    selectors: Sequence[WebhookSelector],
    *,
    namespace: str,
    namespace_labels: Mapping[str, str],
    pod_labels: Mapping[str, str],
) -> Selection:
    """Would the API server send this pod to us? Adds the namespace-name label as it would."""
    ns_labels = dict(namespace_labels)
    ns_labels.setdefault(NAMESPACE_NAME_LABEL, namespace)
    for webhook in selectors:
        if selector_matches(webhook.namespace_selector, ns_labels) and selector_matches(
            webhook.object_selector, pod_labels
        ):
            return Selection(True, webhook.name, f"selected by webhook {webhook.name}")
    return Selection(False, None, "no webhook selector matches the namespace and pod labels")
