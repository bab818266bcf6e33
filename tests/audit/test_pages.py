"""The paging rules over the API's page shapes (the real API server is exercised in test_cluster)."""

from __future__ import annotations

from typing import Any

import pytest

from injector.audit import ListExpired, Pages, check_page_size


class Gone(Exception):
    status = 410


def objects(n: int) -> list[dict[str, Any]]:
    return [{"metadata": {"namespace": "ns", "name": f"pod-{i:04d}"}} for i in range(n)]


class FakeList:
    """A LIST's answers as the API shapes them: ``metadata.continue`` until the last page."""

    def __init__(self, items: list[dict[str, Any]], expire_at: set[int] | None = None) -> None:
        self.items = items
        self.calls: list[tuple[int, str | None]] = []
        self.expire_at = expire_at or set()  # call numbers answered with 410

    def __call__(self, limit: int, token: str | None) -> dict[str, Any]:
        self.calls.append((limit, token))
        if len(self.calls) in self.expire_at:
            raise Gone()
        start = int(token) if token else 0
        page = self.items[start:start + limit]
        meta: dict[str, Any] = {"resourceVersion": str(100 + len(self.calls))}
        if start + limit < len(self.items):
            meta["continue"] = str(start + limit)
        return {"metadata": meta, "items": page}


def names(pages: Pages) -> list[str]:
    return [i["metadata"]["name"] for page in pages for i in page]


def test_every_object_once_in_pages_of_the_limit() -> None:
    fetch = FakeList(objects(1201))
    pages = Pages(fetch, page_size=500)
    got = [len(p) for p in pages]
    assert got == [500, 500, 201]
    assert fetch.calls == [(500, None), (500, "500"), (500, "1000")]
    assert pages.snapshots == ["101"]


def test_an_expired_token_restarts_the_list_and_skips_what_was_reported() -> None:
    fetch = FakeList(objects(1200), expire_at={3})
    pages = Pages(fetch, page_size=500)
    got = names(pages)
    assert got == [f"pod-{i:04d}" for i in range(1200)]  # none twice, none lost
    assert pages.restarts == 1 and len(pages.snapshots) == 2
    assert fetch.calls[2] == (500, "1000") and fetch.calls[3] == (500, None)


def test_a_list_that_keeps_expiring_fails_naming_the_limit() -> None:
    fetch = FakeList(objects(100), expire_at={2, 4, 6, 8, 10})
    with pytest.raises(ListExpired, match="limit is 3 restarts"):
        names(Pages(fetch, page_size=10))


def test_a_410_on_the_first_request_is_an_error_not_a_loop() -> None:
    fetch = FakeList(objects(10), expire_at={1})
    with pytest.raises(Gone):
        names(Pages(fetch, page_size=5))
    assert len(fetch.calls) == 1


@pytest.mark.parametrize("bad", [0, -1, 5001])
def test_page_size_bounds_name_the_limit(bad: int) -> None:
    with pytest.raises(ValueError, match="page-size limit"):
        check_page_size(bad)
