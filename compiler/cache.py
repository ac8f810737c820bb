"""The persistent compile cache: Inductor artifacts under kiln's own keys.

Artifacts are code that kiln loads and runs, so the directory must belong to the current
user and be writable by nobody else. Every entry carries the SHA-256 of its bytes and is
verified before loading; a corrupt or partial entry is deleted and rebuilt, never loaded.
Entries are written to a temporary name and renamed into place. Inductor's and Triton's
kernel builds live in subdirectories (see compiler/inductor.py), under the same checks."""

import hashlib
import json
import logging
import os
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .inductor import load_artifact, save_artifact

logger = logging.getLogger("kiln")


class UnsafeCacheDirError(PermissionError):
    pass


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class CacheEntry:
    key: str
    size_bytes: int
    created: float
    is_valid: bool


class CompileCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._check_safe()

    def _check_safe(self) -> None:
        info = self.root.stat()
        if info.st_uid != os.getuid():
            raise UnsafeCacheDirError(f"compile cache {self.root} belongs to another user; "
                                      f"kiln will not load code from it")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UnsafeCacheDirError(
                f"compile cache {self.root} is writable by other users (mode "
                f"{stat.S_IMODE(info.st_mode):o}); kiln will not load code from it. "
                f"Run: chmod 700 {self.root}")

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.bin", self.root / f"{key}.json"

    def contains(self, key: str) -> bool:
        """Whether a verified entry exists (a corrupt one is removed), without loading it."""
        artifact_path, meta_path = self._paths(key)
        if not meta_path.is_file():
            return False
        try:
            if _digest(artifact_path) == json.loads(meta_path.read_text())["sha256"]:
                return True
        except (OSError, ValueError, KeyError):
            pass
        logger.warning("compile cache entry %s is corrupt; recompiling", key)
        self.remove(key)
        return False

    def load(self, key: str):
        return self._read(key, load_artifact)

    def load_record(self, key: str) -> dict | None:
        """A JSON record saved by `save_record` (compiler/record.py), verified like an
        artifact."""
        return self._read(key, lambda path: json.loads(path.read_text()))

    def _read(self, key: str, load: Callable[[Path], object]):
        artifact_path, meta_path = self._paths(key)
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if _digest(artifact_path) != meta["sha256"]:
                raise ValueError("checksum mismatch")
            return load(artifact_path)
        except Exception as e:  # any failure means the entry cannot be trusted: rebuild it
            logger.warning("compile cache entry %s is unusable (%s); recompiling", key, e)
            self.remove(key)
            return None

    def save(self, key: str, artifact) -> None:
        self._write(key, lambda path: save_artifact(artifact, path))

    def save_record(self, key: str, record: dict) -> None:
        self._write(key, lambda path: path.write_text(json.dumps(record)))

    def _write(self, key: str, write: Callable[[Path], None]) -> None:
        artifact_path, meta_path = self._paths(key)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".bin")
        os.close(fd)
        tmp = Path(tmp)
        try:
            write(tmp)
            meta = {"sha256": _digest(tmp), "created": time.time()}
            os.replace(tmp, artifact_path)
            fd, tmp_meta = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(meta, f)
            os.replace(tmp_meta, meta_path)
        finally:
            tmp.unlink(missing_ok=True)

    def library(self, digest: str) -> Path:
        """Where `keep_library` keeps the library with this SHA-256."""
        return self.root / "kernels" / f"{digest}.so"

    def keep_library(self, path: Path) -> str:
        """Copy a kernel library that a description of an artifact names into the cache,
        under its SHA-256 (returned). Inductor's build directory can change between
        processes (the user's TORCHINDUCTOR_CACHE_DIR, a test run's temporary one); the
        copy stays with the descriptions it serves, and `clear` removes both."""
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        target = self.library(digest)
        if not target.is_file() or _digest(target) != digest:
            target.parent.mkdir(mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".so")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        return digest

    def marked(self, name: str) -> bool:
        return (self.root / f"{name}.mark").is_file()

    def set_mark(self, name: str, on: bool) -> None:
        """Leave (or take away) a mark: an empty file, a hint that no code is loaded from."""
        path = self.root / f"{name}.mark"
        if on:
            path.touch()
        else:
            path.unlink(missing_ok=True)

    def remove(self, key: str) -> None:
        for path in self._paths(key):
            path.unlink(missing_ok=True)

    def entries(self, verify: bool = False) -> list[CacheEntry]:
        out = []
        for meta_path in sorted(self.root.glob("*.json")):
            key = meta_path.stem
            artifact_path = self._paths(key)[0]
            try:
                meta = json.loads(meta_path.read_text())
                size = artifact_path.stat().st_size
                valid = not verify or _digest(artifact_path) == meta["sha256"]
                created = meta["created"]
            except (OSError, ValueError, KeyError):
                size, valid, created = 0, False, 0.0
            out.append(CacheEntry(key, size, created, valid))
        return out

    def size_bytes(self) -> int:
        """Artifacts plus the kernel builds kept beside them."""
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def clear(self) -> int:
        """Remove every artifact and kernel build; returns the number of files removed."""
        removed = 0
        for path in sorted(self.root.rglob("*"), reverse=True):  # files before their dirs
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()
                removed += 1
        return removed
