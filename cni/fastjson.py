"""JSON for the CNI hot path on top of the C accelerator ``_json``.

``import json`` pulls in ``re`` and friends (~6 ms per plugin run); the C scanner and encoder it
wraps are built in and import in microseconds. Same parsing rules as ``json.loads`` (strict,
no NaN/Infinity accepted in input).
"""

from __future__ import annotations

import _json

_WS = " \t\n\r"


class _ScanContext:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: dict[str, str] = {}

    @staticmethod
    def parse_constant(name: str) -> float:
        raise ValueError(f"{name} is not valid JSON")


_scan = _json.make_scanner(_ScanContext())

def loads(data: bytes | str) -> object:
    """Parse one JSON document; raise ValueError with a position when it is not valid JSON."""
    try:
        text = data.decode() if isinstance(data, bytes) else data
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8: {error}") from None
    start = len(text) - len(text.lstrip(_WS))
    try:
        value, end = _scan(text, start)
        if not text[end:].strip(_WS):
            return value
    except RecursionError:
        raise ValueError("JSON nested too deeply (deeper than the interpreter's recursion limit)") from None
    except (StopIteration, ValueError, SystemError):
        pass
    # Invalid input is rare: let the full json module find and describe the error.
    import json

    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _default(obj: object) -> object:
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


_encode = _json.make_encoder(None, _default, _json.encode_basestring_ascii, None, ": ", ", ",
                             False, False, False)


def dumps(value: object) -> str:
    return "".join(_encode(value, 0))
