"""Certificate bootstrap and rotation as a state machine, checked with real TLS handshakes.

The clock is a parameter of `injector.certs.reconcile` (no fake clock object): each step is
given the time it runs at, so a year of rotations runs in milliseconds. What the tests assert
is what the API server would notice: every certificate a replica may still be serving is
trusted by the caBundle published at that moment.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import random
import socket
import ssl
import threading
from pathlib import Path

import pytest

from injector import certs
from injector.certs import CertPolicy, CertState, reconcile

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
NAMES = ("mesh-injector.mesh-system.svc", "127.0.0.1")


def policy(**changes: object) -> CertPolicy:
    base = CertPolicy(
        names=NAMES,
        ca_validity=dt.timedelta(hours=12),
        cert_validity=dt.timedelta(hours=3),
        settle=dt.timedelta(seconds=30),
        overlap=dt.timedelta(minutes=5),
    )
    return dataclasses.replace(base, **changes)


def handshake(serving: certs.KeyPair, bundle: bytes, server_name: str = "127.0.0.1") -> bool:
    """A real TLS handshake on loopback: server presents `serving`, client trusts only `bundle`."""
    tmp = Path(f"/tmp/mesh-certs-{threading.get_ident()}-{random.random()}")
    tmp.mkdir()
    try:
        (tmp / "c").write_bytes(serving.cert_pem)
        (tmp / "k").write_bytes(serving.key_pem)
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(tmp / "c", tmp / "k")
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    client_ctx = ssl.create_default_context(cadata=bundle.decode())
    # The certificates are dated in 2030: verify against the chain, not today's clock.
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    outcome: dict[str, BaseException | None] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError) as exc:
            outcome["server"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_name),
        ):
            return True
    except ssl.SSLCertVerificationError as exc:
        if "not yet valid" in str(exc):
            raise
        return False
    finally:
        thread.join(5)
        listener.close()


def trusted(serving: certs.KeyPair, state: CertState) -> bool:
    """Chain check without the wall clock (the test timeline is in 2030)."""
    return any(certs.signed_by(serving.cert_pem, ca) for ca in state.trusted)


def test_bootstrap_gives_a_certificate_the_bundle_trusts_over_tls() -> None:
    now = dt.datetime.now(dt.UTC)
    result = reconcile(None, policy=policy(), now=now)
    assert result.actions == ("bootstrap",)
    state = result.state
    assert certs.cert_names(state.serving.cert_pem) == frozenset(NAMES)
    assert handshake(state.serving, state.bundle, "127.0.0.1")
    assert handshake(state.serving, state.bundle, "mesh-injector.mesh-system.svc")
    other = reconcile(None, policy=policy(), now=now).state
    assert not handshake(state.serving, other.bundle), "another CA must not trust our certificate"


def test_nothing_to_do_means_no_change() -> None:
    state = reconcile(None, policy=policy(), now=T0).state
    again = reconcile(state, policy=policy(), now=T0 + dt.timedelta(minutes=30), webhook_trusted=None)
    assert not again.changed and again.state == state


def test_serving_certificate_renewed_before_expiry_by_the_same_ca() -> None:
    p = policy()
    state = reconcile(None, policy=p, now=T0).state
    due = T0 + p.cert_validity - p.cert_due() + dt.timedelta(seconds=1)
    result = reconcile(
        state, policy=p, now=due, webhook_trusted=frozenset({certs.fingerprint(state.ca.cert_pem)})
    )
    assert any(a.startswith("issue-serving-cert (expiring") for a in result.actions)
    assert result.state.trusted == state.trusted, "same CA: the caBundle must not change"
    assert result.state.serving != state.serving and trusted(result.state.serving, result.state)


def test_names_change_reissues() -> None:
    state = reconcile(None, policy=policy(), now=T0).state
    result = reconcile(state, policy=policy(names=(*NAMES, "extra.example")), now=T0)
    assert "extra.example" in certs.cert_names(result.state.serving.cert_pem)


def test_ca_rotation_keeps_both_cas_until_the_new_certificate_has_propagated() -> None:
    p = policy()
    old = reconcile(None, policy=p, now=T0).state
    old_fp = certs.fingerprint(old.ca.cert_pem)
    t = T0 + dt.timedelta(hours=1)

    # 1. New CA joins the bundle; the served certificate is still the old one, still trusted.
    step1 = reconcile(old, policy=p, now=t, webhook_trusted=frozenset({old_fp}), rotate_ca=True)
    assert "rotate-ca" in step1.actions
    s1 = step1.state
    new_fp = certs.fingerprint(s1.ca.cert_pem)
    assert [certs.fingerprint(c) for c in s1.trusted] == [old_fp, new_fp]
    assert s1.serving == old.serving and trusted(old.serving, s1)

    # 2. The webhook has not got the new CA yet: the new CA must not sign the served certificate.
    step2 = reconcile(s1, policy=p, now=t + dt.timedelta(minutes=1), webhook_trusted=frozenset({old_fp}))
    assert step2.state.serving == old.serving and step2.waiting

    # 3. The webhook has it, but only just: still waiting for it to settle.
    both = frozenset({old_fp, new_fp})
    step3 = reconcile(s1, policy=p, now=t + dt.timedelta(seconds=5), webhook_trusted=both)
    assert step3.state.serving == old.serving

    # 4. Settled: a certificate from the new CA; the old CA stays for replicas still serving the old one.
    t4 = t + p.settle
    s4 = reconcile(s1, policy=p, now=t4, webhook_trusted=both).state
    assert certs.signed_by(s4.serving.cert_pem, s4.ca.cert_pem)
    assert trusted(old.serving, s4) and trusted(s4.serving, s4)

    # 5. Within the overlap nothing is retired; after it, the old CA goes.
    s5 = reconcile(s4, policy=p, now=t4 + p.overlap - dt.timedelta(seconds=1), webhook_trusted=both).state
    assert len(s5.trusted) == 2
    step6 = reconcile(s5, policy=p, now=t4 + p.overlap, webhook_trusted=both)
    assert any(a.startswith("retire-ca") for a in step6.actions)
    assert [certs.fingerprint(c) for c in step6.state.trusted] == [new_fp]
    assert trusted(step6.state.serving, step6.state) and not trusted(old.serving, step6.state)


def test_ca_rotation_over_real_tls() -> None:
    """The same sequence at today's date, each published (certificate, caBundle) pair checked
    with a real handshake, as the API server would do it."""
    p = policy(settle=dt.timedelta(0), overlap=dt.timedelta(0))
    now = dt.datetime.now(dt.UTC)
    s0 = reconcile(None, policy=p, now=now).state
    s1 = reconcile(
        s0, policy=p, now=now, rotate_ca=True, webhook_trusted=frozenset({certs.fingerprint(s0.ca.cert_pem)})
    ).state
    assert handshake(s0.serving, s1.bundle)  # the old certificate under the widened bundle
    live = frozenset(certs.fingerprint(c) for c in s1.trusted)
    s2 = reconcile(s1, policy=p, now=now, webhook_trusted=live).state
    assert s2.serving != s0.serving
    assert handshake(s2.serving, s1.bundle), "the new certificate is trusted by the bundle already published"
    s3 = reconcile(s2, policy=p, now=now, webhook_trusted=live).state
    assert handshake(s2.serving, s3.bundle) and not handshake(s0.serving, s3.bundle)


def test_a_year_of_automatic_rotations_never_leaves_a_served_certificate_untrusted() -> None:
    """Random reconcile intervals over a long timeline. The API server's view lags one pass (the
    caBundle it uses is the one published by the previous pass); replicas pick up a new serving
    certificate up to `lag` after it is stored. Invariant: whatever any replica serves verifies
    against the caBundle the API server uses."""
    rng = random.Random(6)
    p = policy(overlap=dt.timedelta(minutes=5), settle=dt.timedelta(seconds=30))
    lag = dt.timedelta(minutes=3)  # < overlap: the promise the overlap makes
    now = T0
    state = reconcile(None, policy=p, now=now).state
    webhook_bundle = state.trusted  # published right after bootstrap
    served_since: list[tuple[certs.KeyPair, dt.datetime]] = [(state.serving, now)]
    rotations = renewals = 0
    end = T0 + dt.timedelta(days=3)
    while now < end:
        now += dt.timedelta(seconds=rng.randint(5, 600))
        fps = frozenset(certs.fingerprint(c) for c in webhook_bundle)
        result = reconcile(state, policy=p, now=now, webhook_trusted=fps)
        rotations += "rotate-ca" in result.actions
        renewals += any(a.startswith("issue-serving-cert") for a in result.actions)
        if result.state.serving != state.serving:
            served_since.append((result.state.serving, now))
        state = result.state
        webhook_bundle = state.trusted  # the shell patches the caBundle after storing the Secret
        # Certificates a replica may still serve: the current one and any replaced less than `lag` ago.
        in_use = [
            cert
            for i, (cert, _) in enumerate(served_since)
            if i == len(served_since) - 1 or now - served_since[i + 1][1] < lag
        ]
        for cert in in_use:
            assert any(certs.signed_by(cert.cert_pem, ca) for ca in webhook_bundle), now
        assert len(state.trusted) <= 2
        assert certs.cert_names(state.serving.cert_pem) == frozenset(NAMES)
        assert state.serving.not_after > now
    assert rotations >= 4 and renewals >= 20


def test_secret_round_trip_and_empty_secret_means_bootstrap() -> None:
    state = reconcile(None, policy=policy(), now=T0).state
    data, annotations = certs.encode_secret(state)
    assert set(data) == {"tls.crt", "tls.key", "ca.crt", "ca.key", "ca-bundle.crt"}
    assert certs.decode_secret(data, annotations) == state
    assert certs.decode_secret(None, None) is None
    assert certs.decode_secret({}, {}) is None
    assert certs.decode_secret({"tls.crt": data["tls.crt"]}, {}) is None


def test_published_files_swap_atomically(tmp_path: Path) -> None:
    """Republishing never exposes a torn or missing file, and a reader that resolves ``..data``
    once (as a mounted Secret is read) always gets a matching pair. Reading the two top-level
    links separately can straddle a swap (like a kubelet-updated Secret): the server's reloader
    retries such a pair, so that is the one retryable outcome allowed here."""
    a = reconcile(None, policy=policy(), now=dt.datetime.now(dt.UTC)).state
    b = reconcile(a, policy=policy(), now=dt.datetime.now(dt.UTC), renew=True).state
    assert certs.write_tls_dir(tmp_path, certs.tls_files(a))
    assert not certs.write_tls_dir(tmp_path, certs.tls_files(a)), "unchanged files are not rewritten"
    stop = threading.Event()
    broken: list[str] = []
    pairs = straddled = 0

    def reader() -> None:
        nonlocal pairs, straddled
        while not stop.is_set():
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            snapshot = Path(os.path.realpath(tmp_path / "..data"))
            try:
                ctx.load_cert_chain(snapshot / "tls.crt", snapshot / "tls.key")
                pairs += 1
            except FileNotFoundError:
                pass  # that version was just removed: resolve again
            except ssl.SSLError as exc:
                broken.append(f"snapshot: {exc!r}")
            try:
                ctx.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
            except ssl.SSLError as exc:
                if "KEY_VALUES_MISMATCH" in str(exc):
                    straddled += 1
                else:
                    broken.append(f"links: {exc!r}")
            except FileNotFoundError:
                # Resolved ..data to a version two writes old, removed meanwhile: only possible
                # with back-to-back writes like here; retried like a straddled pair.
                straddled += 1

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(200):
        certs.write_tls_dir(tmp_path, certs.tls_files(b if i % 2 == 0 else a))
    stop.set()
    thread.join()
    assert not broken, broken[:3]
    assert pairs > 0
    final = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    final.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    assert (tmp_path / "tls.crt").read_bytes() == a.serving.cert_pem  # the last one written (i=199)
    entries = {p.name for p in tmp_path.iterdir()}
    assert {"tls.crt", "tls.key", "ca.crt", "..data"} <= entries
    versions = [e for e in entries if e.startswith("..") and e != "..data"]
    assert len(versions) == 2, f"the current and the previous version only: {versions}"


@pytest.mark.parametrize(
    ("text", "seconds"), [("90d", 90 * 86400), ("12h", 43200), ("30m", 1800), ("45s", 45), ("7", 7)]
)
def test_cli_durations(text: str, seconds: int) -> None:
    from injector.commands.certs import _duration

    assert _duration(text).total_seconds() == seconds
