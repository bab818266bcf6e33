"""What the installer changed on the host, persisted so uninstall gives back the exact bytes.

The record lives under the state dir (a host path), so a restarted agent, or `mesh-cni
uninstall` run later, still restores what an earlier agent changed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cni.install.files import atomic_write

STATE_FILE = "install-state.json"




def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class FileRecord:
    """A net-dir file we changed: its bytes/mode before us and the bytes we wrote."""

    original: bytes
    mode: int
    uid: int
    gid: int
    written_sha: str = ""
    converted_to: str | None = None  # a .conf we replaced by this .conflist
    link: str | None = None  # the name was a symlink to this target (restored as a link)

    def to_json(self) -> dict[str, Any]:
        return {
            "link": self.link,
            "original": base64.b64encode(self.original).decode(),
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "written_sha": self.written_sha,
            "converted_to": self.converted_to,
        }

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> FileRecord:
        return cls(
            original=base64.b64decode(body["original"]),
            mode=int(body["mode"]),
            uid=int(body["uid"]),
            gid=int(body["gid"]),
            written_sha=body.get("written_sha", ""),
            converted_to=body.get("converted_to"),
            link=body.get("link"),
        )


class InstallState:
    """Persisted under the state dir (a host path) so a restarted agent still restores exactly."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: dict[str, FileRecord] = {}
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
            body = json.loads(path.read_bytes())
            self.files = {name: FileRecord.from_json(rec) for name, rec in body.get("files", {}).items()}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {"files": {name: rec.to_json() for name, rec in sorted(self.files.items())}}
        atomic_write(self.path, json.dumps(body, indent=1).encode(), mode=0o600)
