"""Where the workbench keeps its data, and the layout inside the data directory.

    <data_dir>/sessions.db                          the SQLite store (WAL mode)
    <data_dir>/images/ab/abcdef....<ext>            each image once, named by the sha256
    <data_dir>/images/ab/abcdef....thumb.png        of its bytes, with a 128 px thumbnail
    <data_dir>/adapters/<session_id>/...            adapter checkpoints of one session

Paths stored in the database are relative to the data directory (POSIX separators), so a
data directory can be moved or synced as a whole.

Only `images/` is ever served to the browser (`servable_dirs`): the database, its WAL and
the adapters are not. Browsers pick a served file's content type from its extension, so
images are stored under image extensions only (`IMAGE_FORMATS`), never as `.html` or `.svg`.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path, PurePosixPath

APP_NAME = "ttrv-workbench"
ENV_VAR = "TTRV_DATA_DIR"
DB_NAME = "sessions.db"
IMAGES = "images"
ADAPTERS = "adapters"
THUMB_SUFFIX = ".thumb.png"
LAUNCH_LOG = "launch.log"  # a data-parallel run's launcher output, in its adapter folder
# What `python -m ttrv adapt --session` writes beside the adapters of an app session run
# on several processes: this machine's record of the run (absolute paths, the command).
# The store holds the same facts, so exports leave these out.
RUN_RECORD_FILES = frozenset(
    {LAUNCH_LOG, "session.json", "config.json", "events.jsonl", "summary.json", "answers.json"}
)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

# The extensions an image may be stored under, and the format (as Pillow names it) its bytes
# must have. Raster formats that browsers show as pictures and that cannot carry script: no
# SVG, no HTML. An image of any other format is stored re-encoded as PNG.
IMAGE_FORMATS: dict[str, str] = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".gif": "GIF",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}
_FORMAT_EXT = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp",
               "TIFF": ".tif"}  # fmt: skip


def default_data_dir() -> Path:
    """The per-user data directory: `$TTRV_DATA_DIR`, else the platform's usual place.

    Linux and other Unix: `$XDG_DATA_HOME/ttrv-workbench` (`~/.local/share/...`);
    macOS: `~/Library/Application Support/ttrv-workbench`;
    Windows: `%LOCALAPPDATA%\\ttrv-workbench` (else `%APPDATA%`, else the home folder).
    """
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    home = Path.home()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.environ.get("APPDATA")
        return Path(base) / APP_NAME if base else home / APP_NAME
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / APP_NAME
    xdg = os.environ.get("XDG_DATA_HOME", "").strip()
    base_dir = Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".local" / "share"
    return base_dir / APP_NAME


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """`data_dir` if given, else `default_data_dir()`; absolute, `~` expanded."""
    chosen = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    return chosen.resolve()


def is_sha256(text: object) -> bool:
    return isinstance(text, str) and bool(_SHA256.match(text))


def is_session_id(text: object) -> bool:
    """Session ids are used in paths: letters, digits, `_` and `-` only (max 64)."""
    return isinstance(text, str) and bool(_SESSION_ID.match(text))


def ext_for_format(image_format: str | None) -> str | None:
    """The extension to store an image of Pillow format `image_format` under (e.g. "JPEG"
    -> ".jpg"), or None when that format is not stored as it is (re-encode it as PNG)."""
    return _FORMAT_EXT.get(image_format or "")


def image_ext(ext: str) -> str:
    """`ext` lower-cased, if images may be stored under it; else ValueError."""
    ext = str(ext).lower()
    if ext not in IMAGE_FORMATS:
        allowed = ", ".join(sorted(IMAGE_FORMATS))
        raise ValueError(f"{ext!r} is not an image extension the workbench stores ({allowed})")
    return ext


def image_relpath(sha256: str, ext: str) -> str:
    """`images/ab/abcdef....<ext>` for an image whose bytes hash to `sha256`; `ext` must be
    an image extension (see `IMAGE_FORMATS`)."""
    if not is_sha256(sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return f"{IMAGES}/{sha256[:2]}/{sha256}{image_ext(ext)}"


def thumb_relpath(sha256: str) -> str:
    if not is_sha256(sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return f"{IMAGES}/{sha256[:2]}/{sha256}{THUMB_SUFFIX}"


def servable_dirs(data_dir: Path, *extra: str | os.PathLike[str]) -> list[str]:
    """The folders the web UI may serve files from: the images folder of `data_dir` (images
    and their thumbnails) plus `extra` folders (the demo images, the UI's scratch folder).

    Never the data directory itself: `sessions.db`, its WAL and the adapters stay private.
    """
    return [str(Path(data_dir) / IMAGES), *(str(Path(p)) for p in extra)]


def adapter_relpath(session_id: str) -> str:
    if not is_session_id(session_id):
        raise ValueError(f"not a valid session id: {session_id!r}")
    return f"{ADAPTERS}/{session_id}"


def safe_relpath(name: str) -> PurePosixPath:
    """`name` as a relative POSIX path that stays inside its root, else ValueError.

    Refuses absolute paths, Windows drive letters and UNC names, backslashes, `..`
    components and empty names: the checks an archive member or a stored path must pass
    before anything is written under it.
    """
    if not name or "\\" in name or "\x00" in name:
        raise ValueError(f"unsafe path {name!r}")
    path = PurePosixPath(name)
    if path.is_absolute() or re.match(r"^[A-Za-z]:", name):
        raise ValueError(f"absolute path {name!r}")
    parts = [p for p in path.parts if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise ValueError(f"path {name!r} leaves its root")
    return PurePosixPath(*parts)


def inside(root: Path, relpath: str) -> Path:
    """`root / relpath`, checked (after resolving links) to stay inside `root`."""
    target = (root / safe_relpath(relpath)).resolve()
    if not target.is_relative_to(root.resolve()):
        raise ValueError(f"path {relpath!r} leaves {root}")
    return target
