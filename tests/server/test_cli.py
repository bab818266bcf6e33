"""The `serve` and `audit` subcommands as a user meets them: --help and start-up errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.server.helpers import make_pki, serve_command


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*serve_command(), *args], capture_output=True, text=True, timeout=60)


def test_serve_help_documents_every_flag() -> None:
    result = run("serve", "--help")
    assert result.returncode == 0
    for flag in ("--port", "--address", "--tls-cert-file", "--tls-key-file", "--tls-reload-interval",
                 "--config-dir", "--config-reload-interval", "--max-body-bytes", "--kubeconfig",
                 "--no-events", "--events-queue-size", "--log-level"):
        assert flag in result.stdout, flag
    assert "6291456" in result.stdout  # the default body limit, 6 MiB


def test_audit_help() -> None:
    result = run("audit", "--help")
    assert result.returncode == 0
    for flag in ("--namespace", "--kubeconfig", "--config-dir", "--output"):
        assert flag in result.stdout, flag


def test_serve_without_a_usable_certificate_exits_with_a_message(tmp_path: Path) -> None:
    (tmp_path / "tls.crt").write_text("not a certificate")
    (tmp_path / "tls.key").write_text("not a key")
    result = run("serve", "--port", "0", "--tls-cert-file", str(tmp_path / "tls.crt"),
                 "--tls-key-file", str(tmp_path / "tls.key"))
    assert result.returncode == 2
    assert "no usable serving certificate" in result.stderr + result.stdout


def test_serve_with_a_key_of_another_certificate_exits(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    a, b = pki.serving(), pki.serving()
    (tmp_path / "tls.crt").write_bytes(a.cert_pem)
    (tmp_path / "tls.key").write_bytes(b.key_pem)
    result = run("serve", "--port", "0", "--tls-cert-file", str(tmp_path / "tls.crt"),
                 "--tls-key-file", str(tmp_path / "tls.key"))
    assert result.returncode == 2
    assert "do not load together" in result.stderr + result.stdout
