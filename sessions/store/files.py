"""Files on disk: content hashes, atomic writes, and copies that keep a full disk's errno."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: Path) -> tuple[str, int]:
    """(hash, bytes) of a file, or of a folder: sha256 over `relpath NUL filehash LF` lines
    of its files in sorted order (so a PEFT adapter folder has one hash)."""
    if path.is_file():
        return sha256_file(path), path.stat().st_size
    h = hashlib.sha256()
    total = 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
        total += f.stat().st_size
    return h.hexdigest(), total


def write_atomic(target: Path, data: bytes) -> None:
    """Write `data` to `target` through a temporary file and a rename (never half a file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def copy_path(source: Path, target: Path) -> None:
    """Copy a file or a folder (recursively) to `target`.

    Not `shutil.copytree`: it gathers per-file failures into one `shutil.Error` whose
    errno is None, so a full disk would not be recognised as one (`schema.translate`).
    Here the first `OSError` propagates as it is.
    """
    if not source.is_dir():
        shutil.copy2(source, target)
        return
    target.mkdir(parents=True, exist_ok=True)
    for child in sorted(source.iterdir()):
        copy_path(child, target / child.name)
