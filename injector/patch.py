"""RFC 6902 JSON Patch between an object and its mutated form, in linear time.

The core builds the mutated object by copying only what it changes and sharing everything else,
so ``a is b`` settles most subtrees at once. Lists are aligned by their common prefix and
suffix (an inserted sidecar is one ``add``), never by an O(n^2) edit distance: a pod with
thousands of env vars costs what walking it costs.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

Patch = list[dict[str, Any]]


def _escape(key: str) -> str:
    if "~" in key or "/" in key:
        return key.replace("~", "~0").replace("/", "~1")
    return key


def _same(a: Any, b: Any) -> bool:
    # type check first: True == 1 in Python but not in JSON
    return a is b or (type(a) is type(b) and a == b)


def _diff(a: Any, b: Any, path: str, ops: Patch, whole_at: str | None = None) -> None:
    if a is b:
        return
    if type(a) is not type(b):
        ops.append({"op": "replace", "path": path, "value": b})
        return
    if type(a) is dict:
        whole = path == whole_at  # a pod spec: replace its changed fields whole (create_patch)
        for key in a:
            if key not in b:
                ops.append({"op": "remove", "path": f"{path}/{_escape(key)}"})
        for key, value in b.items():
            if key in a:
                old = a[key]
                if old is value:  # shared subtrees (most of them) cost one identity check
                    continue
                where = f"{path}/{_escape(key)}"
                if whole and type(old) in (dict, list) and not _same(old, value) and \
                        _size(old) <= WHOLE_FIELD_LIMIT:
                    ops.append({"op": "replace", "path": where, "value": value})
                else:  # scalars, and large fields (thousands of env vars): only what changed
                    _diff(old, value, where, ops, whole_at)
            else:
                ops.append({"op": "add", "path": f"{path}/{_escape(key)}", "value": value})
        return
    if type(a) is list:
        _diff_list(a, b, path, ops)
        return
    if a != b:
        ops.append({"op": "replace", "path": path, "value": b})


def _diff_list(a: list[Any], b: list[Any], path: str, ops: Patch) -> None:
    la, lb = len(a), len(b)
    if la == lb:
        for i in range(la):
            if a[i] is not b[i]:
                _diff(a[i], b[i], f"{path}/{i}", ops)
        return
    prefix = 0
    limit = min(la, lb)
    while prefix < limit and _same(a[prefix], b[prefix]):
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and _same(a[la - 1 - suffix], b[lb - 1 - suffix]):
        suffix += 1
    ma, mb = la - prefix - suffix, lb - prefix - suffix
    for i in range(min(ma, mb)):
        _diff(a[prefix + i], b[prefix + i], f"{path}/{prefix + i}", ops)
    if mb > ma:
        for i in range(ma, mb):
            ops.append({"op": "add", "path": f"{path}/{prefix + i}", "value": b[prefix + i]})
    else:
        for _ in range(ma - mb):
            ops.append({"op": "remove", "path": f"{path}/{prefix + mb}"})


#: A changed field of the pod spec whose old value serializes to at most this many bytes is
#: replaced whole instead of diffed (see ``create_patch``).
WHOLE_FIELD_LIMIT = 8192


def _size(value: Any) -> int:
    try:
        return len(orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS))
    except TypeError:  # something JSON cannot hold (from YAML): diff it rather than guess
        return WHOLE_FIELD_LIMIT + 1


def patch_json(patch: Patch) -> bytes:
    """The patch as compact JSON bytes (what the AdmissionResponse carries, base64-encoded)."""
    try:
        return orjson.dumps(patch)
    except TypeError:  # values orjson refuses (64-bit overflow) in hand-written input
        return json.dumps(patch, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def create_patch(original: Any, mutated: Any, *, whole_fields_at: str | None = None) -> Patch:
    """Operations that turn ``original`` into ``mutated`` (values are shared, not copied).

    ``whole_fields_at`` (a pod spec's path): each changed field there (containers, volumes...) is
    one ``replace`` of the whole field unless its old value is large. The API server applies
    such a patch measurably faster (bench/bench_apiserver.py) than one reaching into list items,
    and it stays small; a pod with a huge field still gets only the ops that change it.
    """
    ops: Patch = []
    _diff(original, mutated, "", ops, whole_fields_at)
    return ops
