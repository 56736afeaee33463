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

An archive is someone else's file: import treats it as hostile. Before anything is written
it checks every member name (no absolute paths, drive letters, `..`, backslashes or links),
every member's declared size and compression ratio (`MAX_*`), the manifest, and every row
(types from the database schema, the session's settings, checkpoint paths inside
`adapters/`, image extensions). It then streams each listed file, with a cap on the bytes
actually read, into a staging folder, checking its sha256 and that images are the images
their names say; only then are files moved into place (to paths it computes itself inside
the data directory) and all rows inserted in one transaction. Anything refused leaves the
store and the data directory as they were.

An imported session never runs code by itself: `trust_remote_code` is turned off (the person
may turn it on again for that session with `allow_remote_code`), and a model the archive
names that is not on this machine is shown, never fetched (`imported_model_problem`, which
the worker checks). Both are recorded as "warning" events, which the UI shows, and in one
"imported" event.

The session keeps its id when that id is free in the target store, else it gets a new one.
A session exported while running is imported as "interrupted".
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
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from . import paths
from .schema import (
    ACTIVE_STATUSES,
    JSON_COLUMNS,
    SCHEMA_VERSION,
    STATUSES,
    StoreError,
    translate,
)
from .store import SESSION_TABLES, now, sha256_file, to_json

if TYPE_CHECKING:
    from .store import Store

FORMAT = "ttrv-workbench-session"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TABLES = ("sessions", "images", *SESSION_TABLES)
CSV_TABLES = ("steps", "rollouts", "answers")
# Tables newer than the archive format: an archive exported before them simply has none.
ADDED_LATER = ("reviews",)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
# Import limits. JSON members (the manifest and the tables) are parsed in memory, so they
# are bounded well below the machine's memory: half a million rollout rows, the largest
# session the workbench expects, export to about 250 MiB. Files (images, adapters) are
# streamed to disk and may be larger. Honest members compress up to about 80:1 (measured:
# tables whose rollouts all give the same answer); deflate's ceiling is about 1030:1, which
# is what a zip bomb uses. Module constants, so a deployment (or a test) can tighten them.
MAX_TABLE_BYTES = 512 * MiB
MAX_FILE_BYTES = 8 * GiB
MAX_TOTAL_BYTES = 32 * GiB
MAX_MEMBERS = 200_000
MAX_RATIO = 200
RATIO_FROM_BYTES = 1 * MiB  # smaller members may compress as well as they like
CHUNK_BYTES = 1 * MiB

# Files whose presence in the Hugging Face cache means a hub model is on this machine.
HUB_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _size(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


# -- export ----------------------------------------------------------------------------------


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
            run_record = f.parent == adapter_dir and f.name in paths.RUN_RECORD_FILES
            if f.is_file() and not f.name.startswith(".tmp-") and not run_record:
                files[f"adapters/{f.relative_to(adapter_dir).as_posix()}"] = f
    for checkpoint in tables["checkpoints"]:
        path = checkpoint["path"]
        exists = (store.data_dir / path).exists()
        if path.startswith(adapter_root):
            checkpoint["path"] = "adapters/" + path[len(adapter_root) :]
        else:
            # Recorded missing outside the data directory (add_checkpoint copies every
            # existing one in): keep its name under adapters/, where import requires it.
            checkpoint["path"] = f"adapters/{PurePosixPath(path).name or 'checkpoint'}"
        if checkpoint["sha256"] is None or not exists:
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
            with store.snapshot("reading the schema") as db:
                columns = {table: list(db[table].columns_dict) for table in CSV_TABLES}
            for table in CSV_TABLES:
                zf.writestr(f"csv/{table}.csv", _csv(columns[table], tables[table]))
            for arcname, source in sorted(files.items()):
                zf.write(source, arcname)  # streamed: an adapter may be large
                listed[arcname] = {"sha256": sha256_file(source), "bytes": source.stat().st_size}
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


# -- reading an archive safely ---------------------------------------------------------------


def _refuse(path: Path, why: str) -> StoreError:
    return StoreError(f"{path} cannot be imported: {why}. Nothing was extracted.")


def _member_limit(name: str) -> tuple[int, str]:
    if name == MANIFEST or name.startswith("tables/"):
        return MAX_TABLE_BYTES, "a table"
    return MAX_FILE_BYTES, "a file"


def _check_members(zf: zipfile.ZipFile, path: Path) -> None:
    """Names, links, duplicates, and declared sizes: checked before any member is read."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise _refuse(path, f"it holds {len(infos)} members, more than {MAX_MEMBERS}")
    seen = set()
    total = 0
    for info in infos:
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
        limit, what = _member_limit(name)
        if info.file_size > limit:
            raise _refuse(
                path,
                f"{name} would unpack to {_size(info.file_size)}, more than the "
                f"{_size(limit)} {what} may have",
            )
        if info.file_size > RATIO_FROM_BYTES and info.file_size > MAX_RATIO * max(
            info.compress_size, 1
        ):
            ratio = info.file_size / max(info.compress_size, 1)
            raise _refuse(
                path,
                f"{name} is compressed {ratio:.0f} to 1 ({_size(info.compress_size)} unpacking "
                f"to {_size(info.file_size)}), as zip bombs are; more than {MAX_RATIO} to 1 "
                "is refused",
            )
        total += info.file_size
    if total > MAX_TOTAL_BYTES:
        raise _refuse(
            path, f"it would unpack to {_size(total)}, more than {_size(MAX_TOTAL_BYTES)}"
        )


def _stream(zf: zipfile.ZipFile, path: Path, name: str, write: Callable[[bytes], object]) -> int:
    """Pass member `name` to `write` in pieces; return its size. The cap is on the bytes
    actually read, not on the size the headers declare (they are the archive's word)."""
    limit, what = _member_limit(name)
    damaged = "is damaged ({}); download or export the archive again"
    try:
        member = zf.open(name)
    except KeyError as exc:
        raise _refuse(path, f"{name} is missing") from exc
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise _refuse(path, f"{name} {damaged.format(exc)}") from exc
    except (NotImplementedError, RuntimeError) as exc:  # unknown method, encrypted
        raise _refuse(path, f"{name} cannot be read ({exc})") from exc
    total = 0
    with member:
        while True:
            try:
                chunk = member.read(CHUNK_BYTES)
            except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                raise _refuse(path, f"{name} {damaged.format(exc)}") from exc
            except OSError as exc:
                raise _refuse(path, f"{name} cannot be read ({exc})") from exc
            if not chunk:
                return total
            total += len(chunk)
            if total > limit:
                raise _refuse(
                    path, f"{name} unpacks to more than the {_size(limit)} {what} may have"
                )
            write(chunk)


def _load_json(zf: zipfile.ZipFile, path: Path, name: str) -> Any:
    buffer = bytearray()
    _stream(zf, path, name, buffer.extend)
    try:
        return json.loads(buffer)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
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
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise _refuse(path, f"it is not a readable zip archive ({exc})") from exc


# -- checking rows -----------------------------------------------------------------------------

# Columns import sets itself, whatever the archive says.
_SET_ON_IMPORT = {"session_id", "id", "path", "thumb"}
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "INTEGER": ((int,), "a whole number"),
    "REAL": ((int, float), "a number"),
    "TEXT": ((str,), "text"),
}


def _check_rows(path: Path, tables: dict[str, Any], columns: dict[str, list[Any]]) -> None:
    """Every row against the database schema (`columns`: sqlite-utils Column tuples per
    table) and what the workbench later relies on; refuses with the first problem found."""
    for table in TABLES:
        rows = tables[table]
        if not isinstance(rows, list):
            raise _refuse(path, f"tables/{table}.json is not a list of rows")
        known = {c.name: c for c in columns[table]}
        skip = {"id"} if table == "sessions" else _SET_ON_IMPORT
        for n, row in enumerate(rows, 1):
            where = f"{table} row {n}"
            if not isinstance(row, dict):
                raise _refuse(path, f"{where} is not an object")
            unknown = set(row) - set(known)
            if unknown:
                raise _refuse(path, f"{where} has columns the workbench does not know: "
                                    f"{sorted(unknown)}")  # fmt: skip
            for name, col in known.items():
                if name in skip and (table != "images" or name != "id"):
                    continue
                value = row.get(name)
                if value is None:
                    if col.notnull and col.default_value is None:
                        raise _refuse(path, f"{where} has no {name}")
                    continue
                if name in JSON_COLUMNS.get(table, ()):
                    continue
                types, kind = _TYPES.get(col.type.upper(), ((object,), "a value"))
                if not isinstance(value, types):
                    raise _refuse(path, f"{where}: {name} must be {kind}, not {value!r:.60}")
    if len(tables["sessions"]) != 1:
        raise _refuse(path, "its sessions table must hold exactly one session")
    session = tables["sessions"][0]
    if session.get("status", "queued") not in STATUSES:
        raise _refuse(path, f"its session's status {session['status']!r:.40} is not one of "
                            f"{', '.join(STATUSES)}")  # fmt: skip
    _check_config(path, session.get("config"))
    image_ids = set()
    for n, image in enumerate(tables["images"], 1):
        if not paths.is_sha256(image.get("id")):
            raise _refuse(path, f"images row {n}: id {image.get('id')!r:.80} is not a sha256")
        try:
            paths.image_ext(image["ext"])
        except ValueError as exc:
            raise _refuse(path, f"images row {n} is not an image: {exc}") from exc
        image_ids.add(image["id"])
    for n, link in enumerate(tables["session_images"], 1):
        if link.get("sha256") is not None and link["sha256"] not in image_ids:
            raise _refuse(path, f"session_images row {n} refers to an image not in the archive")
    for n, checkpoint in enumerate(tables["checkpoints"], 1):
        where = checkpoint["path"]
        try:
            rest = paths.safe_relpath(where)
            ok = len(rest.parts) > 1 and rest.parts[0] == paths.ADAPTERS
        except ValueError:
            ok = False
        if not ok:
            raise _refuse(path, f"checkpoints row {n}: checkpoint path {where!r:.120} is not "
                                "inside the archive's adapters/ folder")  # fmt: skip


def _check_config(path: Path, config: Any) -> None:
    from ttrv.config import SECTIONS, AdaptConfig  # standard library only: cheap

    if not isinstance(config, dict):
        raise _refuse(path, f"its session's config is not a settings object ({config!r:.60})")
    unknown = set(config) - set(SECTIONS)
    if unknown:  # AdaptConfig.from_dict would ignore them; stored, they would travel on
        raise _refuse(path, f"its session's config is not valid settings (unknown sections "
                            f"{sorted(unknown)!r:.80})")  # fmt: skip
    try:
        AdaptConfig.from_dict(config)
    except (TypeError, ValueError, AttributeError) as exc:  # ConfigError is a ValueError
        raise _refuse(path, f"its session's config is not valid settings ({exc})") from exc


# -- models an archive names ------------------------------------------------------------------


def model_on_this_machine(name: str) -> bool:
    """True when `name` is a model folder here (with config.json), or a hub id whose config
    and weights are in the local Hugging Face cache. Looks at the disk only, never the hub."""
    if not isinstance(name, str) or not name.strip():
        return False
    local = Path(name).expanduser()
    try:
        if local.is_dir():
            return (local / "config.json").is_file()
        if local.exists():
            return False
    except OSError:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - installed with transformers
        return False
    try:
        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            return False
        return any(isinstance(try_to_load_from_cache(name, f), str) for f in HUB_WEIGHT_FILES)
    except (ValueError, OSError):  # HFValidationError (not a hub id) is a ValueError
        return False


def imported_model_problem(store: Store, session_id: str, model: str) -> str | None:
    """Why the model `model` must not be loaded for session `session_id`, or None.

    Only imported sessions are concerned: a model their archive names is loaded only when it
    is already on this machine, never downloaded (a hub download would fetch, and with
    remote code run, whatever the archive's author chose).
    """
    if not store.events(session_id, kind="imported") or model_on_this_machine(model):
        return None
    return (
        f"This session was imported from an archive, and its model {model!r} is not on this "
        "machine (no such folder, and not in the Hugging Face cache). A model an archive "
        "names is never downloaded automatically: download it yourself if you trust it "
        f"(e.g. `hf download {model}`), or pick a local model, then try again."
    )


def allow_remote_code(store: Store, session_id: str) -> None:
    """Turn `trust_remote_code` on for one session, at the person's request (import turns
    it off); recorded as a "warning" event so the choice stays visible."""
    with store.transaction("allowing remote code") as db:
        row = store.session_row(db, session_id)
        config = json.loads(row["config"])
        config.setdefault("model", {})["trust_remote_code"] = True
        store.update_session(db, session_id, config=to_json(config))
        message = (
            f"Remote code turned on for this session by request: Python code shipped with "
            f"{config['model'].get('model', row['model'])!r} runs when the model loads."
        )
        store.insert_event(db, session_id, "warning", {"message": message})


# -- import ------------------------------------------------------------------------------------


def _planned_files(
    path: Path, manifest: dict[str, Any], images: list[dict[str, Any]]
) -> dict[str, tuple[str, str, str | None, str | None]]:
    """{arcname: (kind, relpath, expected sha256, Pillow format)} for every listed file:
    kind "image" (relpath in the data dir; sha256 the image id for images, None for
    thumbnails) or "adapter" (relpath inside the session's adapter folder)."""
    expected: dict[str, tuple[str | None, str]] = {}
    for image in images:
        ext = paths.image_ext(image["ext"])
        expected[paths.image_relpath(image["id"], ext)] = (image["id"], paths.IMAGE_FORMATS[ext])
        expected[paths.thumb_relpath(image["id"])] = (None, "PNG")
    plan: dict[str, tuple[str, str, str | None, str | None]] = {}
    for arcname, info in manifest["files"].items():
        try:
            rel = paths.safe_relpath(arcname).as_posix()
        except ValueError as exc:
            raise _refuse(path, f"listed file {arcname!r} is unsafe ({exc})") from exc
        if not isinstance(info, dict) or not paths.is_sha256(info.get("sha256")):
            raise _refuse(path, f"listed file {arcname!r} has no valid sha256")
        if rel in expected:
            sha, image_format = expected[rel]
            if sha not in (None, info["sha256"]):
                raise _refuse(path, f"{arcname} is not the image its name says")
            plan[arcname] = ("image", rel, sha, image_format)
        elif rel.startswith(f"{paths.ADAPTERS}/"):
            plan[arcname] = ("adapter", rel[len(paths.ADAPTERS) + 1 :], None, None)
        else:
            raise _refuse(path, f"it lists an unexpected file {arcname!r}")
    return plan


def _check_image(path: Path, arcname: str, staged: Path, image_format: str) -> None:
    """`staged` must be an image of `image_format` (the UI serves it under that type)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Large but legitimate photos; pixel counts past Pillow's hard limit still raise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(staged) as image:
                found = image.format
                image.verify()
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for non-images
        raise _refuse(path, f"{arcname} is not an image ({type(exc).__name__}: {exc})") from exc
    if found != image_format:
        raise _refuse(path, f"{arcname} is not a {image_format} image (its bytes are {found})")


def _stream_to_file(zf: zipfile.ZipFile, path: Path, name: str, target: Path) -> str:
    """Write member `name` to the new file `target`; return the sha256 of its bytes."""
    digest = hashlib.sha256()
    with target.open("xb") as f:

        def write(chunk: bytes) -> None:
            digest.update(chunk)
            f.write(chunk)

        _stream(zf, path, name, write)
    return digest.hexdigest()


def _extract(
    zf: zipfile.ZipFile, path: Path, manifest: dict[str, Any], plan: dict[str, Any], staging: Path
) -> dict[str, Path]:
    """Stream every planned file into `staging`, checking its sha256 (and images' content)."""
    staged: dict[str, Path] = {}
    for i, (arcname, (kind, _rel, _sha, image_format)) in enumerate(sorted(plan.items())):
        target = staging / f"{i:06d}"
        if _stream_to_file(zf, path, arcname, target) != manifest["files"][arcname]["sha256"]:
            raise _refuse(path, f"{arcname} does not match its sha256 (damaged archive)")
        if kind == "image":
            _check_image(path, arcname, target, image_format)
        staged[arcname] = target
    return staged


def _import_events(
    path: Path, manifest: dict[str, Any], session: dict[str, Any], reset: bool, session_id: str
) -> list[dict[str, Any]]:
    """The "imported" event (read by the worker) and the warnings the UI shows."""
    model = str((session["config"].get("model") or {}).get("model") or session.get("model"))
    local = model_on_this_machine(model)
    data = {
        "archive": path.name,
        "exported": manifest.get("exported"),
        "original_id": manifest.get("session_id"),
        "model": model,
        "model_on_this_machine": local,
        "trust_remote_code_reset": reset,
    }
    events = [("imported", data)]
    if reset:
        message = (
            f"This archive's settings turned remote code on (trust_remote_code) for {model!r}; "
            "it was turned off on import, so no code shipped with a model runs. Turn it on "
            "again for this session only if you trust that model."
        )
        events.append(("warning", {"message": message}))
    if not local:
        message = (
            f"The model {model!r} named by this archive is not on this machine; it is not "
            "downloaded automatically. Download it yourself if you trust it, then run this "
            "session's jobs."
        )
        events.append(("warning", {"message": message}))
    created = now()
    return [
        {"session_id": session_id, "kind": kind, "data": to_json(d), "created": created}
        for kind, d in events
    ]


def _rows_for_import(
    tables: dict[str, list[dict[str, Any]]], session_id: str
) -> tuple[dict[str, list[dict[str, Any]]], bool]:
    """Rows ready to insert, and whether the archive's config asked for remote code (it is
    turned off here: an archive must not decide to run code on this machine)."""
    out: dict[str, list[dict[str, Any]]] = {}
    reset = False
    for table in TABLES:
        rows = []
        for row in tables[table]:
            row = dict(row)
            if table == "sessions":
                row["config"] = config = json.loads(json.dumps(row["config"]))  # a copy
                model = config.get("model")
                if isinstance(model, dict) and model.get("trust_remote_code"):
                    model["trust_remote_code"] = False
                    reset = True
            for col in JSON_COLUMNS.get(table, ()):
                if row.get(col) is not None:
                    row[col] = to_json(row[col])
            if table == "sessions":
                row["id"] = session_id
                if row.get("status") in ACTIVE_STATUSES:
                    row["status"] = "interrupted"
                    row["reason"] = "Imported from an archive exported while it ran."
            elif table == "images":
                row["ext"] = paths.image_ext(row["ext"])
                row["path"] = paths.image_relpath(row["id"], row["ext"])
                row["thumb"] = paths.thumb_relpath(row["id"])
            else:
                row["session_id"] = session_id
            if table in ("checkpoints", "events"):
                row.pop("id", None)
            if table == "checkpoints":
                rest = paths.safe_relpath(row["path"]).relative_to(paths.ADAPTERS).as_posix()
                row["path"] = f"{paths.adapter_relpath(session_id)}/{rest}"
            rows.append(row)
        out[table] = rows
    return out, reset


def import_archive(store: Store, path: str | os.PathLike[str]) -> str:
    """Restore a session exported by `export_session` into `store`; return its id.

    The session keeps its exported id when no session in `store` has it, else gets a new
    one. Images already in the store are not copied again. Raises `StoreError` (writing
    nothing) for a file that is not a zip, not ours, from a newer release, too large,
    damaged, holding unsafe member names or malformed rows (see the module docstring).
    """
    path = Path(path)
    zf = _open_zip(path)
    with zf:
        _check_members(zf, path)
        manifest = _check_manifest(zf, path)
        names = set(zf.namelist())
        tables = {
            t: []
            if t in ADDED_LATER and f"tables/{t}.json" not in names
            else _load_json(zf, path, f"tables/{t}.json")
            for t in TABLES
        }
        with store.snapshot("reading the schema") as db:
            columns = {t: db[t].columns for t in TABLES}
        _check_rows(path, tables, columns)
        plan = _planned_files(path, manifest, tables["images"])
        original = tables["sessions"][0].get("id")
        with store.snapshot("choosing a session id") as db:
            taken = db.execute("SELECT 1 FROM sessions WHERE id = ?", [original]).fetchone()
        session_id = original if paths.is_session_id(original) and not taken else None
        session_id = session_id or uuid.uuid4().hex[:12]
        rows, reset = _rows_for_import(tables, session_id)
        rows["events"] += _import_events(path, manifest, tables["sessions"][0], reset, session_id)
        need = sum(info.file_size for info in zf.infolist() if info.filename in plan)
        free = shutil.disk_usage(store.data_dir).free
        if need > free:
            raise _refuse(path, f"its files need {_size(need)} and the data directory's disk "
                                f"has {_size(free)} free")  # fmt: skip
        # Files are staged next to their destination (same disk: moved, not copied) and the
        # staging folder is removed whatever happens.
        staging: Path | None = None
        try:
            staging = Path(tempfile.mkdtemp(dir=store.data_dir, prefix=".tmp-import-"))
            staged = _extract(zf, path, manifest, plan, staging)
            _install(store, path, plan, staged, rows, session_id)
        except OSError as exc:
            raise translate(exc, f"importing {path}") from exc
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
    return session_id


def _install(
    store: Store,
    path: Path,
    plan: dict[str, tuple[str, str, str | None, str | None]],
    staged: dict[str, Path],
    rows: dict[str, list[dict[str, Any]]],
    session_id: str,
) -> None:
    """Move the checked files into place and insert the rows; undo the files on failure."""
    adapter_dir = store.adapter_dir(session_id, create=False)
    created_adapter_dir = not adapter_dir.exists()
    with store.storing_files() as written:  # image files nobody references are removed on failure
        try:
            for arcname, (kind, rel, _sha, _fmt) in plan.items():
                if kind == "image":
                    target = paths.inside(store.data_dir, rel)
                    if target.exists():  # content-addressed: already here
                        continue
                    written.append(target.name.split(".")[0])
                else:
                    target = paths.inside(adapter_dir, rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged[arcname], target)
            _insert(store, rows, session_id)
        except BaseException as exc:
            if created_adapter_dir:
                shutil.rmtree(adapter_dir, ignore_errors=True)
            if isinstance(exc, OSError | ValueError):
                raise StoreError(f"Importing {path} failed: {exc}") from exc
            raise


def _insert(store: Store, rows: dict[str, list[dict[str, Any]]], session_id: str) -> None:
    with store.transaction("importing a session") as db:
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
