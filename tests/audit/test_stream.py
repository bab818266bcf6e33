"""The report's byte stream: one chunk per page, valid JSON / JSON lines, an honest end on errors."""

from __future__ import annotations

import json
from typing import Any

from injector.audit import Pages, Report, render_chunks
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
