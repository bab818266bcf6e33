"""What the injection core returns: a decision, its reasons, and the patch that realises it.

Every shell (webhook, dry-run endpoint, CLI, metrics, audit) reports these same objects, so a
reason code means the same thing everywhere. Codes are stable API: add, never rename.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Decision(enum.StrEnum):
    INJECT = "inject"  # the object was (or already is) injected; patch may be empty when unchanged
    SKIP = "skip"  # left alone on purpose (policy, opt-out, hostNetwork, ...)
    REJECT = "reject"  # the pod must not be admitted (bad traffic annotation, proxy UID conflict)
    PASSTHROUGH = "passthrough"  # not something we inject into (a Service, a ConfigMap, ...)


class ReasonCode(enum.StrEnum):
    """Stable reason codes. The value is what logs, metrics labels and reports show."""

    # inject
    INJECTED = "Injected"
    ALREADY_INJECTED = "AlreadyInjected"
    ALWAYS_INJECT_SELECTOR = "AlwaysInjectSelector"
    POLICY_ENABLED = "PolicyEnabled"
    POD_OPTED_IN = "PodOptedIn"
    # skip (webhook-level selection: what the API server selectors would have filtered out)
    NAMESPACE_NOT_SELECTED = "NamespaceNotSelected"
    REVISION_MISMATCH = "RevisionMismatch"
    # skip (in-code policy)
    HOST_NETWORK = "HostNetwork"
    SYSTEM_NAMESPACE = "SystemNamespace"
    POD_OPTED_OUT = "PodOptedOut"
    NEVER_INJECT_SELECTOR = "NeverInjectSelector"
    POLICY_DISABLED = "PolicyDisabled"
    # warnings (injection proceeds or skips with the default)
    INVALID_INJECT_VALUE = "InvalidInjectValue"
    UNRESOLVED_PROBE_PORT = "UnresolvedProbePort"  # a probe names a port no container declares
    # reject
    INVALID_TRAFFIC_ANNOTATION = "InvalidTrafficAnnotation"
    PROXY_UID_CONFLICT = "ProxyUIDConflict"
    INVALID_ANNOTATION = "InvalidAnnotation"
    UNKNOWN_TEMPLATE = "UnknownTemplate"
    MALFORMED_OBJECT = "MalformedObject"  # the input is not shaped like a Kubernetes object (CLI/dry-run)
    # passthrough
    UNSUPPORTED_KIND = "UnsupportedKind"


@dataclass(frozen=True)
class Reason:
    code: ReasonCode
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}


@dataclass
class InjectionResult:
    """The core's answer for one object (a Pod, or a workload's pod template).

    ``patch`` is an RFC 6902 JSON Patch against the *input object*; applying it with ``jsonpatch``
    gives exactly ``mutated``. For SKIP/REJECT/PASSTHROUGH the patch is empty and ``mutated`` is
    the input unchanged.

    ``mutated`` and the patch values share unchanged parts with the input and with the compiled
    templates (that is what makes a 2,000-env-var pod cheap): treat them as read-only, and
    deep-copy before editing.
    """

    decision: Decision
    reasons: list[Reason]
    warnings: list[Reason] = field(default_factory=list)
    patch: list[dict[str, Any]] = field(default_factory=list)
    mutated: dict[str, Any] = field(default_factory=dict)
    kind: str = "Pod"
    #: For a List: one result per item, in order (the List's own patch covers them all).
    items: list[InjectionResult] = field(default_factory=list)

    @property
    def reason(self) -> Reason:
        """The deciding reason (the first one)."""
        return self.reasons[0]

    @property
    def allowed(self) -> bool:
        return self.decision is not Decision.REJECT
