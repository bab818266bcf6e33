"""Serving TLS whose certificate can be replaced while the server runs.

Mounted Secrets are updated by swapping a ``..data`` symlink, which emits no reliable file
events, so the files are polled. A change is loaded into a *fresh* ``SSLContext`` first; only a
context that loaded completely is published, and the listening context's SNI callback (OpenSSL
calls it on every handshake, with or without SNI) moves each new connection onto the newest one.
Handshakes in flight and open keep-alive connections keep the context they started with, so no
request fails during a swap and a half-written pair (new cert, old key) is simply retried later.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

log = logging.getLogger("injector.tls")


class CertificateError(Exception):
    """The certificate/key pair could not be read or does not belong together."""


@dataclass(frozen=True)
class LoadedCertificate:
    context: ssl.SSLContext
    fingerprint: str  # sha256 of cert+key bytes: identifies what is being served
    not_after: dt.datetime
    subject: str


#: TLS 1.2 suites offered: forward-secret AEAD only (no CBC, whose padding and MAC-then-encrypt
#: design keeps producing oracles). TLS 1.3's suites are all AEAD and are not affected by this.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


def _server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _load_into(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """Load exactly these bytes (SSLContext only reads paths: give it a private 0600 copy)."""
    with tempfile.TemporaryDirectory(prefix="mesh-injector-tls-") as tmp:
        cert_path, key_path = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
        cert_path.write_bytes(cert_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        try:
            ctx.load_cert_chain(cert_path, key_path)
        except (ssl.SSLError, OSError) as exc:
            raise CertificateError(f"certificate and key do not load together: {exc}") from exc


def load_pair(cert_pem: bytes, key_pem: bytes) -> LoadedCertificate:
    """A server context for this cert chain + key; raises CertificateError if they do not match."""
    try:
        leaf = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise CertificateError(f"certificate is not PEM: {exc}") from exc
    ctx = _server_context()
    _load_into(ctx, cert_pem, key_pem)
    return LoadedCertificate(
        context=ctx,
        fingerprint=hashlib.sha256(cert_pem + b"\0" + key_pem).hexdigest(),
        not_after=leaf.not_valid_after_utc,
        subject=leaf.subject.rfc4514_string(),
    )


class ReloadingCertificate:
    """A certificate/key file pair served through one listening context that follows the files."""

    def __init__(self, cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]) -> None:
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self.current: LoadedCertificate | None = None
        self.last_error: str | None = None
        self._listening = _server_context()
        self._listening.sni_callback = self._select_context

    @property
    def listening_context(self) -> ssl.SSLContext:
        """The context to give the server socket; it must not change for the server's lifetime."""
        return self._listening

    def _select_context(self, conn: ssl.SSLObject, _server_name: str | None, _ctx: ssl.SSLContext) -> None:
        current = self.current
        if current is not None:
            conn.context = current.context
        return None

    def load(self) -> bool:
        """Read both files; publish them if they changed and load together. True if published.

        Raises CertificateError only when nothing has been loaded yet (a server cannot start
        without a certificate); later failures keep the old certificate and are recorded.
        """
        try:
            cert_pem = self.cert_file.read_bytes()
            key_pem = self.key_file.read_bytes()
            fingerprint = hashlib.sha256(cert_pem + b"\0" + key_pem).hexdigest()
            if self.current is not None and fingerprint == self.current.fingerprint:
                return False
            loaded = load_pair(cert_pem, key_pem)
        except (OSError, CertificateError) as exc:
            message = f"cannot load {self.cert_file} / {self.key_file}: {exc}"
            if self.current is None:
                raise CertificateError(message) from exc
            if message != self.last_error:
                log.warning("keeping the serving certificate in use", extra={"error": message})
            self.last_error = message
            return False
        # Keep the listening context's own chain in step too, for any handshake that does not
        # pass through the callback. Same thread as the handshakes: never seen half-loaded.
        try:
            _load_into(self._listening, cert_pem, key_pem)
        except CertificateError as exc:  # pragma: no cover - load_pair just proved the pair
            log.warning("listening context kept its previous chain", extra={"error": str(exc)})
        self.current = loaded
        self.last_error = None
        log.info(
            "serving certificate loaded",
            extra={"subject": loaded.subject, "not_after": loaded.not_after.isoformat()},
        )
        return True
