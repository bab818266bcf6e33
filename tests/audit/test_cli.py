"""`mesh-injector audit` as a user meets it before any cluster answers: flags and their limits."""

from __future__ import annotations

import subprocess

from tests.server.helpers import serve_command


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*serve_command(), "audit", *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "KUBECONFIG": "/nonexistent/kubeconfig"})


def test_help_documents_paging_formats_and_restart() -> None:
    result = run("--help")
    assert result.returncode == 0
    for text in ("--page-size", "default: 500", "jsonl", "--restart", "--dry-run"):
        assert text in result.stdout, text


def test_a_page_size_out_of_bounds_names_the_limit() -> None:
    result = run("--page-size", "0")
    assert result.returncode == 2 and "page-size limit" in result.stderr


def test_dry_run_without_restart_is_refused() -> None:
    result = run("--dry-run")
    assert result.returncode == 2 and "--dry-run only applies to --restart" in result.stderr


def test_an_unusable_kubeconfig_is_a_message_not_a_traceback() -> None:
    result = run()
    assert result.returncode == 2 and "cannot use the kubeconfig" in result.stderr
    assert "Traceback" not in result.stderr
