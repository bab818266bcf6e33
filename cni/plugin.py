"""The chained CNI plugin: ADD / DEL / CHECK / VERSION / GC / STATUS.

``run(env, stdin) -> (exit code, stdout)`` is the whole plugin as a function: the process entry
point, the node agent and the tests all call it. Hot path: nothing here imports more than the
stdlib's C modules until a pod really needs redirecting (see bench/bench_cni.py).
"""

from __future__ import annotations

import os

from cni import spec
from cni.config import PluginConfig
from cni.log import Log
from cni.spec import CniError, Request

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (hot path)
if TYPE_CHECKING:
    from collections.abc import Mapping

    from cni.annotations import RedirectPlan

#: = cni.annotations.STATUS; repeated so non-injected pods are skipped without importing the
#: annotation module (tests assert the two agree).
STATUS_ANNOTATION = "sidecar.istio.io/status"
#: = cni.annotations.ReasonCode values, for the decisions taken before that module is imported.
NOT_POD, EXCLUDED_NAMESPACE, OWN_POD, NOT_INJECTED = "NotPod", "ExcludedNamespace", "OwnPod", "NotInjected"


def because(reason: str, message: str) -> str:
    """A decision's log text: the message, then its stable reason code (what metrics use)."""
    return f"{message} (reason {reason})"


def _log_for(config: PluginConfig, request: Request | None = None) -> Log:
    context = ""
    if request is not None:
        pod = f"{request.args.get('K8S_POD_NAMESPACE', '')}/{request.args.get('K8S_POD_NAME', '')}"
        context = f"{request.command} {request.container_id[:12]} {pod if pod != '/' else ''} "
    return Log(config.log_file, config.log_level, config.log_max_bytes, context)


def pod_annotations(request: Request, log: Log) -> tuple[dict[str, str] | None, str]:
    """The pod's annotations when it may need redirecting (None: leave it alone) and why."""
    config = request.config
    namespace = request.args.get("K8S_POD_NAMESPACE", "")
    name = request.args.get("K8S_POD_NAME", "")
    if not namespace or not name:
        return None, because(NOT_POD, "no K8S_POD_NAMESPACE/K8S_POD_NAME in CNI_ARGS: not a Kubernetes pod")
    if namespace in config.exclude_namespaces:
        return None, because(EXCLUDED_NAMESPACE, f"namespace {namespace} is excluded")
    if name.startswith(config.cni_pod_name_prefix):
        return None, because(OWN_POD, f"pod {name} is the CNI's own pod")
    annotations = config.pod_annotations()
    if annotations is None:
        kubeconfig = config.kubeconfig
        if not kubeconfig:
            raise CniError(spec.INVALID_CONFIG, "the runtime passed no pod annotations and no kubeconfig is "
                           f"configured; declare the capability {spec.POD_ANNOTATIONS_CAPABILITY} "
                           "or set kubeconfig")
        log.debug("no annotations from the runtime; asking the API server")
        annotations = api_annotations(kubeconfig, namespace, name, request.args.get("K8S_POD_UID"),
                                      timeout=config.api_timeout_s, attempts=config.api_retries)
    if STATUS_ANNOTATION not in annotations:
        return None, because(NOT_INJECTED, f"pod has no {STATUS_ANNOTATION} annotation")
    return annotations, "pod is injected"


def api_annotations(kubeconfig_path: str, namespace: str, name: str, uid: str | None, *,
                    timeout: float = 2.0, attempts: int = 3) -> dict[str, str]:
    """The pod's annotations from the API server, failing closed: unreachable or 429/5xx after
    bounded retries is code 11 (the runtime retries), any other refusal code 102."""
    import http.client
    import time

    from cni.kube import ApiError, KubeApi, KubeconfigError

    try:
        api = KubeApi.from_kubeconfig(kubeconfig_path, timeout_s=timeout)
    except KubeconfigError as error:
        raise CniError(spec.INVALID_CONFIG, str(error)) from None
    last = ""
    pod = None
    for attempt in range(max(1, attempts)):
        if attempt:
            time.sleep(min(0.2 * 2 ** (attempt - 1), 1.0))
        try:
            pod = api.get_pod(namespace, name)
            break
        except ApiError as error:
            if error.status != 429 and error.status < 500:
                raise CniError(spec.POD_LOOKUP_FAILED, f"cannot read pod {namespace}/{name} from "
                               f"{api.server}: HTTP {error.status}", error.body[:300]) from None
            last = f"HTTP {error.status}"
        except (OSError, http.client.HTTPException, ValueError) as error:
            last = f"{type(error).__name__}: {error}"
    if pod is None:
        raise CniError(spec.TRY_AGAIN_LATER, f"the API server {api.server} is unreachable; cannot read pod "
                       f"{namespace}/{name} to decide its redirect (failing closed, retry later)", last)
    metadata = pod.get("metadata") or {}
    if uid and metadata.get("uid") and metadata["uid"] != uid:
        raise CniError(spec.TRY_AGAIN_LATER,
                       f"pod {namespace}/{name} on the API server has uid {metadata['uid']}, "
                       f"not {uid} (recreated?)")
    annotations = metadata.get("annotations") or {}
    return {str(k): str(v) for k, v in annotations.items()}


def decide(request: Request, annotations: dict[str, str]) -> tuple[RedirectPlan | None, str]:
    """The shared vocabulary's verdict: a RedirectPlan (None: leave the pod alone) and why."""
    from cni import annotations as vocabulary

    decision = vocabulary.redirect_decision(annotations)
    if not decision.redirect:
        return None, because(decision.reason, decision.message)
    defaults = vocabulary.TrafficDefaults(capture_dns=request.config.capture_dns)
    try:
        plan = vocabulary.plan_from_annotations(annotations, defaults)
    except vocabulary.AnnotationError as error:
        pod = f"{request.args.get('K8S_POD_NAMESPACE')}/{request.args.get('K8S_POD_NAME')}"
        raise CniError(spec.INVALID_ANNOTATION, f"pod {pod}: {error}") from None
    if not plan.redirects:
        return None, because(vocabulary.ReasonCode.NO_CAPTURE, f"interception mode {plan.mode}")
    return plan, because(decision.reason, decision.message)


def pod_plan(request: Request, log: Log) -> tuple[RedirectPlan | None, str]:
    """The redirect plan for the pod (None: leave it alone) and why."""
    annotations, why = pod_annotations(request, log)
    if annotations is None:
        return None, why
    return decide(request, annotations)


def add_ops_for(request: Request, annotations: dict[str, str]) -> tuple[list | None, str]:
    """ADD's batch for the pod (None: leave it alone) and why."""
    from cni import nftables

    plan, why = decide(request, annotations)
    return (None if plan is None else nftables.add_ops(nftables.build_ruleset(plan))), why


def _pod_netns(request: Request) -> None:
    """Refuse a CNI_NETNS that is ours, the host's or no network namespace, before anything else."""
    from cni import netns

    try:
        os.close(netns.open_netns(request.netns))
    except netns.NetnsMissing as error:
        code = spec.UNKNOWN_CONTAINER if request.command == "CHECK" else spec.INVALID_ENVIRONMENT
        raise CniError(code, f"CNI_NETNS {request.netns}: {error.strerror}") from None
    except OSError as error:
        raise CniError(spec.INVALID_ENVIRONMENT, f"CNI_NETNS {request.netns}: {error.strerror}") from None


def cmd_add(request: Request, log: Log) -> str:
    _pod_netns(request)
    annotations, why = pod_annotations(request, log)
    ops = None
    if annotations is not None:
        ops, why = add_ops_for(request, annotations)
    if ops is None:
        log.info(f"not redirecting: {why}")
        return spec.add_result(request)
    from cni import netns, nftables

    try:
        nftables.run_add_ops(request.netns, ops)
    except (netns.NetnsMissing, netns.NetnsRefused) as error:
        raise CniError(spec.INVALID_ENVIRONMENT, f"CNI_NETNS {request.netns}: {error.strerror}") from None
    except OSError as error:
        _undo_add(request, log)
        raise CniError(spec.NETLINK_FAILED,
                       f"programming table inet {nftables.TABLE} failed; nothing applied",
                       str(error)) from None
    try:
        from cni import rtnl

        if not rtnl.add_passthrough_v6_in(request.netns):
            log.debug("no IPv6 in the pod: ::6 passthrough address not added")
    except OSError as error:
        _undo_add(request, log)
        raise CniError(spec.NETLINK_FAILED, "adding the inbound passthrough address ::6 to lo failed; "
                       "nothing applied", str(error)) from None
    log.info(f"redirect programmed in {request.netns}: {why}")
    return spec.add_result(request)


def _undo_add(request: Request, log: Log) -> None:
    """A failed ADD leaves nothing: the batch may have committed before its replies were lost."""
    from cni import nftables

    try:
        nftables.remove(request.netns)
    except OSError as error:
        log.warn(f"could not remove table inet {nftables.TABLE} after the failed ADD: {error}")


def cmd_del(request: Request, log: Log) -> str:
    if not request.netns:
        log.info("no netns: nothing to remove")
        return ""
    from cni import netns, nftables

    try:
        nftables.remove(request.netns)
    except netns.NetnsMissing:
        log.info(f"netns {request.netns} is gone: nothing to remove")
    except netns.NetnsRefused as error:  # never touch it; failing DEL would wedge the pod's teardown
        # EINVAL: not a netns (a runtime's unmounted leftover: the pod's netns is gone);
        # EPERM: ours or the host's, which no DEL of a pod may touch.
        report = log.info if error.errno == 22 else log.warn
        report(f"CNI_NETNS {request.netns}: {error.strerror}; left alone")
    except OSError as error:  # best effort: the rules die with the netns anyway
        log.warn(f"could not remove table inet {nftables.TABLE} from {request.netns}: {error}")
    else:
        log.info(f"table removed from {request.netns}")
    return ""


def cmd_check(request: Request, log: Log) -> str:
    _pod_netns(request)
    plan, why = pod_plan(request, log)
    from cni import netns, nftables

    try:
        problems = nftables.check(request.netns, plan)
    except netns.NetnsMissing as error:
        raise CniError(spec.UNKNOWN_CONTAINER, f"CNI_NETNS {request.netns}: {error.strerror}") from None
    if problems:
        raise CniError(spec.CHECK_FAILED, f"rules in {request.netns} differ from what ADD programs ({why})",
                       "; ".join(problems))
    return ""


def cmd_gc(request: Request, log: Log) -> str:
    """Nothing to collect: all our state is the table inside each pod's netns, gone with it."""
    return ""  # cni.dev/valid-attachments, when present, was checked to be a list


def cmd_status(request: Request, log: Log) -> str:
    """Ready when we can talk nftables netlink (and read the kubeconfig, when one is configured)."""
    from cni import nfnl

    try:
        nfnl.NftSocket().close()
    except OSError as error:
        raise CniError(spec.PLUGIN_NOT_AVAILABLE, "cannot open a netfilter netlink socket",
                       str(error)) from None
    kubeconfig = request.config.kubeconfig
    if kubeconfig and not os.access(str(kubeconfig), os.R_OK):
        raise CniError(spec.PLUGIN_NOT_AVAILABLE, f"kubeconfig {kubeconfig} is not readable")
    return ""


COMMANDS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "GC": cmd_gc, "STATUS": cmd_status}


def _error_version(stdin: bytes) -> str:
    from cni import fastjson

    try:
        config = fastjson.loads(stdin) if len(stdin) <= spec.MAX_STDIN_BYTES else None
        version = config.get("cniVersion") if isinstance(config, dict) else None
    except ValueError:
        version = None
    return version if version in spec.SUPPORTED_VERSIONS else spec.LATEST  # type: ignore[return-value]


def run(env: Mapping[str, str], stdin: bytes) -> tuple[int, str]:
    """One invocation: (exit code, stdout text). Never raises; never writes to stdout."""
    try:
        request = spec.parse_request(env, stdin)
    except CniError as error:
        Log().error(f"{env.get('CNI_COMMAND', '?')}: {error.msg} {error.details}".rstrip())
        return 1, error.to_json(_error_version(stdin))
    if request.command == "VERSION":
        return 0, spec.version_result(request.version)
    log = _log_for(request.config, request)
    try:
        return 0, COMMANDS[request.command](request, log)
    except CniError as error:
        log.error(f"{error.msg} {error.details}".rstrip())
        return 1, error.to_json(request.version)
    except Exception as error:  # a bug must still answer in the spec's format
        log.error(f"internal error: {type(error).__name__}: {error}")
        return 1, CniError(spec.IO_FAILURE, f"internal error: {type(error).__name__}: {error}").to_json(
            request.version)

