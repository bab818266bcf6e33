"""The report's byte stream: one chunk per page, valid JSON / JSON lines, an honest end on errors."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from injector.audit import Pages, Report, kube_get, render_chunks
from injector.configwatch import builtin_config


class Broken(Exception):
    status = 500
    reason = "Internal Server Error"


class PagedReader:
    """Stands in for ClusterReader's I/O: pages of bare pods, optionally failing at one page."""

    namespace = "shop"

    def __init__(self, sizes: list[int], fail_at: int | None = None) -> None:
        self.sizes, self.fail_at = sizes, fail_at

    def pages(self) -> Pages:
        def fetch(limit: int, token: str | None) -> dict[str, Any]:
            index = int(token or 0)
            if index == self.fail_at:
                raise Broken()
            items = [{"metadata": {"namespace": "shop", "name": f"p{index}-{i}"}, "spec": {"containers": []}}
                     for i in range(self.sizes[index])]
            meta = {"continue": str(index + 1)} if index + 1 < len(self.sizes) else {}
            return {"metadata": meta, "items": items}

        return Pages(fetch, page_size=500)

    def namespace_labels(self, pods: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
        return {"shop": {"istio-injection": "enabled"}}

    def owner_lookup(self, pods: list[dict[str, Any]]) -> Any:
        return lambda *_: None

    def close(self) -> None:
        pass


def report(reader: PagedReader) -> Report:
    return Report(reader, builtin_config())  # type: ignore[arg-type]


def test_json_is_one_document_written_one_chunk_per_page() -> None:
    chunks = list(render_chunks(report(PagedReader([3, 0, 2])), "json"))
    assert len(chunks) == 3  # two pages with pods, then the summary
    document = json.loads(b"".join(chunks))
    assert [p["pod"] for p in document["pods"]] == ["p0-0", "p0-1", "p0-2", "p2-0", "p2-1"]
    assert document["summary"]["complete"] and document["summary"]["pages"] == 3
    assert document["summary"]["missingSidecar"] == 5


def test_json_lines_end_with_the_summary_line() -> None:
    lines = b"".join(render_chunks(report(PagedReader([2, 2])), "jsonl")).splitlines()
    assert [json.loads(line)["pod"] for line in lines[:-1]] == ["p0-0", "p0-1", "p1-0", "p1-1"]
    last = json.loads(lines[-1])
    assert last["summary"]["pods"] == 4 and last["namespace"] == "shop"


def test_an_empty_cluster_is_still_a_valid_report() -> None:
    document = json.loads(b"".join(render_chunks(report(PagedReader([0])), "json")))
    assert document["pods"] == [] and document["summary"]["complete"]


def test_a_failure_mid_way_ends_the_report_incomplete_with_the_error() -> None:
    document = json.loads(b"".join(render_chunks(report(PagedReader([2, 2, 2], fail_at=1)), "json")))
    assert len(document["pods"]) == 2
    summary = document["summary"]
    assert summary["complete"] is False and "500 Internal Server Error" in summary["error"]


class CountingReader(PagedReader):
    """PagedReader that counts the pages the API was asked for."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__(sizes)
        self.fetched = 0

    def pages(self) -> Pages:
        inner = super().pages()
        fetch = inner.fetch

        def counted(limit: int, token: str | None) -> dict[str, Any]:
            self.fetched += 1
            return fetch(limit, token)

        inner.fetch = counted
        return inner


def test_a_reader_that_stops_early_leaves_at_most_one_page_read_ahead() -> None:
    """Reading ahead overlaps the API server's time with ours but holds two pages at most."""
    reader = CountingReader([2] * 10)
    pages = report(reader).pages()
    assert len(next(pages)) == 2
    pages.close()
    assert reader.fetched <= 2


def test_no_page_is_read_past_the_deadline() -> None:
    reader = CountingReader([2] * 3)
    audit = Report(reader, builtin_config(), deadline=time.monotonic() - 1)  # type: ignore[arg-type]
    assert list(audit.pages()) == []
    assert reader.fetched == 0
    assert audit.summary.timed_out and not audit.summary.complete


class Response:
    def __init__(self, body: bytes, status: int = 200) -> None:
        self.body, self.status, self.reason = body, status, "OK"

    def read(self) -> bytes:
        return self.body


class FakeApi:
    """The slice of kubernetes.client.ApiClient that kube_get uses."""

    def __init__(self, body: bytes) -> None:
        self.configuration = SimpleNamespace(host="https://api", auth_settings=dict)
        self.rest_client = SimpleNamespace(request=lambda *a, **k: Response(body))


def test_decoding_a_page_leaves_garbage_collection_as_it_was() -> None:
    """Collection is paused while a page is decoded; a long-running server must get it back,
    also when the body is not JSON."""
    assert gc.isenabled()
    assert kube_get(FakeApi(b'{"items": [{"a": [1, 2]}]}'), "/api/v1/pods") == {"items": [{"a": [1, 2]}]}
    assert gc.isenabled()
    with pytest.raises(ValueError):
        kube_get(FakeApi(b"<html>proxy error</html>"), "/api/v1/pods")
    assert gc.isenabled()
    gc.disable()
    try:
        kube_get(FakeApi(b"{}"), "/api/v1/pods")
        assert not gc.isenabled()  # not switched on behind the back of whoever switched it off
    finally:
        gc.enable()


HEAP_PROBE = """
import ctypes, sys
from injector.audit import keep_pages_off_heap, render_chunks
from tests.audit.test_stream import PagedReader, report

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Info
keep_pages_off_heap()  # what the server's /audit does first
list(render_chunks(report(PagedReader([3, 2])), "jsonl"))
big = bytearray(8 << 20)  # a page-sized body, freed: glibc's own rule raises its threshold to 8 MiB
del big
before = mallinfo2().hblkhd
block = bytearray(1 << 20)
print("mapped" if mallinfo2().hblkhd - before >= 1 << 20 else "heap")
"""


@pytest.mark.parametrize(("switch", "expected"), [(None, "mapped"), ("dynamic", "heap")])
def test_after_an_audit_large_blocks_stay_out_of_the_heaps(switch: str | None, expected: str) -> None:
    """In the server, page bodies freed must not turn the next ones into heap that stays with the
    process (its RSS grew with every page and audit); ``dynamic`` is the bench's switch back to
    glibc's rule."""
    if not os.confstr("CS_GNU_LIBC_VERSION") and not os.environ.get("CI"):
        pytest.skip("glibc's malloc only (mallinfo2, mallopt)")
    env = {k: v for k, v in os.environ.items() if k != "MESH_AUDIT_MMAP_THRESHOLD"}
    env.update({"MESH_AUDIT_MMAP_THRESHOLD": switch} if switch else {})
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE], cwd=Path(__file__).resolve().parents[2],
                         env=env, capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == [expected]


def test_a_page_too_large_for_orjson_decodes_to_the_same_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the bound the stdlib decodes (orjson would set aside 12x the body): same pods either way,
    including non-ASCII label values and escapes, and collection restored after."""
    import injector.audit as audit_mod

    fields = [{"manager": "kubectl", "fieldsV1": {"f:metadata": {"f:labels": {}}}}]
    labels = {"app": "caf\u00e9 \"x\"\n"}
    page = {"metadata": {"continue": "abc"}, "items": [
        {"metadata": {"name": f"p-{i}", "namespace": "shop", "labels": {**labels, "n": str(i)},
                      "managedFields": fields}} for i in range(50)]}
    body = json.dumps(page).encode()
    small = kube_get(FakeApi(body), "/api/v1/pods")
    monkeypatch.setattr(audit_mod, "ORJSON_MAX_BODY", len(body) - 1)
    large = kube_get(FakeApi(body), "/api/v1/pods")
    assert large == small == page
    assert gc.isenabled()
