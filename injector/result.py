"""What the injection core returns: a decision, its reasons, and the patch that realises it.

Every shell (webhook, dry-run endpoint, CLI, metrics, audit) reports these same objects, so a
reason code means the same thing everywhere. Codes are stable API: add, never rename.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from cni import annotations as ann


class Decision(enum.StrEnum):
    INJECT = "inject"  # the object was (or already is) injected; patch may be empty when unchanged
    SKIP = "skip"  # left alone on purpose (policy, opt-out, hostNetwork, ...)
    REJECT = "reject"  # the pod must not be admitted (bad traffic annotation, proxy UID conflict)
    PASSTHROUGH = "passthrough"  # not something we inject into (a Service, a ConfigMap, ...)


#: Stable reason codes: the vocabulary's set (``cni.annotations.ReasonCode``, shared with the
#: plugin and the admission layer) as a StrEnum. The value is what logs, metrics labels and
#: reports show.
ReasonCode = enum.StrEnum("ReasonCode", ann.REASON_CODES)  # type: ignore[misc]


class Rejected(Exception):
    """A step of the injection refuses the pod: becomes a REJECT result with this reason."""

    def __init__(self, code: ReasonCode, message: str) -> None:
        super().__init__(message)
        self.reason = Reason(code, message)


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
    #: ``patch`` as compact JSON (a Pod or workload with a non-empty patch): the core measures it
    #: against ``limits.maxPatchBytes``, and the webhook sends these bytes instead of encoding again.
    patch_json: bytes | None = None

    @property
    def reason(self) -> Reason:
        """The deciding reason (the first one)."""
        return self.reasons[0]

    @property
    def allowed(self) -> bool:
        return self.decision is not Decision.REJECT
