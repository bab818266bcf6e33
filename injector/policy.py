"""Who gets a sidecar: webhook-level selection, then Istio's in-code policy, each with a reason."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cni import annotations as ann
from injector.config import InjectorConfig
from injector.result import Decision, Reason, ReasonCode
from injector.selectors import (
    INJECT_LABEL,
    REVISION_LABEL,
    evaluate_selection,
    selector_matches,
    webhook_selectors,
)


@dataclass
class PolicyOutcome:
    decision: Decision
    reason: Reason
    warnings: list[Reason] = field(default_factory=list)


def _selector_dict(selector: Any) -> dict[str, Any]:
    return {"matchLabels": selector.match_labels, "matchExpressions": selector.match_expressions}


def decide(
    *,
    metadata: Mapping[str, Any],
    spec: Mapping[str, Any],
    namespace: str,
    namespace_labels: Mapping[str, str] | None,
    config: InjectorConfig,
) -> PolicyOutcome:
    """Decide in Istio's order; ``namespace_labels`` None means the API server already selected."""
    labels: Mapping[str, str] = metadata.get("labels") or {}
    annotations: Mapping[str, str] = metadata.get("annotations") or {}

    system_reason = Reason(ReasonCode.SYSTEM_NAMESPACE, f"namespace {namespace} is a system namespace")
    if namespace_labels is not None:
        selection = evaluate_selection(
            _selectors_for(config), namespace=namespace, namespace_labels=namespace_labels, pod_labels=labels
        )
        if not selection.selected:
            if namespace in config.system_namespaces:
                return PolicyOutcome(Decision.SKIP, system_reason)
            return PolicyOutcome(Decision.SKIP, _not_selected_reason(labels, namespace_labels, config))

    if spec.get("hostNetwork"):
        return PolicyOutcome(
            Decision.SKIP,
            Reason(ReasonCode.HOST_NETWORK, "pod uses hostNetwork; a sidecar cannot capture its traffic"),
        )
    if namespace in config.system_namespaces:
        return PolicyOutcome(Decision.SKIP, system_reason)

    warnings: list[Reason] = []
    # The label is the current API; when both are set the label wins (as in Istio).
    source, raw = None, None
    if INJECT_LABEL in labels:
        source, raw = "label", labels[INJECT_LABEL]
    elif ann.INJECT in annotations:
        source, raw = "annotation", annotations[ann.INJECT]
    explicit: bool | None = None
    if raw is not None:
        explicit = ann.bool_or_none(raw, numeric=False)  # Istio's inject takes YAML words, not 1/0
        if explicit is None:
            warnings.append(
                Reason(
                    ReasonCode.INVALID_INJECT_VALUE,
                    f"{source} {ann.INJECT}={raw!r} is not true or false; using the default policy",
                )
            )

    if explicit is True:
        return PolicyOutcome(
            Decision.INJECT, Reason(ReasonCode.POD_OPTED_IN, f"{source} {ann.INJECT}={raw}"), warnings
        )
    if explicit is False:
        return PolicyOutcome(
            Decision.SKIP, Reason(ReasonCode.POD_OPTED_OUT, f"{source} {ann.INJECT}={raw}"), warnings
        )

    for selector in config.model.never_inject_selector:
        if selector_matches(_selector_dict(selector), labels):
            return PolicyOutcome(
                Decision.SKIP,
                Reason(ReasonCode.NEVER_INJECT_SELECTOR, "pod labels match a neverInjectSelector"),
                warnings,
            )
    for selector in config.model.always_inject_selector:
        if selector_matches(_selector_dict(selector), labels):
            return PolicyOutcome(
                Decision.INJECT,
                Reason(ReasonCode.ALWAYS_INJECT_SELECTOR, "pod labels match an alwaysInjectSelector"),
                warnings,
            )
    if config.model.policy == "enabled":
        return PolicyOutcome(
            Decision.INJECT, Reason(ReasonCode.POLICY_ENABLED, "injection policy is enabled"), warnings
        )
    return PolicyOutcome(
        Decision.SKIP,
        Reason(ReasonCode.POLICY_DISABLED, "injection policy is disabled and the pod does not opt in"),
        warnings,
    )


def _selectors_for(config: InjectorConfig) -> list[Any]:
    """The webhook selectors of the config's revision, computed once per config."""
    found: list[Any] = config.memo.get(
        "selectors", None, lambda: webhook_selectors(config.revision, config.system_namespaces)
    )
    return found


def _not_selected_reason(
    labels: Mapping[str, str], ns_labels: Mapping[str, str], config: InjectorConfig
) -> Reason:
    if str(labels.get(INJECT_LABEL, "")).lower() == "false":
        return Reason(ReasonCode.POD_OPTED_OUT, f"label {INJECT_LABEL}=false")
    for where, source in (("pod", labels), ("namespace", ns_labels)):
        rev = source.get(REVISION_LABEL)
        if rev is not None and rev != config.revision:
            return Reason(
                ReasonCode.REVISION_MISMATCH,
                f"{where} label {REVISION_LABEL}={rev} names another revision than {config.revision}",
            )
    return Reason(
        ReasonCode.NAMESPACE_NOT_SELECTED,
        "neither the namespace (istio-injection=enabled or istio.io/rev) nor the pod "
        "(sidecar.istio.io/inject=true or istio.io/rev) asks for injection",
    )
