"""The answer memo: a replica of a pod already answered gets the same answer, without the core.

A workload's replicas reach the webhook as the same pod but for the token volume's random name
and managedFields (the API server names a pod and gives it a uid after admission). The answer
depends only on the pod, its namespace and the config, so the webhook may remember it; these
tests hold it to giving exactly the answer the core would, under the request's own uid and with
the pod's own volume name, and to forgetting at the right times.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from injector import admission
from injector.config import compile_config, default_config
from tests.server.helpers import RunningServer, decoded_patch, review, typical_pod


def answer(body: dict[str, Any], config: Any, memo: admission.AnswerMemo | None) -> tuple[dict[str, Any],
                                                                                        admission.Outcome]:
    payload, outcome = admission.review(json.dumps(body).encode(), config=config, memo=memo)
    return json.loads(payload), outcome


def twice(body: dict[str, Any], config: Any, memo: admission.AnswerMemo) -> dict[str, Any]:
    """Two misses: the memo keeps a pod's answer at its second (a pod that comes once is not
    worth keeping); the answer of the first."""
    first, first_out = answer(body, config, memo)
    _, second_out = answer(body, config, memo)
    assert (first_out.memo, second_out.memo) == ("miss", "miss")
    return first


def test_a_replica_gets_the_cores_answer_under_its_own_uid() -> None:
    config, memo = default_config(), admission.AnswerMemo()
    first = twice(review(typical_pod(), uid="uid-1"), config, memo)
    second, second_out = answer(review(typical_pod(), uid="uid-2"), config, memo)
    without, _ = answer(review(typical_pod(), uid="uid-2"), config, None)
    assert second_out.memo == "hit"
    assert second == without
    assert second["response"]["uid"] == "uid-2" and first["response"]["uid"] == "uid-1"
    assert decoded_patch(second) == decoded_patch(first)
    assert second_out.decision == "inject" and second_out.patched


def test_a_different_pod_or_namespace_is_answered_by_the_core() -> None:
    config, memo = default_config(), admission.AnswerMemo()
    twice(review(typical_pod(), namespace="apps"), config, memo)
    other_label = typical_pod()
    other_label["metadata"]["labels"]["version"] = "v2"
    got, out = answer(review(other_label, namespace="apps"), config, memo)
    assert out.memo == "miss"
    revision = [op["value"] for op in decoded_patch(got)
                if op["path"] == "/metadata/labels/service.istio.io~1canonical-revision"]
    assert revision == ["v2"]
    elsewhere, out = answer(review(typical_pod(), namespace="shop"), config, memo)
    assert out.memo == "miss"
    assert elsewhere == answer(review(typical_pod(), namespace="shop",
                                      uid=elsewhere["response"]["uid"]), config, None)[0]


def test_a_new_config_empties_the_memo() -> None:
    memo = admission.AnswerMemo()
    data = default_config().model.model_dump(by_alias=True)
    twice(review(typical_pod()), compile_config(data), memo)
    twice(review(typical_pod()), compile_config(data), memo)  # the same files reloaded: forgotten
    assert memo.hits == 0 and len(memo) == 1
    data["values"]["proxy"]["image"] = data["values"]["proxy"]["envoyImage"] = "proxy-from-reload"
    reloaded = compile_config(data)
    got, out = answer(review(typical_pod()), reloaded, memo)
    assert out.memo == "miss"
    assert "proxy-from-reload" in json.dumps(decoded_patch(got))


def test_a_refused_pod_is_refused_again_with_its_event_data() -> None:
    config, memo = default_config(), admission.AnswerMemo()
    bad = typical_pod(annotations={"traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/33"})
    first = twice(review(bad), config, memo)
    second, out = answer(review(bad), config, memo)
    assert out.memo == "hit" and out.decision == "reject"
    assert second["response"]["allowed"] is False
    assert second["response"]["status"] == first["response"]["status"]
    assert out.pod is not None  # the Event for the refusal still names the pod's owner


def test_the_memo_is_bounded_in_entries_bytes_and_pod_size() -> None:
    config = default_config()
    memo = admission.AnswerMemo(max_entries=3, max_pod_bytes=16 << 10)
    for n in range(10):
        pod = typical_pod()
        pod["metadata"]["labels"]["n"] = str(n)
        twice(review(pod), config, memo)
    assert len(memo) == 3
    big = typical_pod(annotations={"note": "x" * (20 << 10)})
    _, out = answer(review(big), config, memo)
    _, again = answer(review(big), config, memo)
    assert (out.memo, again.memo) == ("", "")  # over max_pod_bytes: never remembered
    small_budget = admission.AnswerMemo(max_bytes=64 << 10)
    for n in range(40):
        pod = typical_pod()
        pod["metadata"]["labels"]["n"] = str(n)
        twice(review(pod), config, small_budget)
    assert 0 < len(small_budget) < 40
    assert small_budget._bytes <= 64 << 10


def test_the_server_counts_and_logs_memo_hits(webhook: RunningServer) -> None:
    pod = typical_pod("memo-replica")
    with webhook.client() as client:
        answers = [client.post("/inject", json=review(copy.deepcopy(pod), namespace="memo-ns")).json()
                   for _ in range(4)]
        metrics = client.get("/metrics").text
    assert len({json.dumps(decoded_patch(a)) for a in answers}) == 1
    lines = [line for line in webhook.logs() if line.get("pod") == "memo-replica-5d9c7b-"]
    assert [line.get("memo") for line in lines[-4:]] == ["miss", "miss", "hit", "hit"]
    hits = [line for line in metrics.splitlines()
            if line.startswith('mesh_injector_answer_memo_total{result="hit"}')]
    assert hits and float(hits[0].split()[-1]) >= 2


def replica(suffix: str, second: int = 0, **meta: Any) -> dict[str, Any]:
    """A pod as kube-apiserver hands a Deployment's replica to webhooks: the ServiceAccount
    plugin's token volume (random name, mounted in every container) and managedFields added."""
    pod = typical_pod(**meta)
    name = f"kube-api-access-{suffix}"
    pod["spec"]["volumes"] = [{"name": name, "projected": {"defaultMode": 420, "sources": [
        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}]}}]
    for container in pod["spec"]["containers"]:
        container["volumeMounts"] = [{"name": name, "readOnly": True,
                                      "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]
    pod["metadata"]["managedFields"] = [{"manager": "kube-controller-manager", "operation": "Update",
                                         "time": f"2026-12-01T18:22:0{second}Z"}]
    return pod


def test_replicas_differing_in_token_volume_name_and_managed_fields_hit() -> None:
    """As seen on kube-apiserver 1.37: replicas differ in the token volume's random name and in
    managedFields. The second replica is a hit, and its answer is the core's answer for it: its
    own volume name throughout the patch, none of the first's."""
    config, memo = default_config(), admission.AnswerMemo()
    first, _ = answer(review(replica("q5cjn"), uid="a"), config, memo)
    answer(review(replica("x7k2p", second=2), uid="c"), config, memo)  # kept at the second miss
    second, out = answer(review(replica("bbmk8", second=1), uid="b"), config, memo)
    assert out.memo == "hit"
    assert second == answer(review(replica("bbmk8", second=1), uid="b"), config, None)[0]
    patch = json.dumps(decoded_patch(second))
    assert "kube-api-access-bbmk8" in patch and "q5cjn" not in patch and "@memo@" not in patch
    assert "kube-api-access-q5cjn" in json.dumps(decoded_patch(first))


def test_a_token_volume_name_that_also_occurs_elsewhere_is_not_memoised() -> None:
    """Renaming would not be exact if the name were also part of other text."""
    config, memo = default_config(), admission.AnswerMemo()
    noted = replica("zz9x1", annotations={"note": "uses kube-api-access-zz9x1 for the API"})
    _, out = answer(review(noted), config, memo)
    assert out.memo == ""
    sneaky = replica("abcde", annotations={"note": "kube-api-access-@memo@"})
    _, out = answer(review(sneaky), config, memo)
    assert out.memo == ""


def test_a_hit_is_byte_for_byte_the_cores_answer_for_any_name_and_uid() -> None:
    """A hit is spliced from the first answer: the uid put in, and only the base64 over the
    token volume's name encoded again. Whatever the name's place in the patch's 3-byte groups,
    its length, or the uid's JSON escaping, the bytes are the core's."""
    config, memo = default_config(), admission.AnswerMemo()
    twice(review(replica("q5cjn"), uid="first"), config, memo)
    names = ["bbmk8", "zzzzz", "22222", "x7k2p", "q5cjn", "abcdefg", "abc", "mnbvc"]
    uids = ["b", 'uid with "quotes" and \\ and ü', "705ab4f5-6393-11e8-b7cc-42010a800002"]
    for n, name in enumerate(names):
        body = json.dumps(review(replica(name, second=n % 10), uid=uids[n % len(uids)])).encode()
        got, out = admission.review(body, config=config, memo=memo)
        assert out.memo == "hit"
        assert got == admission.review(body, config=config)[0], name


def test_the_api_version_is_part_of_the_key() -> None:
    config, memo = default_config(), admission.AnswerMemo()
    twice(review(replica("q5cjn")), config, memo)
    old = review(replica("bbmk8"))
    old["apiVersion"] = "admission.k8s.io/v1beta1"
    got, out = answer(old, config, memo)
    assert out.memo == "miss" and got["apiVersion"] == "admission.k8s.io/v1beta1"


def test_the_patch_spliced_into_the_encoded_answer_is_what_the_encoder_would_write() -> None:
    """The base64 goes into the encoded AdmissionReview after encoding (no 12 KiB string through
    the encoder, and the memo knows where it is): the bytes are those of encoding it directly,
    also when the stand-in for it occurs in other text of the answer."""
    import base64

    import orjson

    payload, _ = admission.review(json.dumps(review(replica("q5cjn"))).encode(), config=default_config())
    assert orjson.dumps(orjson.loads(payload)) == payload
    b64 = base64.b64encode(b'[{"op":"add","path":"/metadata/labels/a","value":"b"}]')
    mark = admission._PATCH_MARK
    response = {"uid": "u", "allowed": True, "patchType": "JSONPatch", "patch": mark, "warnings": [mark]}
    encoded, at = admission._encode_with_patch("admission.k8s.io/v1", dict(response), b64)
    expected = orjson.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                             "response": {**response, "patch": b64.decode()}})
    assert encoded == expected and encoded[at:at + len(b64)] == b64


def test_a_pod_that_comes_once_is_not_kept() -> None:
    """Pods of no workload with replicas (each one different) never fill the memo: an answer
    is kept at its pod's second miss, and what is remembered of first misses is bounded."""
    config, memo = default_config(), admission.AnswerMemo(max_entries=4)
    for n in range(40):
        pod = typical_pod()
        pod["metadata"]["labels"]["n"] = str(n)
        _, out = answer(review(pod), config, memo)
        assert out.memo == "miss"
    assert len(memo) == 0 and len(memo._seen) == 16
