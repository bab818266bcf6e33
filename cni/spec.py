"""The CNI protocol (spec 1.1.0, configs 0.3.0..1.1.0): environment, stdin config, results, errors.

Pure functions over an env mapping and stdin bytes; the plugin shell does the I/O. Errors are
``CniError`` carrying the spec's code, printed as the spec's JSON on stdout with exit code 1.
"""

from __future__ import annotations

from cni import fastjson

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (hot path)
if TYPE_CHECKING:
    from collections.abc import Mapping

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = "1.1.0"
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")

# Error codes: the spec's well-known ones, then ours (100+).
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50
NETLINK_FAILED = 100  # programming the rules failed; nothing was applied
INVALID_ANNOTATION = 101  # the pod's traffic annotations cannot be turned into rules
POD_LOOKUP_FAILED = 102  # the API server answered, but not with the pod (403/404/uid mismatch)
CHECK_FAILED = 103  # CHECK: the netns's rules differ from what ADD programs

POD_ANNOTATIONS_CAPABILITY = "io.kubernetes.cri.pod-annotations"
#: Largest network configuration we read from stdin. A pod's annotations are at most 256 KiB
#: (the API server's limit) and a prevResult a few KiB; anything near this is hostile.
MAX_STDIN_BYTES = 1 << 20


class CniError(Exception):
    """A failure reported to the runtime as the spec's error JSON."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> str:
        body = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            body["details"] = self.details
        return fastjson.dumps(body)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


class Request:
    """One plugin invocation: command, environment and the network configuration, typed."""

    __slots__ = ("args", "command", "config", "container_id", "ifname", "netns", "path", "version")

    def __init__(self, command: str, env: Mapping[str, str], config: dict[str, object]) -> None:
        from cni.config import PluginConfig

        self.command = command
        self.version = str(config.get("cniVersion") or LATEST)
        # VERSION reads nothing but cniVersion: its config is never type-checked.
        self.config = PluginConfig({} if command == "VERSION" else config)
        self.container_id = env.get("CNI_CONTAINERID", "")
        self.netns = env.get("CNI_NETNS", "")
        self.ifname = env.get("CNI_IFNAME", "")
        self.path = env.get("CNI_PATH", "")
        self.args = parse_cni_args(env.get("CNI_ARGS", ""))

    def at_least(self, version: str) -> bool:
        return _version_key(self.version) >= _version_key(version)


def parse_cni_args(text: str) -> dict[str, str]:
    """CNI_ARGS ``K=V;K=V`` (order varies between runtimes: parse, never match)."""
    args: dict[str, str] = {}
    for pair in text.split(";"):
        key, sep, value = pair.partition("=")
        if sep and key.strip():
            args[key.strip()] = value.strip()
    return args


def _valid_container_id(value: str) -> bool:
    return bool(value) and value[0].isalnum() and value.isascii() and all(
        c.isalnum() or c in "_.-" for c in value)


def _valid_ifname(value: str) -> bool:
    return (0 < len(value.encode()) <= 15 and value not in (".", "..")
            and not any(c in value for c in "/: \t\n"))


def parse_request(env: Mapping[str, str], stdin: bytes) -> Request:
    """Validate the environment and stdin for the command; raise CniError with the spec's code."""
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(INVALID_ENVIRONMENT, f"CNI_COMMAND {command!r} is not one of {', '.join(COMMANDS)}")
    if len(stdin) > MAX_STDIN_BYTES:
        raise CniError(DECODING_FAILURE, f"the network configuration on stdin exceeds the limit "
                       f"MAX_STDIN_BYTES ({MAX_STDIN_BYTES} bytes)")
    try:
        config = fastjson.loads(stdin) if stdin.strip() else ({} if command == "VERSION" else None)
    except ValueError as error:
        raise CniError(DECODING_FAILURE, "the network configuration on stdin is not valid JSON",
                       str(error)) from None
    if config is None:
        raise CniError(DECODING_FAILURE, "no network configuration on stdin")
    if not isinstance(config, dict):
        raise CniError(DECODING_FAILURE, "the network configuration on stdin is not a JSON object")
    version = config.get("cniVersion")
    if command != "VERSION":
        if not isinstance(version, str) or not version:
            raise CniError(INVALID_CONFIG, "the network configuration has no cniVersion")
        if version not in SUPPORTED_VERSIONS:
            raise CniError(INCOMPATIBLE_VERSION, f"cniVersion {version!r} is not supported",
                           f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    elif version is not None and (not isinstance(version, str) or version not in SUPPORTED_VERSIONS):
        config = {**config, "cniVersion": LATEST}
    request = Request(command, env, config)
    _validate_env(request, env)
    _validate_config(request)
    return request


def _validate_env(request: Request, env: Mapping[str, str]) -> None:
    command = request.command
    if command == "VERSION":
        return
    if command in ("ADD", "DEL", "CHECK"):
        if not _valid_container_id(request.container_id):
            raise CniError(INVALID_ENVIRONMENT,
                           f"CNI_CONTAINERID {request.container_id!r} is missing or invalid")
        if not _valid_ifname(request.ifname):
            raise CniError(INVALID_ENVIRONMENT, f"CNI_IFNAME {request.ifname!r} is missing or invalid")
        if command != "DEL" and not request.netns:
            raise CniError(INVALID_ENVIRONMENT, "CNI_NETNS is required")
    if "CNI_PATH" not in env:
        raise CniError(INVALID_ENVIRONMENT, "CNI_PATH is required")


def _validate_config(request: Request) -> None:
    """What the spec requires of every config; our own keys were typed by PluginConfig."""
    command = request.command
    if command == "VERSION":
        return
    if not request.config.name:
        raise CniError(INVALID_CONFIG, "the network configuration has no name")
    if command in ("GC", "STATUS") and not request.at_least("1.1.0"):
        raise CniError(INCOMPATIBLE_VERSION, f"{command} needs cniVersion 1.1.0, got {request.version}")
    if command == "CHECK" and not request.at_least("0.4.0"):
        raise CniError(INCOMPATIBLE_VERSION, f"CHECK needs cniVersion 0.4.0 or later, got {request.version}")


def add_result(request: Request) -> str:
    """ADD's output: prevResult unchanged in the input's cniVersion, or an empty result."""
    previous = request.config.prev_result
    if previous is not None:
        return fastjson.dumps({**previous, "cniVersion": request.version})
    if request.at_least("1.0.0"):
        return fastjson.dumps({"cniVersion": request.version, "interfaces": [], "ips": [], "dns": {}})
    return fastjson.dumps({"cniVersion": request.version, "ips": [], "dns": {}})


def version_result(version: str) -> str:
    """VERSION's output, in the asked-for cniVersion when we speak it."""
    if version not in SUPPORTED_VERSIONS:
        version = LATEST
    return fastjson.dumps({"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)})
