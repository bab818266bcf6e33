"""A self-contained Python runtime for the plugin on hosts that have no Python.

The container runtime starts the plugin on the host, outside our image. So we copy the image's
interpreter, the shared libraries it links (the dynamic loader and libc included, so the host's
glibc version does not matter), the standard library minus what the plugin never uses, and the
plugin's own packages (``cni``, ``pyroute2``) under a host directory, e.g.::

    /opt/mesh-cni/current -> versions/<fingerprint>/
        bin/python3            ELF interpreter path + RUNPATH patched to point into the bundle
        lib/                   ld-linux, libc, libm, libpython, ... (what ``ldd`` says)
        lib/python3.11/        stdlib subset + lib-dynload
        site/                  cni, pyroute2

and write a launcher into the CNI bin dir: a Python script whose ``#!`` names the bundled
interpreter by absolute path, so neither a host Python nor a host ``/bin/sh`` is needed. When
``patchelf`` is not available the launcher falls back to a ``/bin/sh`` script that starts the
bundled loader explicitly.

Versions are built side by side and switched with an atomic symlink rename, so a plugin
process starting during an upgrade sees one whole runtime or the other.
"""

from __future__ import annotations

import compileall
import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: Bump when the bundle layout changes so old bundles get rebuilt.
LAYOUT_VERSION = "1"
DEFAULT_PACKAGES: tuple[str, ...] = ("cni", "pyroute2")
LDD = "ldd"
#: Stdlib parts the plugin never imports (GUI, tests, packaging tools, docs).
STDLIB_SKIP_DIRS = frozenset(
    {
        "test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "pydoc_data",
        "site-packages",
        "dist-packages",
        "venv",
        "__phello__",
        "distutils",
    }
)
STDLIB_SKIP_PREFIXES = ("config-",)
#: Extension modules that drag in big libraries the plugin never needs.
DYNLOAD_SKIP = re.compile(r"^(_tkinter|_curses.*|readline|_dbm|_gdbm|_test.*|xx.*|_ctypes_test)\.")


@dataclass(frozen=True)
class RuntimeSource:
    """Where the running interpreter's parts are (the image's, when run in the DaemonSet)."""

    executable: Path
    stdlib: Path
    dynload: Path
    packages: tuple[tuple[str, Path], ...]  # (import name, directory)

    @classmethod
    def current(cls, packages: Iterable[str] = DEFAULT_PACKAGES) -> RuntimeSource:
        stdlib = Path(sysconfig.get_path("stdlib"))
        dynload = Path(sysconfig.get_path("platstdlib")) / "lib-dynload"
        if not dynload.is_dir():
            dynload = stdlib / "lib-dynload"
        found: list[tuple[str, Path]] = []
        for name in packages:
            spec = importlib.util.find_spec(name)
            if spec is None or not spec.submodule_search_locations:
                raise RuntimeError(f"package {name} is not importable; cannot bundle it")
            found.append((name, Path(next(iter(spec.submodule_search_locations)))))
        return cls(Path(os.path.realpath(sys.executable)), stdlib, dynload, tuple(found))

    def fingerprint(self) -> str:
        """Changes whenever the interpreter or a bundled package file changes (cheap: stats only)."""
        digest = hashlib.sha256(f"{LAYOUT_VERSION}|{sys.version}|".encode())
        st = self.executable.stat()
        digest.update(f"{self.executable}|{st.st_size}|{st.st_mtime_ns}|".encode())
        for name, directory in self.packages:
            for path in sorted(directory.rglob("*.py")):
                pst = path.stat()
                digest.update(
                    f"{name}|{path.relative_to(directory)}|{pst.st_size}|{pst.st_mtime_ns}|".encode()
                )
        return digest.hexdigest()[:16]


def _shared_libs(elves: list[Path]) -> tuple[list[Path], Path | None]:
    """(libraries, dynamic loader) that ``elves`` load, as resolved on this machine (one ldd run)."""
    out = subprocess.run([LDD, *map(str, elves)], capture_output=True, text=True, check=False).stdout
    libs: list[Path] = []
    loader: Path | None = None
    for line in out.splitlines():
        if not line.startswith(("\t", " ")):
            continue  # "file:" header lines
        line = line.strip()
        if "=>" in line:
            target = line.split("=>", 1)[1].strip().split(" (", 1)[0]
            if target.startswith("/"):
                libs.append(Path(target))
        elif line.startswith("/"):
            loader = Path(line.split(" (", 1)[0])
    return libs, loader


_DT_RPATH, _DT_RUNPATH, _PT_DYNAMIC = 15, 29, 2


def _has_search_path(elf: Path) -> bool:
    """Whether a 64-bit little-endian ELF carries DT_RPATH/DT_RUNPATH (parsed here: no tool per file)."""
    data = elf.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for index in range(phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + index * phentsize
        )
        if p_type != _PT_DYNAMIC:
            continue
        for entry in range(p_offset, p_offset + p_filesz, 16):
            tag, _value = struct.unpack_from("<qQ", data, entry)
            if tag in (_DT_RPATH, _DT_RUNPATH):
                return True
            if tag == 0:
                break
    return False


def _copy_tree(src: Path, dst: Path, *, top_skip: frozenset[str] = frozenset()) -> None:
    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = {n for n in names if n.endswith((".opt-1.pyc", ".opt-2.pyc"))}
        if Path(directory) == src:
            skipped |= {n for n in names if n in top_skip or n.startswith(STDLIB_SKIP_PREFIXES)}
            skipped.add("lib-dynload")
        return skipped

    shutil.copytree(src, dst, ignore=ignore, symlinks=False, dirs_exist_ok=True)


def _patchelf(args: list[str]) -> None:
    subprocess.run(["patchelf", *args], check=True, capture_output=True)


@dataclass(frozen=True)
class Runtime:
    """An installed bundle: ``root/current`` points at the active version."""

    root: Path

    @property
    def current(self) -> Path:
        return self.root / "current"

    @property
    def python(self) -> Path:
        return self.current / "bin" / "python3"

    @property
    def site(self) -> Path:
        return self.current / "site"

    def installed_fingerprint(self) -> str | None:
        """The active bundle's fingerprint; None if absent or built for another path (the
        interpreter's loader and library paths are absolute, so a moved bundle is broken)."""
        try:
            if (self.current / "ROOT").read_text() != str(self.root):
                return None
            return (self.current / "FINGERPRINT").read_text().strip()
        except OSError:
            return None

    def launcher(self, *, shebang_ok: bool) -> bytes:
        """The file placed in the CNI bin dir as ``mesh-cni``."""
        if shebang_ok:
            return (
                f"#!{self.python} -IBS\n"
                "# Written by `mesh-cni install`: runs the bundled runtime, never a host Python.\n"
                "import sys\n"
                f"sys.path.insert(0, {str(self.site)!r})\n"
                "from cni.cli import main\n"
                "sys.exit(main())\n"
            ).encode()
        loader = self.current / "lib" / "ld.so"
        return (
            "#!/bin/sh\n"
            "# Written by `mesh-cni install`: runs the bundled runtime, never a host Python.\n"
            f'exec "{loader}" --library-path "{self.current}/lib" "{self.python}" -IBS '
            f'"{self.current}/launch.py" "$@"\n'
        ).encode()

    def uses_patched_interpreter(self) -> bool:
        return (self.current / "PATCHED").exists()


def build(source: RuntimeSource, root: Path) -> Runtime:
    """Build (or reuse) the bundle for ``source`` under ``root`` and point ``current`` at it."""
    runtime = Runtime(root)
    fingerprint = source.fingerprint()
    if runtime.installed_fingerprint() == fingerprint:
        return runtime
    versions = root / "versions"
    final = versions / fingerprint
    if not (final / "FINGERPRINT").exists() or (final / "ROOT").read_text() != str(root):
        tmp = versions / f".build-{fingerprint}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _build_into(source, tmp, final, fingerprint)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    link_tmp = root / f".current.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(link_tmp)
    os.symlink(Path("versions") / fingerprint, link_tmp)
    os.rename(link_tmp, runtime.current)
    _prune(versions, keep={fingerprint})
    return runtime


def _prune(versions: Path, *, keep: set[str]) -> None:
    """Drop old versions, but keep one previous one a starting plugin process may still be using."""
    old = sorted(
        (p for p in versions.iterdir() if p.name not in keep and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
    )
    for path in old[:-1]:
        shutil.rmtree(path, ignore_errors=True)


def _build_into(source: RuntimeSource, tmp: Path, final: Path, fingerprint: str) -> None:
    bin_dir, lib_dir = tmp / "bin", tmp / "lib"
    bin_dir.mkdir(parents=True)
    lib_dir.mkdir()
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    python = bin_dir / "python3"
    shutil.copy2(source.executable, python)
    stdlib_dst = lib_dir / version
    _copy_tree(source.stdlib, stdlib_dst, top_skip=STDLIB_SKIP_DIRS)
    dynload_dst = stdlib_dst / "lib-dynload"
    dynload_dst.mkdir(exist_ok=True)
    modules = [p for p in source.dynload.iterdir() if p.suffix == ".so" and not DYNLOAD_SKIP.match(p.name)]
    for module in modules:
        shutil.copy2(module, dynload_dst / module.name)
    site = tmp / "site"
    for name, directory in source.packages:
        # copy2 keeps mtimes, so the image's own bytecode stays valid; compile only what is missing.
        shutil.copytree(directory, site / name, ignore=shutil.ignore_patterns("*.opt-?.pyc"))
    compileall.compile_dir(site, quiet=1, workers=1)

    libs: dict[str, Path] = {}
    found, loader = _shared_libs([source.executable, *modules])
    for lib in found:
        libs.setdefault(lib.name, lib)
    for name, lib in libs.items():
        shutil.copy2(os.path.realpath(lib), lib_dir / name)
    if loader is None:
        raise RuntimeError(f"cannot find the dynamic loader of {source.executable}")
    shutil.copy2(os.path.realpath(loader), lib_dir / "ld.so")

    (tmp / "launch.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(final / 'site')!r})\n"
        "from cni.cli import main\n"
        "sys.exit(main())\n"
    )
    if shutil.which("patchelf"):
        # Absolute paths through the `current` link: $ORIGIN needs /proc, which a host may lack.
        current = final.parent.parent / "current"
        _patchelf(
            [
                "--set-interpreter",
                str(current / "lib" / "ld.so"),
                "--force-rpath",
                "--set-rpath",
                str(current / "lib"),
                str(python),
            ]
        )
        # Objects with their own RUNPATH would not inherit the interpreter's RPATH: repoint them.
        for lib in lib_dir.iterdir():
            if lib.name != "ld.so" and lib.is_file() and _has_search_path(lib):
                _patchelf(["--force-rpath", "--set-rpath", str(current / "lib"), str(lib)])
        for module in dynload_dst.iterdir():
            if _has_search_path(module):
                _patchelf(["--force-rpath", "--set-rpath", str(current / "lib"), str(module)])
        (tmp / "PATCHED").write_text("interpreter and rpath point into the bundle\n")
    (tmp / "ROOT").write_text(str(final.parent.parent))
    (tmp / "FINGERPRINT").write_text(fingerprint + "\n")
