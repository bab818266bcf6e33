"""Who is calling: a bearer token checked by the API server (TokenReview), then what they may do
(SubjectAccessReview). Used by ``/audit`` (list pods) and ``/dry-run`` (create pods: what a
dry-run shows is what that user would see from ``kubectl create --dry-run=server``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

#: Longest bearer token sent on to a TokenReview. Service-account and OIDC tokens are 1-2 KiB;
#: the HTTP header limit already stops anything near a megabyte, this keeps the API call small.
MAX_TOKEN_BYTES = 8 * 1024


class Denied(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def bearer_token(headers: Mapping[str, str]) -> str:
    """The token of ``Authorization: Bearer``; Denied(401) when absent or over MAX_TOKEN_BYTES."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Denied(401, "send a bearer token (Authorization: Bearer <token>)")
    if len(token) > MAX_TOKEN_BYTES:
        raise Denied(401, f"the bearer token is longer than {MAX_TOKEN_BYTES} bytes (refused unsent)")
    return token


def _raw(call: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    response = call(*args, _preload_content=False, **kwargs)
    return json.loads(response.data)


def authorize(api: Any, token: str, *, verb: str, resource: str, namespace: str | None) -> str:
    """TokenReview then SubjectAccessReview (``verb resource`` in ``namespace``, or cluster-wide).

    Returns the caller's username; raises Denied(401|403).
    """
    from kubernetes import client

    review = _raw(
        client.AuthenticationV1Api(api).create_token_review,
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}},
    )
    status = review.get("status") or {}
    if not status.get("authenticated"):
        detail = f": {status['error']}" if status.get("error") else ""
        raise Denied(401, f"the bearer token is not valid{detail}")
    user = status.get("user") or {}
    username = str(user.get("username") or "")
    sar_spec: dict[str, Any] = {
        "user": username,
        "groups": user.get("groups") or [],
        "resourceAttributes": {"verb": verb, "resource": resource, "group": "", "namespace": namespace or ""},
    }
    if user.get("uid"):
        sar_spec["uid"] = user["uid"]
    if user.get("extra"):
        sar_spec["extra"] = user["extra"]
    sar = _raw(
        client.AuthorizationV1Api(api).create_subject_access_review,
        {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": sar_spec},
    )
    if not (sar.get("status") or {}).get("allowed"):
        scope = f"in namespace {namespace!r}" if namespace else "in all namespaces"
        raise Denied(403, f"user {username!r} may not {verb} {resource} {scope}")
    return username
