"""``mesh-cni redirect``: program the redirect from an init container (the injector's init mode).

For clusters that cannot install the CNI plugin: an init container with NET_ADMIN, in the pod's
own network namespace, reads the pod's annotations from the downward-API file and runs the same
plan and the same atomic netlink batch as the plugin's ADD.
"""

from __future__ import annotations

import sys


def parse_downward_api(text: str) -> dict[str, str]:
    """Kubernetes' downward-API annotations file: one ``key="Go-quoted value"`` per line."""
    from cni import fastjson

    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, quoted = line.partition("=")
        if not sep or not quoted.startswith('"') or not quoted.endswith('"'):
            raise ValueError(f"line {number}: expected key=\"value\", got {line[:80]!r}")
        # Go's strconv.Quote escapes are JSON's plus \xNN, \a, \v (rare in annotations).
        body = quoted.replace("\\a", "\\u0007").replace("\\v", "\\u000b")
        body = _hex_escapes(body)
        value = fastjson.loads(body)
        if not isinstance(value, str):
            raise ValueError(f"line {number}: value is not a string")
        values[key.strip()] = value
    return values


def _hex_escapes(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            if text[i + 1] == "x" and i + 3 < len(text):
                out.append(f"\\u00{text[i + 2:i + 4]}")
                i += 4
                continue
            out.append(text[i:i + 2])
            i += 2
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    from cni.cli import argument_parser

    parser = argument_parser("mesh-cni redirect", __doc__)
    parser.add_argument("--annotations-file", default="/etc/istio/pod/annotations",
                        help="downward-API annotations file")
    parser.add_argument("--netns", default=None,
                        help="path of the network namespace to program (default: this container's own)")
    parser.add_argument("--capture-dns", action="store_true",
                        help="capture DNS (TCP/UDP 53 -> 15053) unless the pod's annotation says otherwise")
    parser.add_argument("--dry-run", action="store_true", help="print the rules instead of programming them")
    args = parser.parse_args(argv)

    from cni import annotations as vocabulary
    from cni import nftables

    try:
        with open(args.annotations_file, encoding="utf-8") as handle:
            pod_annotations = parse_downward_api(handle.read())
    except (OSError, ValueError) as error:
        sys.stderr.write(f"mesh-cni redirect: cannot read {args.annotations_file}: {error}\n")
        return 2
    decision = vocabulary.redirect_decision(pod_annotations)
    if not decision.redirect:
        sys.stdout.write(f"mesh-cni redirect: not redirecting: {decision.message}\n")
        return 0
    try:
        plan = vocabulary.plan_from_annotations(
            pod_annotations, vocabulary.TrafficDefaults(capture_dns=args.capture_dns))
    except vocabulary.AnnotationError as error:
        sys.stderr.write(f"mesh-cni redirect: {error}\n")
        return 1
    if not plan.redirects:
        sys.stdout.write(f"mesh-cni redirect: not redirecting: interception mode {plan.mode}\n")
        return 0
    if args.dry_run:
        from cni import nftext

        sys.stdout.write(nftext.render(nftables.add_ops(nftables.build_ruleset(plan))))
        return 0
    try:
        from cni import netns, rtnl

        nftables.program(args.netns or netns.CURRENT, plan)
        rtnl.add_passthrough_v6_in(args.netns or netns.CURRENT)
    except OSError as error:
        sys.stderr.write(f"mesh-cni redirect: programming table inet {nftables.TABLE} failed, "
                         "nothing applied: "
                         f"{error}\n")
        return 1
    sys.stdout.write(f"mesh-cni redirect: table inet {nftables.TABLE} programmed ({decision.message})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
