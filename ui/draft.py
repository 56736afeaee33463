"""The images chosen for the next session, before it exists ("the draft"); pure logic.

A draft is a list of dicts, one per image: image_id (sha256 of the file bytes), name,
path (the original file), thumb (a small PNG for the gallery), label, question, options,
size (original [width, height]) and unlike (why it does not look like the bundled model's
training digits, see `ttrv.digits.unlike_training_digits`). It lives in the browser tab's `gr.State`; `to_store_items` hands it to
`Store.add_images` when a session is created.

Uploads may be image files, zip archives (extracted with member names checked; class
sub-folders give labels, a CSV inside is used as labels) and CSV files with columns
file,label[,question][,options]. Loading goes through `ttrv.images.load_items`, so bad
files and byte-identical copies are reported and skipped while the rest are kept.
"""

from __future__ import annotations

import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from ttrv.digits import unlike_training_digits
from ttrv.images import ImageError, load_items, read_labels_csv

THUMB_PX = 128
MAX_ZIP_BYTES = 2 << 30  # refuse archives that would unpack to more than 2 GiB
MAX_ZIP_FILES = 20_000
GALLERY_LIMIT = 300  # thumbnails shown at once

_scratch: Path | None = None


def scratch_dir() -> Path:
    """A per-process temporary folder for thumbnails and unpacked archives."""
    global _scratch
    if _scratch is None:
        _scratch = Path(tempfile.mkdtemp(prefix="ttrv-ui-"))
    return _scratch


def extract_zip(path: Path) -> tuple[Path | None, list[str]]:
    """Unpack `path` into a fresh folder; (its root, warnings). Unsafe names are skipped."""
    messages: list[str] = []
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        return None, [f"{path.name}: not a readable zip archive ({exc}); skipped"]
    dest = Path(tempfile.mkdtemp(prefix="zip-", dir=scratch_dir()))
    total = 0
    with zf:
        members = [i for i in zf.infolist() if not i.is_dir()]
        if len(members) > MAX_ZIP_FILES:
            return None, [f"{path.name}: more than {MAX_ZIP_FILES} files; split the archive"]
        for info in members:
            parts = PurePosixPath(info.filename.replace("\\", "/")).parts
            if (
                not parts
                or info.filename.startswith(("/", "\\"))
                or any(p in ("..", "") or p.startswith(".") or p == "__MACOSX" for p in parts)
                or ":" in parts[0]
            ):
                continue  # hidden files, resource forks, names that would leave the folder
            total += info.file_size
            if total > MAX_ZIP_BYTES:
                messages.append(f"{path.name}: unpacks to more than 2 GiB; the rest skipped")
                break
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, target.open("wb") as out:
                    while block := src.read(1 << 20):
                        out.write(block)
            except (zipfile.BadZipFile, OSError, RuntimeError) as exc:
                messages.append(f"{path.name}/{info.filename}: cannot unpack ({exc}); skipped")
                target.unlink(missing_ok=True)
    # An archive holding one top folder ("digits/3/x.png"): its sub-folders are the classes.
    root = dest
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    while len(entries) == 1 and entries[0].is_dir():
        root = entries[0]
        entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    return root, messages


def _friendly(text: str, names: dict[str, str]) -> str:
    """Replace temporary paths in a message with the names the user knows."""
    for long, short in sorted(names.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(long, short)
    return text


def add_files(
    draft: list[dict[str, Any]],
    files: Sequence[str | Path],
    *,
    labels_csv: str | Path | None = None,
    folder_labels: bool = False,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The draft with the images in `files` (image files, zips, folders, CSVs) added, and
    one message per thing skipped. Never raises for bad input: it reports it."""
    messages: list[str] = []
    names: dict[str, str] = {}
    plain: list[Path] = []  # files given one by one: their folder is no label
    folders: list[Path] = []  # folders: class sub-folders are labels if `folder_labels`
    archives: list[Path] = []  # unpacked zips: class sub-folders are always labels
    csvs: list[Path] = [Path(labels_csv)] if labels_csv else []
    for raw in files:
        path = Path(raw)
        names[str(path)] = path.name
        if path.suffix.lower() == ".csv":
            csvs.append(path)
        elif path.suffix.lower() == ".zip":
            root, zip_messages = extract_zip(path)
            messages += zip_messages
            if root is not None:
                names[str(root)] = path.name
                archives.append(root)
                csvs += sorted(root.glob("*.csv"))
        elif path.is_dir():
            folders.append(path)
        else:
            plain.append(path)
    if len(csvs) > 1:
        messages.append(f"Several CSV files given; using {csvs[0].name} for labels.")
    csv = csvs[0] if csvs else None
    if not plain and not folders and not archives:
        if csv is not None:
            draft, csv_messages = apply_csv(draft, csv)
            return draft, messages + csv_messages
        return draft, messages + ["No image files given."]
    items = []
    for paths, by_folder in ((plain, False), (folders, folder_labels), (archives, True)):
        if not paths:
            continue
        try:
            found, warnings = load_items(
                paths, max_side=THUMB_PX, labels_from_folders=by_folder, labels_csv=csv
            )
        except (ImageError, ValueError) as exc:
            messages.append(_friendly(str(exc), names))
            continue
        items += found
        messages += [
            _friendly(w, names)
            for w in warnings  # the labels CSV sitting next to the images is no news
            if not (
                csv and w.endswith(f"skipped 1 file(s) without an image extension ({csv.name})")
            )
        ]
    known = {d["image_id"]: d["name"] for d in draft}
    added = []
    thumbs = scratch_dir() / "thumbs"
    thumbs.mkdir(exist_ok=True)
    for item in items:
        if item.image_id in known:
            messages.append(f"{item.name}: already added (same content as {known[item.image_id]})")
            continue
        thumb = thumbs / f"{item.image_id}.png"
        if not thumb.exists():
            item.image.save(thumb)
        try:  # the original size (item.image may be shrunk); reads the header only
            with Image.open(item.meta["path"]) as original:
                size = original.size
        except OSError:
            size = item.image.size
        known[item.image_id] = item.name
        added.append(
            {
                "image_id": item.image_id,
                "name": item.name,
                "path": item.meta["path"],
                "thumb": str(thumb),
                "label": item.label,
                "question": item.question,
                "options": item.options,
                "size": list(size),
                # how it differs from the bundled digits model's training data ([]: it does not)
                "unlike": unlike_training_digits(item.image, size),
            }
        )
    if added:
        messages.insert(0, f"Added {len(added)} image(s).")
    return list(draft) + added, messages


def apply_csv(
    draft: list[dict[str, Any]], csv: str | Path
) -> tuple[list[dict[str, Any]], list[str]]:
    """Labels / questions / options from a CSV (file,label[,question][,options]) applied to
    draft images by file name; non-empty cells win."""
    try:
        rows, messages = read_labels_csv(csv)
    except ValueError as exc:
        return draft, [str(exc)]
    by_name = {PurePosixPath(k).name: row for k, row in rows.items()}
    out, matched = [], 0
    for d in draft:
        row = rows.get(d["name"]) or by_name.get(d["name"])
        if row is None:
            out.append(d)
            continue
        matched += 1
        out.append(
            {
                **d,
                "label": row.label or d.get("label"),
                "question": row.question or d.get("question"),
                "options": list(row.options) if row.options else d.get("options"),
            }
        )
    messages.append(f"{Path(csv).name}: {matched} of {len(draft)} images matched a row.")
    return out, messages


def remove(draft: list[dict[str, Any]], index: int | None) -> list[dict[str, Any]]:
    if index is None or not 0 <= index < len(draft):
        return draft
    return draft[:index] + draft[index + 1 :]


def gallery(draft: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [
        (d["thumb"], d["name"] + (f" · {d['label']}" if d.get("label") else ""))
        for d in draft[:GALLERY_LIMIT]
    ]


def table(draft: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [d["name"], d.get("label") or "", d.get("question") or "",
         "; ".join(d.get("options") or [])]
        for d in draft
    ]  # fmt: skip


def summary(draft: list[dict[str, Any]]) -> str:
    if not draft:
        return "No images yet: upload some, or click **Load demo images**."
    labelled = sum(d.get("label") is not None for d in draft)
    questions = sum(bool(d.get("question")) for d in draft)
    text = f"**{len(draft)} image{'s' if len(draft) != 1 else ''}** ready"
    if labelled:
        text += f" · {labelled} labelled (labels are used only to evaluate, never to adapt)"
    if questions:
        text += f" · {questions} with their own question"
    if len(draft) > GALLERY_LIMIT:
        text += f" · the gallery shows the first {GALLERY_LIMIT}"
    return text


def to_store_items(draft: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Dicts for `Store.add_images` (the original file is stored, not the thumbnail)."""
    return [
        {k: d.get(k) for k in ("image_id", "name", "path", "label", "question", "options")}
        for d in draft
    ]


def from_session(images: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A draft holding a stored session's images (`Store.images` rows), so that a reload
    shows the images of the run it re-attaches to; `unlike` is left to be computed."""
    return [
        {
            "image_id": r["image_id"],
            "name": r["name"],
            "path": r["path"],
            "thumb": r.get("thumb") or r["path"],
            "label": r.get("label"),
            "question": r.get("question"),
            "options": r.get("options"),
            "size": [r["width"], r["height"]] if r.get("width") else None,
        }
        for r in images
        if r.get("path")  # images known only from the engine's run_start have no file
    ]
