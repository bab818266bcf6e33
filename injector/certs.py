"""Webhook certificates: bootstrap, caBundle, and rotation with overlap.

The API server trusts the webhook through the ``caBundle`` of our MutatingWebhookConfiguration;
the server presents the serving certificate stored in a Secret. Rotating either carelessly fails
admissions (and with ``failurePolicy: Fail`` that means pods are not created), so rotation is a
small state machine in which the trust bundle always covers every certificate any replica may
still be serving:

1. a new CA is *added* to the trust bundle (the served certificate is still the old one);
2. once the webhook's caBundle has carried the new CA for ``settle``, a serving certificate
   signed by the new CA is issued;
3. once that certificate is ``overlap`` old (every replica has picked it up), the old CA is
   retired from the bundle.

Renewing only the serving certificate needs no overlap: the same CA signs old and new.

:func:`reconcile` is that state machine as a pure function over :class:`CertState` (real
``cryptography`` objects, a given ``now``); :class:`ClusterCerts` is the thin shell that reads and
writes the Secret and patches the caBundle of our own webhook configuration, and only when it
changed. :func:`write_tls_dir` mirrors the result into files the way the kubelet updates a
mounted Secret (an atomic ``..data`` symlink swap), so the server can poll them.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from injector.pki import KeyPair, issue_serving_cert, make_ca

log = logging.getLogger("mesh_injector.certs")

#: Secret keys. ``tls.crt``/``tls.key``/``ca.crt`` follow the kubernetes.io/tls convention (and
#: cert-manager's); ``ca.key`` and ``ca-bundle.crt`` are ours.
KEY_TLS_CERT = "tls.crt"
KEY_TLS_KEY = "tls.key"
KEY_CA_CERT = "ca.crt"
KEY_CA_KEY = "ca.key"
KEY_BUNDLE = "ca-bundle.crt"
ANNOTATION_CA_TRUSTED_SINCE = "mesh-injector.io/ca-trusted-since"
ANNOTATION_SERVING_SINCE = "mesh-injector.io/serving-since"


def service_dns_names(service: str, namespace: str, cluster_domain: str = "cluster.local") -> list[str]:
    """The names the API server may use for a webhook Service (it dials ``svc.ns.svc``)."""
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.{cluster_domain}",
    ]


@dataclass(frozen=True)
class CertPolicy:
    """How long things live and how early they are replaced."""

    names: tuple[str, ...]
    ca_validity: dt.timedelta = dt.timedelta(days=365)
    cert_validity: dt.timedelta = dt.timedelta(days=90)
    #: Replace when less than this is left; default: a third of the lifetime.
    ca_renew_before: dt.timedelta | None = None
    cert_renew_before: dt.timedelta | None = None
    #: How long the caBundle must have carried a new CA before it signs the served certificate
    #: (API servers pick webhook configuration changes up through a watch, within a second or so).
    settle: dt.timedelta = dt.timedelta(seconds=30)
    #: How long a retired CA stays trusted after the certificate it signed was replaced: covers
    #: replicas that still serve the old certificate until their copy of the Secret updates.
    overlap: dt.timedelta = dt.timedelta(minutes=10)

    def ca_due(self) -> dt.timedelta:
        return self.ca_renew_before if self.ca_renew_before is not None else self.ca_validity / 3

    def cert_due(self) -> dt.timedelta:
        return self.cert_renew_before if self.cert_renew_before is not None else self.cert_validity / 3


@dataclass(frozen=True)
class CertState:
    """What the Secret holds."""

    ca: KeyPair  #: signs new serving certificates
    serving: KeyPair  #: what the server presents
    trusted: tuple[bytes, ...]  #: CA certificates (PEM) in the caBundle, oldest first
    ca_trusted_since: dt.datetime  #: when ``ca`` joined ``trusted``
    serving_since: dt.datetime  #: when ``serving`` was issued

    @property
    def bundle(self) -> bytes:
        """The caBundle: every trusted CA, PEM-concatenated."""
        return b"".join(pem if pem.endswith(b"\n") else pem + b"\n" for pem in self.trusted)


@dataclass(frozen=True)
class Reconciled:
    """The state to store and what was done to reach it (empty when nothing was due)."""

    state: CertState
    actions: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()  #: things due but held back (e.g. a new CA still settling)

    @property
    def changed(self) -> bool:
        return bool(self.actions)


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the DER certificate: identity of a CA across PEM formatting differences."""
    return hashlib.sha256(_load(cert_pem).public_bytes(Encoding.DER)).hexdigest()


def _load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def split_pem_bundle(bundle: bytes) -> tuple[bytes, ...]:
    """The certificates of a PEM bundle, each re-encoded canonically."""
    if not bundle.strip():
        return ()
    return tuple(c.public_bytes(Encoding.PEM) for c in x509.load_pem_x509_certificates(bundle))


def signed_by(cert_pem: bytes, ca_pem: bytes) -> bool:
    """Whether ``ca_pem`` issued ``cert_pem`` (name match and a verifying signature)."""
    cert, ca = _load(cert_pem), _load(ca_pem)
    if cert.issuer != ca.subject:
        return False
    key = ca.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))  # type: ignore[arg-type]
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(
                cert.signature,
                cert.tbs_certificate_bytes,
                padding.PKCS1v15(),
                cert.signature_hash_algorithm,  # type: ignore[arg-type]
            )
        else:
            return False
    except InvalidSignature:
        return False
    return True


def cert_names(cert_pem: bytes) -> frozenset[str]:
    """DNS and IP SANs of a certificate as strings."""
    try:
        san = _load(cert_pem).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    return frozenset(
        [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]
    )


def _not_after(pem: bytes) -> dt.datetime:
    return _load(pem).not_valid_after_utc


def _new_ca(policy: CertPolicy, now: dt.datetime) -> KeyPair:
    # A distinct subject per generation makes "which CA signed this" readable in logs and tools.
    return make_ca(f"mesh-injector CA {now:%Y%m%dT%H%M%SZ}", validity=policy.ca_validity, now=now)


def _issue(ca: KeyPair, policy: CertPolicy, now: dt.datetime) -> KeyPair:
    # A serving certificate never outlives the CA that vouches for it.
    validity = min(policy.cert_validity, _not_after(ca.cert_pem) - now)
    return issue_serving_cert(ca, policy.names, validity=validity, now=now)


def bootstrap(policy: CertPolicy, now: dt.datetime) -> CertState:
    """A fresh CA and a serving certificate it signed."""
    ca = _new_ca(policy, now)
    return CertState(
        ca=ca,
        serving=_issue(ca, policy, now),
        trusted=(ca.cert_pem,),
        ca_trusted_since=now,
        serving_since=now,
    )


def reconcile(
    state: CertState | None,
    *,
    policy: CertPolicy,
    now: dt.datetime,
    webhook_trusted: frozenset[str] | None = None,
    rotate_ca: bool = False,
    renew: bool = False,
) -> Reconciled:
    """One step of the rotation state machine: the state to store next.

    ``webhook_trusted`` holds the fingerprints of the CAs the webhook configuration's caBundle
    carries right now (``None`` when there is no webhook configuration to protect). A new CA
    only signs the served certificate once the webhook trusts it and it has settled.
    ``rotate_ca``/``renew`` force a CA rotation / a new serving certificate now.
    """
    if state is None:
        return Reconciled(bootstrap(policy, now), ("bootstrap",))
    actions: list[str] = []
    waiting: list[str] = []
    ca, serving = state.ca, state.serving
    trusted = list(state.trusted)
    ca_trusted_since, serving_since = state.ca_trusted_since, state.serving_since

    expired = [pem for pem in trusted if _not_after(pem) <= now]
    if expired:
        trusted = [pem for pem in trusted if pem not in expired]
        actions.append(f"drop-expired-ca x{len(expired)}")
    if fingerprint(ca.cert_pem) not in {fingerprint(p) for p in trusted}:
        trusted.append(ca.cert_pem)
        ca_trusted_since = now
        actions.append("trust-current-ca")

    if rotate_ca or _not_after(ca.cert_pem) - now <= policy.ca_due():
        ca = _new_ca(policy, now)
        trusted.append(ca.cert_pem)
        ca_trusted_since = now
        actions.append("rotate-ca")

    ca_fp = fingerprint(ca.cert_pem)
    signer_is_current = signed_by(serving.cert_pem, ca.cert_pem)
    serving_valid = _not_after(serving.cert_pem) > now and any(
        signed_by(serving.cert_pem, p) for p in trusted
    )
    reasons = []
    if renew:
        reasons.append("forced")
    if cert_names(serving.cert_pem) != frozenset(policy.names):
        reasons.append("names changed")
    if _not_after(serving.cert_pem) - now <= policy.cert_due():
        reasons.append("expiring")
    if not serving_valid:
        reasons.append("not valid under the trust bundle")
    if not signer_is_current:
        reasons.append("signed by a retired CA")
    if reasons:
        ca_live = (webhook_trusted is None or ca_fp in webhook_trusted) and (
            now - ca_trusted_since >= policy.settle
        )
        if signer_is_current or ca_live or not serving_valid:
            serving = _issue(ca, policy, now)
            serving_since = now
            actions.append("issue-serving-cert (" + ", ".join(reasons) + ")")
        else:
            waiting.append("new serving certificate: the new CA is not yet settled in the webhook's caBundle")

    signer_fps = {fingerprint(p) for p in trusted if signed_by(serving.cert_pem, p)}
    if now - serving_since >= policy.overlap:
        keep = [p for p in trusted if fingerprint(p) == ca_fp or fingerprint(p) in signer_fps]
        if len(keep) != len(trusted):
            actions.append(f"retire-ca x{len(trusted) - len(keep)}")
            trusted = keep
    elif len(trusted) > 1:
        waiting.append("retiring old CAs: the current serving certificate is younger than the overlap")

    new_state = CertState(
        ca=ca,
        serving=serving,
        trusted=tuple(trusted),
        ca_trusted_since=ca_trusted_since,
        serving_since=serving_since,
    )
    return Reconciled(new_state, tuple(actions), tuple(waiting))


# --- Secret encoding ------------------------------------------------------------------------


def _ts(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_ts(value: str | None, fallback: dt.datetime) -> dt.datetime:
    if not value:
        return fallback
    try:
        return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return fallback


def encode_secret(state: CertState) -> tuple[dict[str, str], dict[str, str]]:
    """Secret ``data`` (base64) and annotations for a state."""
    raw = {
        KEY_TLS_CERT: state.serving.cert_pem,
        KEY_TLS_KEY: state.serving.key_pem,
        KEY_CA_CERT: state.ca.cert_pem,
        KEY_CA_KEY: state.ca.key_pem,
        KEY_BUNDLE: state.bundle,
    }
    data = {k: base64.b64encode(v).decode() for k, v in raw.items()}
    annotations = {
        ANNOTATION_CA_TRUSTED_SINCE: _ts(state.ca_trusted_since),
        ANNOTATION_SERVING_SINCE: _ts(state.serving_since),
    }
    return data, annotations


def decode_secret(data: Mapping[str, str] | None, annotations: Mapping[str, str] | None) -> CertState | None:
    """The state a Secret holds, or ``None`` when it is empty or incomplete (then: bootstrap).

    Timestamps missing from the annotations count as long ago (a hand-made Secret is treated
    as settled and old enough to retire CAs)."""
    data = data or {}
    needed = (KEY_TLS_CERT, KEY_TLS_KEY, KEY_CA_CERT, KEY_CA_KEY)
    if not all(data.get(k) for k in needed):
        return None
    raw = {k: base64.b64decode(v) for k, v in data.items() if v}
    try:
        ca_pem = split_pem_bundle(raw[KEY_CA_CERT])[0]
        trusted = split_pem_bundle(raw.get(KEY_BUNDLE, b"")) or (ca_pem,)
        serving_pem = raw[KEY_TLS_CERT]
        _load(serving_pem)
    except (ValueError, IndexError) as exc:
        log.warning("certificate Secret is unreadable (%s): bootstrapping anew", exc)
        return None
    long_ago = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    annotations = annotations or {}
    return CertState(
        ca=KeyPair(ca_pem, raw[KEY_CA_KEY]),
        serving=KeyPair(serving_pem, raw[KEY_TLS_KEY]),
        trusted=trusted,
        ca_trusted_since=_parse_ts(annotations.get(ANNOTATION_CA_TRUSTED_SINCE), long_ago),
        serving_since=_parse_ts(annotations.get(ANNOTATION_SERVING_SINCE), long_ago),
    )


def bundle_fingerprints(ca_bundles: Iterable[bytes]) -> frozenset[str]:
    """CAs trusted by *every* webhook of a configuration (a CA missing in one is not trusted)."""
    sets = [frozenset(fingerprint(p) for p in split_pem_bundle(b)) for b in ca_bundles]
    if not sets:
        return frozenset()
    out = sets[0]
    for s in sets[1:]:
        out &= s
    return out


# --- Files: the kubelet's atomic update of a mounted Secret ---------------------------------


def write_tls_dir(directory: Path, files: Mapping[str, bytes]) -> bool:
    """Publish ``files`` in ``directory`` atomically; False when they were already there.

    Layout as the kubelet makes for a Secret volume: a timestamped directory, a ``..data``
    symlink swapped with one rename, and per-file symlinks through ``..data``. A reader that
    resolves ``..data`` once never sees a certificate next to the key of another; the previous
    version is kept until the next write, so such a reader does not lose its files mid-read."""
    directory.mkdir(parents=True, exist_ok=True)
    current = directory / "..data"
    if current.exists() and all(
        (current / name).is_file() and (current / name).read_bytes() == content
        for name, content in files.items()
    ):
        return False
    stamp = directory / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.time_ns()}"
    stamp.mkdir(mode=0o755)
    for name, content in files.items():
        path = stamp / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if name.endswith(".key") else 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
    tmp_link = directory / "..data_tmp"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(stamp.name, tmp_link)
    keep = {stamp.name, os.readlink(current) if current.is_symlink() else ""}
    os.replace(tmp_link, current)
    for name in files:
        link = directory / name
        if not link.is_symlink():
            tmp = directory / f".{name}.tmp"
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            os.symlink(f"..data/{name}", tmp)
            os.replace(tmp, link)
    # Keep the version just replaced (a reader may have resolved ..data to it a moment ago);
    # remove anything older.
    for old in directory.iterdir():
        if old.is_dir() and not old.is_symlink() and old.name.startswith("..") and old.name not in keep:
            for child in old.iterdir():
                child.unlink()
            old.rmdir()
    return True


def tls_files(state: CertState) -> dict[str, bytes]:
    """What the server needs on disk: its key pair and (for clients) the trust bundle."""
    return {
        KEY_TLS_CERT: state.serving.cert_pem,
        KEY_TLS_KEY: state.serving.key_pem,
        KEY_CA_CERT: state.bundle,
    }


# --- The cluster shell --------------------------------------------------------------------


class Conflict(RuntimeError):
    """Someone else changed the Secret or webhook configuration between our read and write."""


@dataclass
class ClusterCerts:
    """Reads and writes the certificate Secret and our webhook configuration's caBundle."""

    api_client: Any  #: kubernetes.client.ApiClient
    namespace: str
    secret_name: str
    webhook_config: str | None
    policy: CertPolicy
    write_dir: Path | None = None
    #: Further configurations sent to this server (its revision tags): caBundle kept in step too.
    tag_webhook_configs: tuple[str, ...] = ()
    _last_bundle: bytes | None = field(default=None, init=False, repr=False)

    def reconcile_once(
        self, *, now: dt.datetime | None = None, rotate_ca: bool = False, renew: bool = False
    ) -> Reconciled:
        """Read, step the state machine, write what changed. Raises :class:`Conflict` on a race."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        now = now or dt.datetime.now(dt.UTC)
        core = client.CoreV1Api(self.api_client)
        adm = client.AdmissionregistrationV1Api(self.api_client)
        try:
            secret = core.read_namespaced_secret(self.secret_name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            secret = None
        state = decode_secret(
            secret.data if secret else None, (secret.metadata.annotations if secret else None)
        )
        mwc = None
        if self.webhook_config:
            try:
                mwc = adm.read_mutating_webhook_configuration(self.webhook_config)
            except ApiException as exc:
                if exc.status != 404:
                    raise
        webhook_trusted = None
        if mwc is not None:
            webhook_trusted = bundle_fingerprints(
                base64.b64decode(w.client_config.ca_bundle or "") for w in (mwc.webhooks or [])
            )
        result = reconcile(
            state,
            policy=self.policy,
            now=now,
            webhook_trusted=webhook_trusted,
            rotate_ca=rotate_ca,
            renew=renew,
        )
        if result.changed:
            self._store(core, secret, result.state)
            log.info("certificates: %s", "; ".join(result.actions))
        if mwc is not None:
            self._patch_ca_bundle(adm, mwc, result.state.bundle)
        for name in self.tag_webhook_configs:
            try:
                tag_mwc = adm.read_mutating_webhook_configuration(name)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                continue  # tag not made yet (or removed): nothing to keep current
            self._patch_ca_bundle(adm, tag_mwc, result.state.bundle)
        if self.write_dir is not None and write_tls_dir(self.write_dir, tls_files(result.state)):
            log.info("certificates: published to %s", self.write_dir)
        return result

    def _store(self, core: Any, secret: Any, state: CertState) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        data, annotations = encode_secret(state)
        try:
            if secret is None:
                body = client.V1Secret(
                    metadata=client.V1ObjectMeta(
                        name=self.secret_name,
                        namespace=self.namespace,
                        annotations=annotations,
                        labels={"app.kubernetes.io/part-of": "mesh-injector"},
                    ),
                    type="Opaque",
                    data=data,
                )
                core.create_namespaced_secret(self.namespace, body)
            else:
                # Replace with the resourceVersion we read: optimistic concurrency between replicas.
                secret.data = data
                secret.metadata.annotations = {**(secret.metadata.annotations or {}), **annotations}
                core.replace_namespaced_secret(self.secret_name, self.namespace, secret)
        except ApiException as exc:
            if exc.status in (409,):
                raise Conflict(f"Secret {self.namespace}/{self.secret_name} changed meanwhile") from exc
            raise

    def _patch_ca_bundle(self, adm: Any, mwc: Any, bundle: bytes) -> bool:
        """Set every webhook's caBundle of our configuration to ``bundle``; only when it differs."""
        from kubernetes.client.exceptions import ApiException

        wanted = base64.b64encode(bundle).decode()
        ops: list[dict[str, Any]] = [
            {"op": "test", "path": "/metadata/resourceVersion", "value": mwc.metadata.resource_version}
        ]
        for index, webhook in enumerate(mwc.webhooks or []):
            if (webhook.client_config.ca_bundle or "") != wanted:
                ops.append({"op": "add", "path": f"/webhooks/{index}/clientConfig/caBundle", "value": wanted})
        if len(ops) == 1:
            return False
        try:
            adm.patch_mutating_webhook_configuration(mwc.metadata.name, ops)
        except ApiException as exc:
            if exc.status in (409, 422):  # resourceVersion test failed: re-read next pass
                raise Conflict(f"MutatingWebhookConfiguration {mwc.metadata.name} changed meanwhile") from exc
            raise
        log.info("certificates: patched caBundle of %s (%d CA)", mwc.metadata.name, bundle.count(b"BEGIN"))
        return True

    def run(
        self,
        *,
        interval: float,
        stop: Any = None,
        rotate_ca: bool = False,
        renew: bool = False,
        max_backoff: float = 60.0,
    ) -> None:
        """Reconcile every ``interval`` seconds until ``stop`` (a threading.Event) is set.

        A forced rotation/renewal applies to the first successful pass only; errors are logged
        and retried with a bounded backoff (the served certificate stays valid meanwhile)."""
        backoff = interval
        while stop is None or not stop.is_set():
            try:
                self.reconcile_once(rotate_ca=rotate_ca, renew=renew)
                rotate_ca = renew = False
                backoff = interval
            except Conflict as exc:
                log.info("certificates: %s; retrying", exc)
                backoff = min(interval, 0.5)
            except Exception as exc:  # keep serving what we have; a later pass may succeed
                log.warning("certificates: reconcile failed: %s", exc)
                backoff = min(max(backoff * 2, 1.0), max_backoff)
            if stop is not None:
                if stop.wait(backoff):
                    return
            else:
                time.sleep(backoff)
