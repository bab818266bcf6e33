"""Revision tags: a stable name (istio.io/rev=<tag>) pointing at a revision, moved atomically.

As ``istioctl tag``: ``set`` makes (or, with ``--overwrite``, moves) the tag's webhook
configuration, ``list`` shows every tag with its revision and the namespaces that use it,
``remove`` deletes one, ``generate`` prints one without a cluster. The configuration's
selectors come from the same definition as the revision's own (:mod:`injector.selectors`); its
clientConfig (Service or URL, caBundle) is copied from the revision's configuration, so the tag
sends pods to exactly the server the revision's namespaces reach. Moving a tag rewrites that one
object with the resourceVersion read: every pod goes to exactly one revision at any moment.

The chart's ``revisionTags`` value makes the same objects (and keeps their caBundle current
through ``mesh-injector certs``); a tag made here has its caBundle copied now, so with
self-managed certificates list it in ``revisionTags`` too, or run ``tag set`` again after a CA
rotation.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from injector import manifests
from injector.commands.certs import _connect, run_against_cluster

REVISION_LABEL = "istio.io/rev"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kubeconfig", default=os.environ.get("KUBECONFIG"), help="kubeconfig file (default: ~/.kube/config)"
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    set_ = actions.add_parser("set", help="point TAG at --revision (create, or move with --overwrite)")
    set_.add_argument("tag")
    set_.add_argument("--revision", required=True, help="the revision the tag points at")
    set_.add_argument("--overwrite", action="store_true", help="move a tag that points elsewhere")
    set_.add_argument("--dry-run", action="store_true", help="print the object instead of writing it")
    actions.add_parser("list", help="every tag, its revision and the namespaces using it")
    remove = actions.add_parser("remove", help="delete TAG's webhook configuration")
    remove.add_argument("tag")
    remove.add_argument("--force", action="store_true", help="even when namespaces still use the tag")
    generate = actions.add_parser("generate", help="print TAG's webhook configuration (no cluster)")
    generate.add_argument("tag")
    generate.add_argument("--revision", required=True)
    generate.add_argument("--namespace", default=manifests.NAMESPACE, help="the injector's namespace")
    generate.add_argument("--url", default=None, help="an out-of-cluster webhook URL instead of the Service")


def revision_config_name(revision: str) -> str:
    """The chart's name for a revision's own webhook configuration."""
    return manifests.NAME if revision == "default" else f"{manifests.NAME}-{revision}"


def tag_object(tag: str, revision: str, revision_config: dict[str, Any]) -> dict[str, Any]:
    """TAG's configuration, aimed where the revision's own configuration is aimed."""
    hooks = revision_config.get("webhooks") or []
    if not hooks:
        raise ValueError(f"MutatingWebhookConfiguration {revision_config_name(revision)} has no webhooks")
    first = hooks[0]
    client_config = dict(first.get("clientConfig") or {})
    ca_bundle = client_config.pop("caBundle", None)
    service = client_config.get("service") or {}
    obj = manifests.webhook_configuration(
        revision=revision,
        tag=tag,
        namespace=service.get("namespace", manifests.NAMESPACE),
        service=service.get("name", manifests.SERVICE),
        url=client_config.get("url"),
        ca_bundle=ca_bundle,
        timeout_seconds=int(first.get("timeoutSeconds") or manifests.TIMEOUT_SECONDS),
        failure_policy=str(first.get("failurePolicy") or "Fail"),
    )
    # Labelled with the revision's injector name even when it is reached by url (no Service).
    served_by = ((revision_config.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/name")
    if served_by:
        obj["metadata"]["labels"]["app.kubernetes.io/name"] = served_by
    # A revision restricted to some namespaces (the chart's injector.namespaceLabels) lends
    # the restriction to its tags.
    restrict = (first.get("namespaceSelector") or {}).get("matchLabels")
    if restrict:
        for hook in obj["webhooks"]:
            hook["namespaceSelector"].setdefault("matchLabels", {}).update(restrict)
    return obj


def _api(kubeconfig: str | None) -> Any:
    from kubernetes import client

    api_client = _connect(kubeconfig)  # as `certs`: kubeconfig, in-cluster, or ~/.kube/config
    return client.AdmissionregistrationV1Api(api_client), client.CoreV1Api(api_client)


def _namespaces_using(core: Any, tag: str) -> list[str]:
    found = core.list_namespace(label_selector=f"{REVISION_LABEL}={tag}")
    return sorted(ns.metadata.name for ns in found.items)


def _set(args: argparse.Namespace) -> int:
    from kubernetes.client.exceptions import ApiException

    adm, _core = _api(args.kubeconfig)
    client = adm.api_client
    try:
        revision_config = client.sanitize_for_serialization(
            adm.read_mutating_webhook_configuration(revision_config_name(args.revision))
        )
    except ApiException as exc:
        if exc.status == 404:
            print(f"tag: revision {args.revision!r} is not installed "
                  f"(no MutatingWebhookConfiguration {revision_config_name(args.revision)})", file=sys.stderr)
            return 1
        raise
    wanted = tag_object(args.tag, args.revision, revision_config)
    if args.dry_run:
        sys.stdout.write(manifests.render_yaml(wanted))
        return 0
    name = wanted["metadata"]["name"]
    try:
        current = adm.read_mutating_webhook_configuration(name)
    except ApiException as exc:
        if exc.status != 404:
            raise
        adm.create_mutating_webhook_configuration(wanted)
        print(f"tag {args.tag} -> revision {args.revision} (created {name})")
        return 0
    pointed = (current.metadata.labels or {}).get(REVISION_LABEL)
    if pointed != args.revision and not args.overwrite:
        print(f"tag: {args.tag} points at revision {pointed!r}; pass --overwrite to move it", file=sys.stderr)
        return 1
    # One replace with the resourceVersion read: the tag moves in one step or not at all.
    wanted["metadata"]["resourceVersion"] = current.metadata.resource_version
    adm.replace_mutating_webhook_configuration(name, wanted)
    print(f"tag {args.tag} -> revision {args.revision} (was {pointed})")
    return 0


def _list(args: argparse.Namespace) -> int:
    adm, core = _api(args.kubeconfig)
    found = adm.list_mutating_webhook_configuration(label_selector=manifests.TAG_LABEL)
    rows = [("TAG", "REVISION", "NAMESPACES")]
    for mwc in sorted(found.items, key=lambda m: m.metadata.name):
        labels = mwc.metadata.labels or {}
        tag = labels.get(manifests.TAG_LABEL, "")
        rows.append((tag, labels.get(REVISION_LABEL, ""), ",".join(_namespaces_using(core, tag)) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _remove(args: argparse.Namespace) -> int:
    from kubernetes.client.exceptions import ApiException

    adm, core = _api(args.kubeconfig)
    users = _namespaces_using(core, args.tag)
    if users and not args.force:
        print(f"tag: namespaces still use {args.tag}: {', '.join(users)}; relabel them or pass --force",
              file=sys.stderr)
        return 1
    try:
        adm.delete_mutating_webhook_configuration(f"{manifests.TAG_PREFIX}{args.tag}")
    except ApiException as exc:
        if exc.status == 404:
            print(f"tag: no tag {args.tag}", file=sys.stderr)
            return 1
        raise
    print(f"tag {args.tag} removed")
    return 0


def _generate(args: argparse.Namespace) -> int:
    obj = manifests.webhook_configuration(
        revision=args.revision,
        tag=args.tag,
        namespace=args.namespace,
        service=revision_config_name(args.revision),
        url=args.url,
    )
    sys.stdout.write(manifests.render_yaml(obj))
    return 0


def run(args: argparse.Namespace) -> int:
    """Exit 1 when the API refused or could not be reached, 2 without a cluster: one line, no traceback."""
    action = {"set": _set, "list": _list, "remove": _remove, "generate": _generate}[args.action]
    return run_against_cluster("tag", lambda: action(args))
