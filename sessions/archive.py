"""Export one session to a single zip archive, and import it back losslessly.

Archive layout (format `ttrv-workbench-session`, version 1):

    manifest.json              format, version, schema_version, session id and name,
                               row counts, every file with its sha256, and `missing`
                               (files the session refers to that were absent at export)
    tables/<table>.json        every row of sessions, images, session_images, steps,
                               rollouts, answers, checkpoints, events (JSON columns parsed;
                               NaN/Infinity written as Python's json writes them)
    csv/<table>.csv            steps, rollouts and answers for spreadsheets (not read back)
    images/ab/<sha256>.<ext>   the images and their thumbnails
    adapters/...               the files of the session's adapter folder

Import checks every member name (no absolute paths, drive letters, `..`, backslashes or
links) and the manifest before writing anything, verifies every file's sha256, writes
files only to paths it computes itself inside the data directory, and inserts all rows in
one transaction. The session keeps its id when that id is free in the target store, else
it gets a new one. A session exported while running is imported as "interrupted".
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import stat
import tempfile
import uuid
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import paths
from .schema import ACTIVE_STATUSES, JSON_COLUMNS, SCHEMA_VERSION, StoreError
from .store import SESSION_TABLES, now, to_json, write_atomic

if TYPE_CHECKING:
    from .store import Store

FORMAT = "ttrv-workbench-session"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TABLES = ("sessions", "images", *SESSION_TABLES)
CSV_TABLES = ("steps", "rollouts", "answers")


def _readable(table: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        row = dict(row)
        for col in JSON_COLUMNS.get(table, ()):
            if row.get(col) is not None:
                row[col] = json.loads(row[col])
        out.append(row)
    return out


def _csv(columns: list[str], rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def export_session(store: Store, session_id: str, dest: str | os.PathLike[str]) -> Path:
    """Write `session_id` to the zip `dest` (replaced atomically) and return its path.

    Files the session refers to but that are gone (an adapter deleted by hand, a
    checkpoint recorded as missing) do not stop the export: they are listed in the
    manifest's `missing` (read it with `read_manifest`).
    """
    tables = store.dump(session_id)
    adapter_root = paths.adapter_relpath(session_id) + "/"
    files: dict[str, Path] = {}
    missing: list[str] = []
    for image in tables["images"]:
        for key in ("path", "thumb"):
            source = store.data_dir / image[key]
            if source.is_file():
                files[image[key]] = source
            else:
                missing.append(f"image file {image[key]}")
    adapter_dir = store.adapter_dir(session_id, create=False)
    if adapter_dir.is_dir():
        for f in sorted(adapter_dir.rglob("*")):
            if f.is_file() and not f.name.startswith(".tmp-"):
                files[f"adapters/{f.relative_to(adapter_dir).as_posix()}"] = f
    for checkpoint in tables["checkpoints"]:
        path = checkpoint["path"]
        if path.startswith(adapter_root):
            checkpoint["path"] = "adapters/" + path[len(adapter_root) :]
        if checkpoint["sha256"] is None or not (store.data_dir / path).exists():
            missing.append(f"checkpoint round {checkpoint['round']} step {checkpoint['step']}")

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=".zip")
    os.close(fd)
    try:
        listed = {}
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for table in TABLES:
                text = json.dumps(_readable(table, tables[table]), ensure_ascii=False, indent=1)
                zf.writestr(f"tables/{table}.json", text)
            db = store._db()
            for table in CSV_TABLES:
                columns = list(db[table].columns_dict)
                zf.writestr(f"csv/{table}.csv", _csv(columns, tables[table]))
            for arcname, source in sorted(files.items()):
                data = source.read_bytes()
                zf.writestr(arcname, data)
                listed[arcname] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            manifest = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "schema_version": SCHEMA_VERSION,
                "session_id": session_id,
                "name": tables["sessions"][0]["name"],
                "exported": now(),
                "counts": {table: len(rows) for table, rows in tables.items()},
                "files": listed,
                "missing": missing,
            }
            zf.writestr(MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=1))
        os.replace(tmp, dest)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StoreError(f"Cannot write the archive {dest}: {exc}") from exc
    return dest


def _refuse(path: Path, why: str) -> StoreError:
    return StoreError(f"{path} cannot be imported: {why}. Nothing was extracted.")


def _check_members(zf: zipfile.ZipFile, path: Path) -> None:
    seen = set()
    for info in zf.infolist():
        name = info.filename.rstrip("/") if info.is_dir() else info.filename
        try:
            paths.safe_relpath(name)
        except ValueError as exc:
            raise _refuse(path, f"it holds an unsafe path {info.filename!r} ({exc})") from exc
        if stat.S_ISLNK(info.external_attr >> 16):
            raise _refuse(path, f"it holds a symbolic link {info.filename!r}")
        if name in seen:
            raise _refuse(path, f"it holds {info.filename!r} twice")
        seen.add(name)


def _load_json(zf: zipfile.ZipFile, path: Path, name: str) -> Any:
    try:
        return json.loads(zf.read(name).decode("utf-8"))
    except KeyError as exc:
        raise _refuse(path, f"{name} is missing") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise _refuse(path, f"{name} is not valid JSON ({exc})") from exc


def _check_manifest(zf: zipfile.ZipFile, path: Path) -> dict[str, Any]:
    if MANIFEST not in zf.namelist():
        raise _refuse(path, "it is not a TTRV workbench session archive (no manifest.json)")
    manifest = _load_json(zf, path, MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _refuse(path, "it is not a TTRV workbench session archive (unknown format)")
    version, schema = manifest.get("version"), manifest.get("schema_version")
    if not isinstance(version, int) or not isinstance(schema, int):
        raise _refuse(path, "its manifest has no valid version")
    if version > FORMAT_VERSION or schema > SCHEMA_VERSION:
        raise _refuse(
            path,
            f"it was exported by a newer TTRV workbench (format {version}, schema {schema}); "
            "upgrade the app to import it",
        )
    if not isinstance(manifest.get("files"), dict):
        raise _refuse(path, "its manifest lists no files")
    return manifest


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of an exported archive (checked like `import_archive` checks it)."""
    path = Path(path)
    zf = _open_zip(path)
    with zf:
        _check_members(zf, path)
        return _check_manifest(zf, path)


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise _refuse(path, f"it is not a readable zip archive ({exc})") from exc


def _planned_files(
    zf: zipfile.ZipFile, path: Path, manifest: dict[str, Any], images: list[dict[str, Any]]
) -> tuple[dict[str, str], dict[str, str]]:
    """Check every listed file's hash; return {arcname: data-dir relpath} for images and
    {arcname: path inside the adapter folder} for adapters."""
    expected_images = {}
    for image in images:
        if not paths.is_sha256(image.get("id")):
            raise _refuse(path, f"image id {image.get('id')!r} is not a sha256")
        expected_images[paths.image_relpath(image["id"], image["ext"])] = image["id"]
        expected_images[paths.thumb_relpath(image["id"])] = None
    image_files, adapter_files = {}, {}
    for arcname, info in manifest["files"].items():
        try:
            rel = paths.safe_relpath(arcname).as_posix()
            data = zf.read(arcname)
        except (ValueError, KeyError) as exc:
            raise _refuse(path, f"listed file {arcname!r} is unsafe or absent") from exc
        digest = hashlib.sha256(data).hexdigest()
        if not isinstance(info, dict) or info.get("sha256") != digest:
            raise _refuse(path, f"{arcname} does not match its sha256 (damaged archive)")
        if rel in expected_images:
            if expected_images[rel] not in (None, digest):
                raise _refuse(path, f"{arcname} is not the image its name says")
            image_files[arcname] = rel
        elif rel.startswith("adapters/"):
            adapter_files[arcname] = rel[len("adapters/") :]
        else:
            raise _refuse(path, f"it lists an unexpected file {arcname!r}")
    return image_files, adapter_files


def _rows_for_import(
    tables: dict[str, list[dict[str, Any]]], session_id: str
) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for table in TABLES:
        rows = []
        for row in tables[table]:
            row = dict(row)
            for col in JSON_COLUMNS.get(table, ()):
                if row.get(col) is not None:
                    row[col] = to_json(row[col])
            if table == "sessions":
                row["id"] = session_id
                if row.get("status") in ACTIVE_STATUSES:
                    row["status"] = "interrupted"
                    row["reason"] = "Imported from an archive exported while it ran."
            elif table == "images":
                row["ext"] = paths.clean_ext(row["ext"])
                row["path"] = paths.image_relpath(row["id"], row["ext"])
                row["thumb"] = paths.thumb_relpath(row["id"])
            else:
                row["session_id"] = session_id
            if table in ("checkpoints", "events"):
                row.pop("id", None)
            if table == "checkpoints" and str(row.get("path", "")).startswith("adapters/"):
                rest = paths.safe_relpath(row["path"][len("adapters/") :]).as_posix()
                row["path"] = f"{paths.adapter_relpath(session_id)}/{rest}"
            rows.append(row)
        out[table] = rows
    return out


def import_archive(store: Store, path: str | os.PathLike[str]) -> str:
    """Restore a session exported by `export_session` into `store`; return its id.

    The session keeps its exported id when no session in `store` has it, else gets a new
    one. Images already in the store are not copied again. Raises `StoreError` (writing
    nothing) for a file that is not a zip, not ours, from a newer release, damaged, or
    holding unsafe member names.
    """
    path = Path(path)
    zf = _open_zip(path)
    with zf:
        _check_members(zf, path)
        manifest = _check_manifest(zf, path)
        tables = {t: _load_json(zf, path, f"tables/{t}.json") for t in TABLES}
        if not all(isinstance(rows, list) for rows in tables.values()) or (
            len(tables["sessions"]) != 1
        ):
            raise _refuse(path, "its tables are not lists of rows with one session")
        image_files, adapter_files = _planned_files(zf, path, manifest, tables["images"])
        original = tables["sessions"][0].get("id")
        with store._read("choosing a session id") as db:
            taken = db.execute("SELECT 1 FROM sessions WHERE id = ?", [original]).fetchone()
        session_id = original if paths.is_session_id(original) and not taken else None
        session_id = session_id or uuid.uuid4().hex[:12]
        try:
            rows = _rows_for_import(tables, session_id)
        except (KeyError, TypeError, ValueError) as exc:
            raise _refuse(path, f"its tables are malformed ({exc})") from exc
        adapter_dir = store.adapter_dir(session_id, create=False)
        created_adapter_dir = not adapter_dir.exists()
        written: list[str] = []
        with store._files_lock:
            try:
                for arcname, rel in image_files.items():
                    target = paths.inside(store.data_dir, rel)
                    if not target.exists():
                        write_atomic(target, zf.read(arcname))
                        written.append(target.name.split(".")[0])
                for arcname, rel in adapter_files.items():
                    write_atomic(paths.inside(adapter_dir, rel), zf.read(arcname))
                _insert(store, rows, session_id)
            except BaseException as exc:
                store._remove_unreferenced(written)
                if created_adapter_dir:
                    shutil.rmtree(adapter_dir, ignore_errors=True)
                if isinstance(exc, OSError | ValueError):
                    raise StoreError(f"Importing {path} failed: {exc}") from exc
                raise
    return session_id


def _insert(store: Store, rows: dict[str, list[dict[str, Any]]], session_id: str) -> None:
    with store._write("importing a session") as db:
        if db.execute("SELECT 1 FROM sessions WHERE id = ?", [session_id]).fetchone():
            raise StoreError(f"A session {session_id} appeared meanwhile; import again.")
        for table in TABLES:
            known = set(db[table].columns_dict)
            for row in rows[table]:
                unknown = set(row) - known
                if unknown:
                    raise StoreError(f"The archive's {table} rows have unknown {sorted(unknown)}.")
            if table == "images":
                db[table].insert_all(rows[table], ignore=True)
            else:
                db[table].insert_all(rows[table])
