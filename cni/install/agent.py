"""The node agent: install the plugin, keep it chained, report readiness, uninstall on SIGTERM.

One loop owns the host files. It sleeps on inotify (net dir, bin dir, token dir) with a slow
resync as a safety net, and on every wake-up reconciles: runtime + launcher, kubeconfig, chain.
When another agent keeps overwriting the chain, it stops racing: it waits until the file has
been quiet for a moment before writing again, reports "contended" (log, metric, readiness),
and so is back within a second of the other writer stopping.

Side threads, each optional: the health/metrics HTTP server, the taint remover, the pod repairer.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import signal
import threading
import time
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path

from cni.install import conflist as chain
from cni.install import health
from cni.install.files import (
    MAX_CONFIG_BYTES,
    ConfigTooLarge,
    FileChangedError,
    atomic_write,
    read_dir_files,
    read_regular,
    remove_file,
)
from cni.install.health import Status
from cni.install.inotify import DirWatcher
from cni.install.runtime import DEFAULT_PACKAGES, Runtime, RuntimeSource, build
from cni.install.state import STATE_FILE, FileRecord, InstallState
from cni.install.state import sha256 as _sha

log = logging.getLogger("mesh-cni.install")

LAUNCHER_MARK = b"# Written by `mesh-cni install`"


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent is told by flags/env (see ``cni.install`` for the flag table)."""

    cni_bin_dir: Path = Path("/opt/cni/bin")
    cni_net_dir: Path = Path("/etc/cni/net.d")
    runtime_dir: Path = Path("/opt/mesh-cni")
    state_dir: Path = Path("/var/lib/mesh-cni")
    kubeconfig: Path = Path("/var/lib/mesh-cni/kubeconfig")
    token_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    ca_file: Path | None = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
    api_server: str | None = None  # https://host:port; None: no kubeconfig, no API work
    plugin_name: str = "mesh-cni"
    packages: tuple[str, ...] = DEFAULT_PACKAGES
    entry: chain.EntryOptions = field(default_factory=chain.EntryOptions)
    keep_on_exit: bool = False
    health_address: str = "0.0.0.0"
    health_port: int | None = 8000  # None: no health server; 0: any free port
    node_name: str | None = None
    remove_taint: bool = True
    repair_mode: str = "off"  # off | label | delete
    repair_exit_codes: frozenset[int] | None = None  # validation exit codes meaning "no redirect"
    resync_s: float = 5.0
    contention_window_s: float = 10.0
    contention_threshold: int = 5  # overwrites of our install within the window
    contended_quiet_s: float = 0.5
    settle_s: float = 0.02  # coalesce a burst of inotify events into one pass
    invalid_grace_s: float = 5.0
    taint_recheck_s: float = 60.0


# --- the agent ------------------------------------------------------------------------------------


class Agent:
    """Owns the node's install; ``reconcile()`` is one idempotent pass, ``run()`` the loop."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.status = Status()
        self.state = InstallState(config.state_dir / STATE_FILE)
        self.entry = config.entry.entry()
        self._source: RuntimeSource | None = None
        self._fingerprint: str | None = None
        self._runtime = Runtime(config.runtime_dir)
        self._was_installed = False
        self._overwrites: collections.deque[float] = collections.deque()
        self._last_net_change = 0.0
        self._chained_name: str | None = None  # the file we last chained into
        self._invalid_since: float | None = None  # when that file stopped parsing
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._valid = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self.health_port: int | None = None

    # ---- pieces ----

    @property
    def launcher_path(self) -> Path:
        return self.config.cni_bin_dir / self.config.plugin_name

    def _ensure_runtime(self) -> bytes:
        """Bundle (once per fingerprint) and the launcher bytes that go into the bin dir."""
        if self._source is None:
            self._source = RuntimeSource.current(self.config.packages)
            self._fingerprint = self._source.fingerprint()
        if self._runtime.installed_fingerprint() != self._fingerprint or not self._runtime.python.exists():
            log.info("building plugin runtime under %s", self.config.runtime_dir)
            self.config.runtime_dir.mkdir(parents=True, exist_ok=True)
            self._runtime = build(self._source, self.config.runtime_dir)
            self.status.count("mesh_cni_runtime_builds_total")
        return self._runtime.launcher(shebang_ok=self._runtime.uses_patched_interpreter())

    def _current_launcher(self) -> bytes | None:
        """What is at the launcher path (None: nothing regular there), read without blocking;
        something too large to be our launcher reads as b"" (not ours)."""
        try:
            found = read_regular(self.launcher_path)
        except ConfigTooLarge:
            return b""
        return None if found is None else found[0]

    def _ensure_launcher(self, launcher: bytes) -> bool:
        if self._current_launcher() == launcher:
            return False
        self.config.cni_bin_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.launcher_path, launcher, mode=0o755, owner=(0, 0) if os.geteuid() == 0 else None)
        log.info("placed plugin launcher %s", self.launcher_path)
        return True

    def desired_kubeconfig(self) -> bytes | None:
        """None when no API server is configured; raises FileNotFoundError while the token is missing."""
        from cni.install.kubeconfig import render_kubeconfig

        if not self.config.api_server:
            return None
        token = self.config.token_file.read_text()
        ca = (
            self.config.ca_file.read_bytes() if self.config.ca_file and self.config.ca_file.exists() else None
        )
        return render_kubeconfig(server=self.config.api_server, token=token, ca_pem=ca)

    def _ensure_kubeconfig(self) -> str | None:
        """Write the plugin's kubeconfig (0600) if it changed; a problem text when it cannot."""
        try:
            desired = self.desired_kubeconfig()
        except FileNotFoundError as err:
            return f"service-account token not readable: {err.filename}"
        if desired is None:
            return None
        path = self.config.kubeconfig
        try:
            if path.read_bytes() == desired and (path.stat().st_mode & 0o777) == 0o600:
                return None
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, desired, mode=0o600)
        self.status.count("mesh_cni_kubeconfig_writes_total")
        log.info("wrote plugin kubeconfig %s", path)
        return None

    # ---- chain ----

    def _chain_files(self) -> dict[str, tuple[bytes, os.stat_result]]:
        return self._scan()[0]

    def _scan(self) -> tuple[dict[str, tuple[bytes, os.stat_result]], dict[str, int]]:
        """The net dir's config files (regular, CNI suffixes, under the size cap) and the
        oversized ones apart; FIFOs, devices and other names are never opened."""
        return read_dir_files(self.config.cni_net_dir, chain.CONFIG_SUFFIXES)

    def _plan(self) -> tuple[dict[str, tuple[bytes, os.stat_result]], chain.ChainPlan | None, str | None]:
        """(files, the chain plan, a problem text): an oversized file that sorts before the
        runtime's primary may itself be the primary, so we do not chain past it."""
        files, oversized = self._scan()
        plan = chain.plan_chain(((n, d) for n, (d, _) in files.items()), self.entry)
        for name, size in sorted(oversized.items()):
            if plan is None or name < plan.target:
                return files, None, (f"{self.config.cni_net_dir / name} is {size} bytes, over "
                                     f"MAX_CONFIG_BYTES ({MAX_CONFIG_BYTES}); not reading it")
        return files, plan, None

    def chain_installed(self) -> bool:
        _, plan, problem = self._plan()
        return problem is None and plan is not None and plan.already_installed

    def _record_original(self, name: str, data: bytes, st: os.stat_result, converted_to: str | None) -> None:
        """Remember the bytes before us, unless the file is just our own last write."""
        record = self.state.files.get(name)
        if record is not None and record.written_sha == _sha(data):
            return
        parsed = chain.parse_config(name, data)
        original = data
        if parsed is not None and chain.has_our_entry(parsed.conflist):
            # A leftover of ours (old agent, no state): the best original is the file without us.
            if record is not None:
                return
            original = chain.render(chain.without_our_entry(parsed.conflist))
        path = self.config.cni_net_dir / name
        self.state.files[name] = FileRecord(
            original,
            st.st_mode & 0o7777,
            st.st_uid,
            st.st_gid,
            converted_to=converted_to,
            link=os.readlink(path) if path.is_symlink() else None,
        )

    def _install_chain(self) -> str | None:
        """One attempt to chain into the primary config; a reason text while we cannot."""
        files, plan, problem = self._plan()
        held = self._hold_for_rewrite(files)
        if held or problem:
            return held or problem
        if plan is None:
            return f"no valid CNI network config in {self.config.cni_net_dir} yet"
        net = self.config.cni_net_dir
        if not plan.already_installed:
            if plan.replaces is not None:
                data, st = files[plan.replaces]
                self._record_original(plan.replaces, data, st, plan.target)
                self.state.files[plan.replaces].written_sha = _sha(plan.content)
                self.state.files[plan.replaces].converted_to = plan.target
                self.state.save()
                atomic_write(
                    net / plan.target, plan.content, mode=st.st_mode & 0o7777, owner=(st.st_uid, st.st_gid)
                )
                remove_file(net / plan.replaces)  # a symlink goes as a link; uninstall puts it back
                log.info("converted %s to %s and chained mesh-cni", plan.replaces, plan.target)
            else:
                data, st = files[plan.target]
                self._record_original(plan.target, data, st, None)
                self.state.files[plan.target].written_sha = _sha(plan.content)
                self.state.save()
                try:
                    atomic_write(net / plan.target, plan.content, expect_unchanged=st, through_links=True)
                except FileChangedError:
                    return f"{plan.target} changed while we wrote it; retrying"
                log.info("chained mesh-cni into %s", plan.target)
            self.status.count("mesh_cni_install_writes_total")
        self._chained_name = plan.target
        # Any other file still carrying our entry (an old primary) gets its own content back.
        for name in sorted(self._chain_files()):
            if name != plan.target:
                self._unchain(name)
        return None

    def _hold_for_rewrite(self, files: dict[str, tuple[bytes, os.stat_result]]) -> str | None:
        """Wait while the file we chained into is unparseable: an agent writing in place
        (truncate, then write) shows a torn file for a moment, and acting on that would move us
        to the next file in the dir. After ``invalid_grace_s`` we accept it is really gone."""
        name = self._chained_name
        if name is None or name not in files or chain.parse_config(name, files[name][0]) is not None:
            self._invalid_since = None
            return None
        now = time.monotonic()
        if self._invalid_since is None:
            self._invalid_since = now
        if now - self._invalid_since < self.config.invalid_grace_s:
            return f"{name} is not a valid config right now (being rewritten?); waiting"
        return None

    def _unchain(self, name: str) -> None:
        """Give a net-dir file back its pre-install content (exact bytes when untouched since)."""
        try:
            self._restore(name)
        except ConfigTooLarge as err:
            log.warning("leaving %s alone: %s", err.filename, err.strerror)

    def _restore(self, name: str) -> None:
        net = self.config.cni_net_dir
        record = self.state.files.get(name)
        if record is not None and record.converted_to:
            target = net / record.converted_to
            found = read_regular(target)
            current = None if found is None else found[0]
            if current is not None and _sha(current) == record.written_sha:
                if not os.path.lexists(net / name):
                    self._put_back(net / name, record)
                remove_file(target)
                self.state.files.pop(record.converted_to, None)
            elif current is not None:
                self._strip_entry(record.converted_to, current)
            del self.state.files[name]
            self.state.save()
            return
        path = net / name
        found = read_regular(path)
        if found is None:
            if record is not None:
                del self.state.files[name]
                self.state.save()
            return
        current = found[0]
        if record is not None and _sha(current) == record.written_sha:
            atomic_write(
                path, record.original, mode=record.mode, owner=(record.uid, record.gid), through_links=True
            )
        else:
            self._strip_entry(name, current)
        if record is not None:
            del self.state.files[name]
            self.state.save()

    @staticmethod
    def _put_back(path: Path, record: FileRecord) -> None:
        """Recreate a file we removed: the symlink it was, or its exact bytes and mode."""
        if record.link is not None:
            os.symlink(record.link, path)
            return
        atomic_write(path, record.original, mode=record.mode, owner=(record.uid, record.gid))

    def _strip_entry(self, name: str, current: bytes) -> None:
        parsed = chain.parse_config(name, current)
        if parsed is not None and parsed.is_conflist and chain.has_our_entry(parsed.conflist):
            atomic_write(
                self.config.cni_net_dir / name,
                chain.render(chain.without_our_entry(parsed.conflist)),
                through_links=True,
            )

    # ---- reconcile / verify ----

    def reconcile(self) -> tuple[bool, str]:
        """One idempotent install pass; (valid, reason)."""
        launcher = self._ensure_runtime()
        if self._ensure_launcher(launcher):
            self.status.count("mesh_cni_binary_writes_total")
        problem = self._ensure_kubeconfig()
        chain_problem = self._install_chain()
        return self.verify(launcher, problem or chain_problem)

    def verify(self, launcher: bytes | None = None, problem: str | None = None) -> tuple[bool, str]:
        if problem:
            return False, problem
        current = self._current_launcher()
        if current is None:
            return False, f"{self.launcher_path} missing"
        if launcher is not None and current != launcher:
            return False, f"{self.launcher_path} is not our launcher"
        if not os.access(self.launcher_path, os.X_OK):
            return False, f"{self.launcher_path} missing or not executable"
        if not self._runtime.python.exists():
            return False, f"runtime missing under {self.config.runtime_dir}"
        if not self.chain_installed():
            return False, "mesh-cni is not last in the primary CNI config"
        return True, "installed"

    # ---- uninstall ----

    def uninstall(self) -> None:
        """Remove exactly what we added: our entry (exact old bytes), binary, kubeconfig, runtime."""
        net = self.config.cni_net_dir
        names = set(self.state.files) | set(self._chain_files())
        for name in sorted(names):
            if name in self.state.files or (net / name).exists():
                self._unchain(name)
        lines = (self._current_launcher() or b"").split(b"\n", 2)
        if len(lines) > 1 and lines[1].startswith(LAUNCHER_MARK):
            remove_file(self.launcher_path)
        remove_file(self.config.kubeconfig)
        import shutil

        if (self.config.runtime_dir / "current").is_symlink():
            shutil.rmtree(self.config.runtime_dir / "versions", ignore_errors=True)
            remove_file(self.config.runtime_dir / "current")
            with contextlib.suppress(OSError):
                self.config.runtime_dir.rmdir()
        remove_file(self.state.path)
        for directory in (self.config.state_dir, self.config.kubeconfig.parent):
            with contextlib.suppress(OSError):
                directory.rmdir()  # only when empty: never someone else's files
        log.info("uninstalled mesh-cni from %s and %s", net, self.config.cni_bin_dir)

    # ---- the loop ----

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _note_overwrite(self, now: float) -> bool:
        """Count an external overwrite of our install; True while contended."""
        self._overwrites.append(now)
        self.status.count("mesh_cni_install_overwrites_total")
        return self._contended(now)

    def _contended(self, now: float) -> bool:
        window = self.config.contention_window_s
        while self._overwrites and now - self._overwrites[0] > window:
            self._overwrites.popleft()
        return len(self._overwrites) >= self.config.contention_threshold

    def start_health(self) -> None:
        if self.config.health_port is None:
            return
        self._server, thread = health.serve(self.status, self.config.health_address, self.config.health_port)
        self.health_port = self._server.server_address[1]
        self._threads.append(thread)

    def start_kube_workers(self) -> None:
        """Taint removal and repair threads, seeing us only through explicit stop/valid events."""
        from cni.kube import KubeApi
        from cni.repair import Signals, WorkerConfig, start_workers

        config = self.config
        if not config.api_server or not config.node_name:
            if config.remove_taint or config.repair_mode != "off":
                log.warning("no API server or NODE_NAME: taint removal and repair are off")
            return
        ca = str(config.ca_file) if config.ca_file and config.ca_file.exists() else None
        api = KubeApi(config.api_server, str(config.token_file), ca)
        workers = WorkerConfig(
            node=config.node_name,
            remove_taint=config.remove_taint,
            repair_mode=config.repair_mode,
            repair_exit_codes=config.repair_exit_codes,
            taint_recheck_s=config.taint_recheck_s,
        )
        self._threads += start_workers(api, workers, Signals(self._stop, self._valid, self.status.count))

    def run(self, *, once: bool = False, once_timeout_s: float = 60.0) -> int:
        """Reconcile until stopped (or, with ``once``, until valid / timeout); uninstall on stop."""
        watcher = DirWatcher()
        started = time.monotonic()
        try:
            next_resync = 0.0
            pending = True
            contended_logged = False
            while not self._stop.is_set():
                for directory in self._watch_dirs():
                    watcher.watch(directory)
                now = time.monotonic()
                contended = self._contended(now)
                quiet_needed = self.config.contended_quiet_s if contended else self.config.settle_s
                quiet_left = quiet_needed - (now - self._last_net_change)
                if (pending or now >= next_resync) and quiet_left <= 0:
                    pending = False
                    next_resync = now + self.config.resync_s
                    valid, reason = self._pass(now)
                    contended = self._contended(now)
                    if self._invalid_since is not None:  # re-check when the grace period ends
                        next_resync = min(
                            next_resync, self._invalid_since + self.config.invalid_grace_s + 0.01
                        )
                    if contended and not contended_logged:
                        log.warning(
                            "another agent keeps overwriting the CNI config (%d times in %.0fs); "
                            "re-installing only once it is quiet",
                            len(self._overwrites),
                            self.config.contention_window_s,
                        )
                    contended_logged = contended
                    if contended:
                        valid, reason = False, f"contended: {reason}"
                    self.status.set(valid, reason, contended)
                    if valid:
                        self._valid.set()
                    else:
                        self._valid.clear()
                    if once and self.verify()[0]:
                        return 0
                if once and now - started > once_timeout_s:
                    log.error("not installed after %.0fs: %s", once_timeout_s, self.status.reason)
                    return 1
                timeout = quiet_left if pending and quiet_left > 0 else max(0.0, next_resync - now)
                if once:
                    timeout = min(timeout, max(0.0, once_timeout_s - (now - started)) + 0.01)
                readable, _, _ = select.select([watcher, self._wake_r], [], [], timeout)
                if watcher in readable:
                    changed = watcher.drain()
                    if changed - {self.config.token_file.parent}:
                        self._last_net_change = time.monotonic()
                        if contended and not self.chain_installed():
                            # Still being fought over: keep backing off until it is quiet.
                            self._note_overwrite(self._last_net_change)
                            self._valid.clear()
                            self.status.set(False, "contended: waiting for the CNI config to be quiet", True)
                    pending = True
                if self._wake_r in readable:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 64)
            return 0
        finally:
            watcher.close()

    def _watch_dirs(self) -> list[Path]:
        """The dirs to watch; for one that does not exist yet, its nearest existing parent (so
        its creation wakes us too)."""
        dirs = [self.config.cni_net_dir, self.config.cni_bin_dir]
        if self.config.api_server:
            dirs.append(self.config.token_file.parent)
        out = []
        for directory in dirs:
            while not directory.is_dir() and directory.parent != directory:
                directory = directory.parent
            out.append(directory)
        return out

    def _pass(self, now: float) -> tuple[bool, str]:
        was = self._was_installed
        if was and not self.chain_installed():
            self._note_overwrite(now)
        try:
            valid, reason = self.reconcile()
        except OSError as err:
            valid, reason = False, f"install failed: {err}"
            log.warning("%s", reason)
        if valid and not was:
            log.info("install valid: %s", reason)
        elif not valid and (was or reason != self.status.reason):
            log.warning("install not valid: %s", reason)
        if valid and was is False and self._overwrites:
            self.status.count("mesh_cni_install_reinstalls_total")
        self._was_installed = valid
        return valid, reason

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def install_signal_handlers(agent: Agent) -> None:
    def handle(signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        agent.stop()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
