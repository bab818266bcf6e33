"""AdmissionReview in, AdmissionReview out: the webhook's protocol, with no HTTP in it.

``review(body, ...)`` turns request bytes into response bytes and an ``Outcome`` that the shell
logs, counts and turns into Events. Only the envelope is checked here (``orjson``, already the
core's dependency, is ~8x faster than stdlib ``json`` at encoding the patch; no model validation
of the whole pod on the hot path): the pod itself is the core's business. Whatever the core
raises becomes ``allowed: false`` naming the problem, never an HTTP 500.
"""

from __future__ import annotations

import binascii
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NotRequired, TypedDict

import orjson

from injector.result import Decision, InjectionResult, Reason, ReasonCode

log = logging.getLogger("injector.admission")

API_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")
# Admission-level reason codes, from the shared vocabulary (cni/annotations.py ReasonCode).
#: The core failed on a pod (a bug or a pod shape it cannot handle).
INTERNAL_ERROR = ReasonCode.INTERNAL_ERROR.value
NOT_POD = ReasonCode.NOT_POD.value
NOT_CREATE = ReasonCode.NOT_CREATE.value
SUBRESOURCE = ReasonCode.SUBRESOURCE.value
#: The review was not decided within the request deadline (``serve --request-deadline``).
TIMEOUT = ReasonCode.TIMEOUT.value
MALFORMED_OBJECT = ReasonCode.MALFORMED_OBJECT.value


class GroupVersionKind(TypedDict):
    group: str
    version: str
    kind: str


class AdmissionRequest(TypedDict, total=False):
    uid: str
    kind: GroupVersionKind
    resource: dict[str, str]
    subResource: str
    name: str
    namespace: str
    operation: Literal["CREATE", "UPDATE", "DELETE", "CONNECT"]
    userInfo: dict[str, Any]
    object: dict[str, Any]
    oldObject: dict[str, Any] | None
    dryRun: bool
    options: dict[str, Any] | None


class AdmissionStatus(TypedDict, total=False):
    code: int
    reason: str
    message: str


class AdmissionResponse(TypedDict):
    uid: str
    allowed: bool
    patchType: NotRequired[Literal["JSONPatch"]]
    patch: NotRequired[str]  # base64 of the JSON Patch
    status: NotRequired[AdmissionStatus]
    warnings: NotRequired[list[str]]


class AdmissionReview(TypedDict):
    apiVersion: str
    kind: Literal["AdmissionReview"]
    request: NotRequired[AdmissionRequest]
    response: NotRequired[AdmissionResponse]


class BadReview(Exception):
    """The body is not an AdmissionReview we can answer: HTTP 400 with this message."""


@dataclass
class Outcome:
    """What happened to one review, for logs, metrics and Events."""

    uid: str = ""
    namespace: str = ""
    name: str = ""  # the pod's name, or its generateName when it has no name yet
    operation: str = ""
    dry_run: bool = False
    decision: str = Decision.PASSTHROUGH.value
    reason: str = ""
    message: str = ""
    warnings: list[Reason] = field(default_factory=list)
    patched: bool = False
    pod: Mapping[str, Any] | None = None  # for Events: owner references of a rejected/warned pod
    memo: str = ""  # "hit": answered from the AnswerMemo; "miss": by the core, then remembered


InjectFn = Callable[..., InjectionResult]


def parse_review(body: bytes) -> tuple[str, AdmissionRequest]:
    """Decode and check the envelope; return (apiVersion, request). Raises BadReview."""
    if not body:
        raise BadReview("empty request body: expected an AdmissionReview")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:  # also invalid UTF-8, NaN, > 64-bit integers, too deep
        raise BadReview(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadReview("request body must be a JSON object (an AdmissionReview)")
    api_version = doc.get("apiVersion")
    if doc.get("kind") != "AdmissionReview" or api_version not in API_VERSIONS:
        raise BadReview(
            f"expected kind AdmissionReview with apiVersion {' or '.join(API_VERSIONS)}, "
            f"got kind {doc.get('kind')!r} apiVersion {api_version!r}"
        )
    request = doc.get("request")
    if not isinstance(request, dict):
        raise BadReview("AdmissionReview has no request object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("AdmissionReview request has no uid")
    return api_version, request  # type: ignore[return-value]


def dumps(value: Any) -> bytes:
    """Compact JSON bytes; stdlib fallback for what orjson refuses (e.g. non-string keys)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def encode_response(api_version: str, response: AdmissionResponse) -> bytes:
    review: AdmissionReview = {"apiVersion": api_version, "kind": "AdmissionReview", "response": response}
    return dumps(review)


def _pod_name(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata")
    if not isinstance(meta, dict):
        return ""
    name = meta.get("name") or meta.get("generateName") or ""
    return name if isinstance(name, str) else ""


def _is_pod(request: Mapping[str, Any]) -> bool:
    kind = request.get("kind")
    if isinstance(kind, dict):
        return kind.get("kind") == "Pod" and kind.get("group", "") == "" and kind.get("version", "v1") == "v1"
    resource = request.get("resource")
    return isinstance(resource, dict) and resource.get("resource") == "pods" and not resource.get("group")


@dataclass(slots=True)
class _Answer:
    """One answer as the core gave it, kept whole (the very bytes sent: nothing is copied to
    keep it) so that a replica's answer is spliced from it: its own uid in place of the first
    one's, and of the patch's base64 only the 4-character groups over the token volume's name
    encoded again for the replica's name."""

    encoded: memoryview  # the encoded AdmissionReview
    uid_at: tuple[int, int]  # where the response's quoted uid is in it
    b64_at: tuple[int, int]  # where the patch's base64 is in it ((0, 0): no patch)
    name: bytes  # the first pod's token volume name (b"" when it had none)
    groups: tuple[tuple[int, int, bytes, bytes], ...]  # per name in the patch: where its base64
    # groups are in ``encoded``, and the patch's bytes of those groups before and after the name
    decision: str
    reason: str
    message: str
    warnings: tuple[Reason, ...]
    patched: bool
    size: int  # bytes held, for the memo's budget

    def encoded_for(self, quoted_uid: bytes, name: bytes) -> bytes:
        """The answer as if for a pod with this uid and token volume name."""
        encoded, (uid_start, uid_end) = self.encoded, self.uid_at
        pieces: list[bytes | memoryview] = [encoded[:uid_start], quoted_uid]
        done = uid_end
        if self.groups and name != self.name:
            if len(name) != len(self.name):  # another length shifts every later group: all again
                start_b64, end_b64 = self.b64_at
                patch = binascii.a2b_base64(encoded[start_b64:end_b64])
                renamed = patch.replace(b'"' + self.name + b'"', b'"' + name + b'"')
                pieces += (encoded[done:start_b64], binascii.b2a_base64(renamed, newline=False))
                done = end_b64
            else:
                for first, last, before, after in self.groups:
                    pieces += (encoded[done:first], binascii.b2a_base64(before + name + after, newline=False))
                    done = last
        pieces.append(encoded[done:])
        return b"".join(pieces)


#: The volume the ServiceAccount admission plugin adds to every pod (before any webhook), named
#: with a random suffix per pod: the one place a workload's replicas differ at admission.
TOKEN_VOLUME_PREFIX = "kube-api-access-"
#: What the memo writes for that name ('@' is never in a volume name, a DNS-1123 label).
TOKEN_PLACEHOLDER = b'"kube-api-access-@memo@"'


@dataclass(frozen=True)
class MemoKey:
    exact: bytes  # namespace, apiVersion and the pod's JSON, its token volume as the placeholder
    token_volume: bytes  # the pod's quoted token volume name (b"" when it has none)


def _token_volume(pod: Mapping[str, Any]) -> bytes | None:
    """The pod's one projected ``kube-api-access-*`` volume name, quoted as in JSON; b"" when it
    has none; None when it has several (not memoised)."""
    spec = pod.get("spec")
    volumes = spec.get("volumes") if isinstance(spec, dict) else None
    names = [v["name"] for v in volumes or () if isinstance(v, dict) and isinstance(v.get("name"), str)
             and v["name"].startswith(TOKEN_VOLUME_PREFIX) and "projected" in v] \
        if isinstance(volumes, list) else []
    if len(names) > 1:
        return None
    return b'"' + names[0].encode() + b'"' if names else b""


def _only_whole(data: bytes, quoted: bytes) -> bool:
    """True when the name in ``quoted`` occurs in ``data`` only as that whole JSON string (so
    renaming it there is exact)."""
    return data.count(quoted[1:-1]) == data.count(quoted)


def _renamed(data: bytes, quoted: bytes, to: bytes) -> bytes | None:
    """``data`` with every JSON string ``quoted`` replaced by ``to``; None when the name also
    occurs inside other text (then renaming would not be exact)."""
    if not quoted:
        return data
    return data.replace(quoted, to) if _only_whole(data, quoted) else None


class AnswerMemo:
    """Recent answers of the core, by (config, namespace, the pod's bytes but for two fields).

    A controller creates all replicas of a workload from one pod template. At admission they
    differ in two places only, as seen on kube-apiserver 1.37: the name of the projected token
    volume the ServiceAccount plugin adds (``kube-api-access-<random>``, in the volume and each
    container's mount) and ``managedFields`` (a timestamp); the API server gives a pod its name
    and uid only after admission. The core never reads ``managedFields`` and treats the volume's
    name as an opaque name, so the key leaves out the one and writes a placeholder for the other,
    and a hit gets the remembered answer with its own volume name put back. The core is a pure
    function of the pod, its namespace and the config, so that is the answer the core would
    give. Whatever else differs makes a miss. An answer is kept at the pod's second miss: the
    first two replicas go through the core, the rest are hits, and a pod that comes once costs
    only its key. Keys are the exact bytes, not digests: a dict
    compares them on a hit, so no two pods can share a key. A name that also occurs in other
    text is not memoised; the memo is emptied when the config object changes (reload, cluster
    version) and bounded in entries and bytes, keys included; pods larger than
    ``max_pod_bytes`` are not memoised. Not thread-safe: one memo per event loop.
    """

    def __init__(self, max_entries: int = 512, max_bytes: int = 4 << 20,
                 max_pod_bytes: int = 64 << 10) -> None:
        self.max_entries, self.max_bytes, self.max_pod_bytes = max_entries, max_bytes, max_pod_bytes
        self._answers: OrderedDict[bytes, _Answer] = OrderedDict()
        # Pods missed once, by the hash of their key: an answer is kept at a pod's second miss,
        # so pods that come once (no replicas) do not fill the memo. Holding their answers cost
        # a miss ~40 us on 2 cores (12 KiB each kept, so each new one in memory out of cache).
        self._seen: OrderedDict[int, None] = OrderedDict()
        self._bytes = 0
        self._config: Any = None
        self.hits = self.misses = 0

    def key(self, config: Any, namespace: str, api_version: str, pod: Mapping[str, Any]) -> MemoKey | None:
        """The pod's key under ``config``; None when it is not to be memoised."""
        if config is not self._config:
            self._answers.clear()
            self._seen.clear()
            self._bytes, self._config = 0, config
        meta = pod.get("metadata")
        if isinstance(meta, dict) and "managedFields" in meta:
            pod = {**pod, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
        token = _token_volume(pod)
        try:
            encoded = orjson.dumps(pod)
        except TypeError:  # not JSON as the API server sends it: do not memoise
            return None
        if token is None or len(encoded) > self.max_pod_bytes or TOKEN_PLACEHOLDER[1:-1] in encoded:
            return None
        normal = _renamed(encoded, token, TOKEN_PLACEHOLDER)
        if normal is None:
            return None
        return MemoKey(orjson.dumps([namespace, api_version]) + normal, token)  # a JSON array ends itself

    def get(self, key: MemoKey) -> _Answer | None:
        answer = self._answers.get(key.exact)
        if answer is None:
            self.misses += 1
            return None
        self._answers.move_to_end(key.exact)
        self.hits += 1
        return answer

    def admit(self, key: MemoKey) -> bool:
        """True at a pod's second miss (its answer is worth keeping); remembers the first."""
        seen = hash(key.exact)  # already computed by the lookup; a collision only admits early
        if seen in self._seen:
            del self._seen[seen]
            return True
        self._seen[seen] = None
        if len(self._seen) > 4 * self.max_entries:
            self._seen.popitem(last=False)
        return False

    def put(self, key: MemoKey, answer: _Answer) -> None:
        size = answer.size + len(key.exact)
        if size > self.max_bytes // 4:
            return
        old = self._answers.pop(key.exact, None)
        if old is not None:
            self._bytes -= old.size + len(key.exact)
        self._answers[key.exact] = answer
        self._bytes += size
        while len(self._answers) > self.max_entries or self._bytes > self.max_bytes:
            exact, evicted = self._answers.popitem(last=False)
            self._bytes -= evicted.size + len(exact)

    def __len__(self) -> int:
        return len(self._answers)


def review(body: bytes, *, config: Any, inject: InjectFn | None = None,
           memo: AnswerMemo | None = None) -> tuple[bytes, Outcome]:
    """Answer one AdmissionReview body. Raises BadReview only for an unusable envelope."""
    api_version, request = parse_review(body)
    return review_request(api_version, request, config=config, inject=inject, memo=memo)


def _outcome(request: Mapping[str, Any]) -> Outcome:
    out = Outcome(uid=request["uid"], operation=str(request.get("operation") or ""),
                  dry_run=bool(request.get("dryRun")))
    namespace = request.get("namespace")
    out.namespace = namespace if isinstance(namespace, str) else ""
    pod = request.get("object")
    if isinstance(pod, dict):
        out.name = _pod_name(pod) or str(request.get("name") or "")
    return out


_STATUS_REASONS = {400: "BadRequest", 500: "InternalError", 504: "Timeout"}


def refuse(api_version: str, request: Mapping[str, Any], reason: str, message: str,
           code: int) -> tuple[bytes, Outcome]:
    """``allowed: false`` for this request, with the reason code and message in its status."""
    out = _outcome(request)
    out.decision, out.reason, out.message = Decision.REJECT.value, reason, message
    status_reason = _STATUS_REASONS.get(code, "BadRequest")  # metav1.StatusReason, as kubectl shows it
    response: AdmissionResponse = {
        "uid": out.uid, "allowed": False,
        "status": {"code": code, "reason": status_reason, "message": message},
    }
    return encode_response(api_version, response), out


def timed_out(api_version: str, request: Mapping[str, Any], deadline: float) -> tuple[bytes, Outcome]:
    """The answer when the deadline passed first: the pod is refused, saying why, in time."""
    message = (f"Timeout: mesh-injector did not decide within its {deadline:g} s request deadline "
               "(serve --request-deadline); the pod was not admitted, retry the request")
    return refuse(api_version, request, TIMEOUT, message, 504)


def review_request(
    api_version: str, request: AdmissionRequest, *, config: Any, inject: InjectFn | None = None,
    memo: AnswerMemo | None = None,
) -> tuple[bytes, Outcome]:
    """Answer one decoded request (``parse_review``'s result); with ``memo``, a pod answered
    before under the same config and namespace is answered again without the core."""
    core = _core_inject()
    if inject is None:
        inject = core
    elif inject is not core:
        memo = None  # a stand-in core (tests): its answers are not the core's to remember
    uid = request["uid"]
    out = _outcome(request)
    pod = request.get("object")

    def allow(reason: str) -> tuple[bytes, Outcome]:
        out.reason = reason
        return encode_response(api_version, {"uid": uid, "allowed": True}), out

    if not _is_pod(request):
        return allow(NOT_POD)
    if request.get("subResource"):
        return allow(SUBRESOURCE)
    if out.operation != "CREATE":
        return allow(NOT_CREATE)
    if not isinstance(pod, dict):
        return refuse(api_version, request, MALFORMED_OBJECT,
                      f"{MALFORMED_OBJECT}: the AdmissionReview request for a pod CREATE carries no pod "
                      "object", 400)

    key = memo.key(config, out.namespace, api_version, pod) if memo is not None else None
    if memo is not None and key is not None:
        known = memo.get(key)
        if known is not None:
            out.memo = "hit"
            return _answer_again(uid, pod, out, known, key)
        out.memo = "miss"

    try:
        result = inject(pod, config=config, namespace=out.namespace or None)
    except Exception as exc:  # the core must not take the webhook down: refuse this one pod
        log.exception("injection failed", extra={"uid": uid, "namespace": out.namespace, "pod": out.name})
        return refuse(api_version, request, INTERNAL_ERROR,
                      f"{INTERNAL_ERROR}: mesh-injector could not process this pod: {type(exc).__name__}: "
                      f"{exc}", 500)

    reason = result.reasons[0] if result.reasons else Reason(ReasonCode.INJECTED, "")
    out.decision, out.reason, out.message = result.decision.value, reason.code.value, reason.message
    out.warnings = list(result.warnings)
    response: AdmissionResponse = {"uid": uid, "allowed": result.allowed}
    if result.decision is Decision.REJECT:
        message = f"{reason.code.value}: {reason.message}"
        response["status"] = {"code": 400, "reason": "BadRequest", "message": message}
        out.pod = pod
    patch: bytes | None = None
    b64 = b""
    if result.decision is not Decision.REJECT and result.patch:
        response["patchType"] = "JSONPatch"
        # The core's own encoding when it made one (it measured it against its patch limit).
        patch = result.patch_json or dumps(result.patch)
        b64 = binascii.b2a_base64(patch, newline=False)
        response["patch"] = _PATCH_MARK  # the base64 goes in after encoding (it needs no escaping)
        out.patched = True
    if result.warnings:
        response["warnings"] = [f"{w.code.value}: {w.message}" for w in result.warnings]
        out.pod = pod
    encoded, b64_at = _encode_with_patch(api_version, response, b64)
    if memo is not None and key is not None and memo.admit(key):
        _remember(memo, key, encoded, uid, patch, b64, b64_at, out)
    return encoded, out


#: Stands for the patch's base64 while the response is encoded ('@' is not in base64).
_PATCH_MARK = "@mesh-injector-patch@"
_QUOTED_PATCH_MARK = b'"' + _PATCH_MARK.encode() + b'"'


def _encode_with_patch(api_version: str, response: AdmissionResponse, b64: bytes) -> tuple[bytes, int]:
    """The encoded AdmissionReview with ``b64`` as the patch, and where the base64 starts."""
    encoded = encode_response(api_version, response)
    if not b64:
        return encoded, -1
    at = encoded.find(_QUOTED_PATCH_MARK)
    if at < 0 or encoded.find(_QUOTED_PATCH_MARK, at + 1) >= 0:  # the mark in other text too
        response["patch"] = b64.decode()
        encoded = encode_response(api_version, response)
        return encoded, encoded.find(b'"patch":"' + b64 + b'"') + len(b'"patch":"')
    return encoded[:at + 1] + b64 + encoded[at + len(_QUOTED_PATCH_MARK) - 1:], at + 1


def _remember(memo: AnswerMemo, key: MemoKey, encoded: bytes, uid: str, patch: bytes | None, b64: bytes,
              b64_start: int, out: Outcome) -> None:
    """Keep this answer for the pod's replicas, with the places of its uid and of the token
    volume's name in its patch; not kept when the name occurs anywhere else in it."""
    name = key.token_volume[1:-1]
    text = name.decode()
    if text and any(text in other for other in (out.message, *(w.message for w in out.warnings))):
        return
    quoted_uid = orjson.dumps(uid)
    marker = b'"response":{"uid":' + quoted_uid
    at = encoded.find(marker, 0, 128 + len(marker))  # after apiVersion and kind, in our own order
    if at < 0:
        return
    uid_at = (at + len(marker) - len(quoted_uid), at + len(marker))
    b64_at = (b64_start, b64_start + len(b64)) if b64 else (0, 0)
    groups: list[tuple[int, int, bytes, bytes]] = []
    if name and patch is not None:
        if not _only_whole(patch, key.token_volume):
            return
        size, end = len(name), len(patch)
        for at in (i + 1 for i in _occurrences(patch, key.token_volume)):
            start, stop = at - at % 3, min(end, -(-(at + size) // 3) * 3)  # its 3-byte groups
            first, last = b64_start + start // 3 * 4, min(b64_at[1], b64_start + -(-stop // 3) * 4)
            if groups and first < groups[-1][1]:
                return  # two names in one group: not spliced (JSON strings keep them further apart)
            groups.append((first, last, patch[start:at], patch[at + size:stop]))
    if name and (encoded.find(name, 0, b64_at[0] or len(encoded)) >= 0
                 or (b64 and encoded.find(name, b64_at[1]) >= 0)):
        return
    memo.put(key, _Answer(memoryview(encoded), uid_at, b64_at, name, tuple(groups), out.decision,
                          out.reason, out.message, tuple(out.warnings), out.patched,
                          len(encoded) + len(out.message) + 256))


def _occurrences(data: bytes, part: bytes) -> list[int]:
    found, at = [], data.find(part)
    while at >= 0:
        found.append(at)
        at = data.find(part, at + len(part))
    return found


def _answer_again(uid: str, pod: Mapping[str, Any], out: Outcome, known: _Answer,
                  key: MemoKey) -> tuple[bytes, Outcome]:
    """A memoised answer under this request's uid and with this pod's token volume name, with
    its own Outcome (logs, metrics, Events)."""
    out.decision, out.reason, out.message = known.decision, known.reason, known.message
    out.warnings, out.patched = list(known.warnings), known.patched
    if known.warnings or known.decision == Decision.REJECT.value:
        out.pod = pod
    return known.encoded_for(orjson.dumps(uid), key.token_volume[1:-1]), out


def _core_inject() -> InjectFn:
    from injector.core import inject as core_inject

    return core_inject


def error_body(message: str, code: int = 400) -> bytes:
    """The JSON body of a 4xx answer (a metav1.Status, which kubectl and curl users can read)."""
    status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code}
    return dumps(status)
