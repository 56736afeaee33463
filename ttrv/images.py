"""User images in, `ttrv.tasks.Item`s out: robust loading with Pillow only.

`load_image` returns an RGB image whatever the file holds (alpha is composited on white,
CMYK and palette images converted, 16-bit and float grayscale scaled to 8 bits, animations
give their first frame, EXIF orientation applied, large images shrunk to `max_side`), or
raises `ImageError` naming the file and the reason (unreadable, a possible decompression
bomb, or a strip too elongated for any vision model). `load_items` never fails on one bad
file: it skips it with a warning, and raises only when nothing usable is left.

What a particular model's processor accepts is checked later, once the model is loaded, by
`ttrv.screening.screen_items`.
"""

from __future__ import annotations

import csv
import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .tasks import Item

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".gif", ".bmp", ".dib", ".webp", ".tif", ".tiff"}
    | {".ppm", ".pgm", ".pbm", ".pnm", ".tga"}
)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

# Longest side over shortest side of the image a model receives. Qwen2/2.5/3-VL's processors
# refuse anything over 200:1 (with no file name); the other families squash such a strip
# into a square where nothing is left to see. Realistic photos stay far below (a panorama
# is ~10:1), so the cheap check here gives a clear message before any model is loaded.
MAX_ASPECT = 200.0


class ImageError(ValueError):
    """An image file cannot be used; the message names the file and says why."""


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (the `Item.image_id` of a loaded file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _gray_to_8bit(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float grayscale -> "L", scaled rather than clipped."""
    arr = np.asarray(im).astype(np.float64)  # [H, W]
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and hi <= 65535):
        arr = arr / 257.0  # 16-bit range (PNG and TIFF 16-bit open as I;16 or I)
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        arr = arr * 255.0
    elif not (lo >= 0 and hi <= 255):
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I") or im.mode == "F":
        im = _gray_to_8bit(im)
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _shrunk_size(w: int, h: int, max_side: int | None) -> tuple[int, int]:
    if not max_side or max(w, h) <= max_side:
        return w, h
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _shrink(im: Image.Image, max_side: int | None) -> Image.Image:
    size = _shrunk_size(*im.size, max_side)
    if size == im.size:
        return im
    return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _aspect(w: int, h: int) -> float:
    return max(w, h) / max(1, min(w, h))


def load_image(
    path: str | Path,
    max_side: int | None = 1024,
    max_pixels: int | None = None,
    max_aspect: float | None = MAX_ASPECT,
) -> Image.Image:
    """The image at `path` as RGB, its longer side at most `max_side` (None: any size).

    Images over `max_pixels` (default: Pillow's `Image.MAX_IMAGE_PIXELS`, ~89 Mpx) are
    refused as possible decompression bombs, before their pixels are decoded. Images whose
    sides differ by more than `max_aspect` times (as given, or after shrinking, which can
    round the short side down) are refused as strips no model can use (None: no limit).
    """
    path = Path(path)
    try:
        if not path.exists():
            raise ImageError(f"{path}: file not found")
        if path.is_dir():
            raise ImageError(f"{path}: is a folder, not an image file")
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)")
    except OSError as e:
        raise ImageError(f"{path}: cannot read the file ({e.strerror or e})") from e
    limit = max_pixels or Image.MAX_IMAGE_PIXELS
    try:
        # Pillow warns (DecompressionBombWarning, straight to stderr) while opening an image
        # over its pixel limit, before the size check below can give this product's own
        # message; that check uses the same limit, so the warning is silenced, not lost.
        # (The filter list is process-wide: meanwhile other threads ignore this category too.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            rgb = _decode(path, max_side, limit, max_aspect)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: too many pixels, a possible decompression bomb ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{path}: not an image file Pillow can read") from e
    except Exception as e:  # Pillow's decoders raise many types on corrupt data
        raise ImageError(f"{path}: corrupt or truncated image ({type(e).__name__}: {e})") from e
    out = _shrink(rgb, max_side)
    # The header check in _decode predicts this size; JPEG draft decoding can round it
    # differently, and the model gets exactly this image.
    _check_aspect(path, rgb.size, out.size, max_aspect)
    return out


def _check_aspect(
    path: Path, given: tuple[int, int], out: tuple[int, int], max_aspect: float | None
) -> None:
    ratio = max(_aspect(*given), _aspect(*out))
    if max_aspect and ratio > max_aspect:
        w, h = given
        raise ImageError(
            f"{path}: {w} x {h} pixels is too elongated for a vision model (aspect ratio "
            f"{ratio:.0f}:1, the limit is {max_aspect:g}:1); crop it into pieces first"
        )


def _decode(path: Path, max_side: int | None, limit: int, max_aspect: float | None) -> Image.Image:
    with Image.open(path) as im:
        w, h = im.size
        if limit and w * h > limit:
            raise ImageError(
                f"{path}: {w} x {h} pixels is over the {limit:,}-pixel limit (a possible "
                "decompression bomb); shrink the image first"
            )
        # Judged on the header, before decoding: both as given and as the model would get
        # it (4000 x 20 is 200:1, but shrunk to 1024 x 5 it is 204.8:1).
        _check_aspect(path, (w, h), _shrunk_size(w, h, max_side), max_aspect)
        if max_side and im.format == "JPEG":
            im.draft(im.mode, (max_side, max_side))  # decode at a reduced scale
        im.load()  # first frame of an animation; truncated data fails here
        try:
            oriented = ImageOps.exif_transpose(im)
        except Exception:  # a broken EXIF block must not cost the image
            oriented = im.copy()
        return _to_rgb(oriented)


def collect_images(paths: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Files to load: folders expanded (recursively, sorted, by image extension).

    Files named explicitly are kept whatever their extension (loading judges them);
    hidden files and folders (".name") inside folders are ignored. Returns the files and
    one warning per thing skipped.
    """
    found: list[Path] = []
    warnings: list[str] = []
    seen: set[Path] = set()

    def add(file: Path) -> None:
        key = file.resolve()
        if key in seen:
            warnings.append(f"{file}: listed more than once, loaded once")
        else:
            seen.add(key)
            found.append(file)

    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            images, others = _walk(path)
            if others:
                shown = ", ".join(p.name for p in others[:3]) + (", ..." if len(others) > 3 else "")
                warnings.append(
                    f"{path}: skipped {len(others)} file(s) without an image extension ({shown})"
                )
            if not images:
                warnings.append(f"{path}: no image files in this folder")
            for file in images:
                add(file)
        elif path.is_file():
            add(path)
        elif path.exists():
            warnings.append(f"{path}: not a regular file, skipped")
        else:
            warnings.append(f"{path}: not found, skipped")
    return found, warnings


def _walk(folder: Path) -> tuple[list[Path], list[Path]]:
    images: list[Path] = []
    others: list[Path] = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if not name.startswith("."):
                file = Path(root) / name
                (images if file.suffix.lower() in IMAGE_EXTENSIONS else others).append(file)
    images.sort(key=lambda p: p.relative_to(folder).parts)
    return images, others


@dataclass(frozen=True)
class LabelRow:
    """One row of a labels CSV."""

    label: str | None
    question: str | None = None
    options: tuple[str, ...] | None = None


def read_labels_csv(path: str | Path) -> tuple[dict[str, LabelRow], list[str]]:
    """Rows of a CSV with columns file, label[, question][, options], keyed by `file`.

    `options` are ';'-separated. `file` is a path relative to the CSV's folder or a bare
    file name. Raises ValueError when the file or its `file` column is missing.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = {(h or "").strip().lower(): h for h in reader.fieldnames or []}
            if "file" not in header:
                raise ValueError(
                    f"{path}: no 'file' column; the header must be file,label[,question][,options]"
                )
            raw_rows = list(reader)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the labels file ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text; save the CSV as UTF-8") from e

    def cell(row: dict[str, str | None], name: str) -> str | None:
        value = (row.get(header[name]) or "").strip() if name in header else ""
        return value or None

    rows: dict[str, LabelRow] = {}
    warnings: list[str] = []
    for line, row in enumerate(raw_rows, start=2):
        file = cell(row, "file")
        if file is None:
            warnings.append(f"{path.name} line {line}: no file name, row skipped")
            continue
        key = PurePosixPath(file.replace("\\", "/")).as_posix()
        options = None
        if (text := cell(row, "options")) is not None:
            parts = tuple(o.strip() for o in text.split(";") if o.strip())
            if len(parts) < 2:
                warnings.append(f"{path.name} line {line}: fewer than 2 options, ignored")
            else:
                options = parts
        if key in rows:
            warnings.append(f"{path.name} line {line}: {key} listed again, this row wins")
        rows[key] = LabelRow(cell(row, "label"), cell(row, "question"), options)
    return rows, warnings


def _csv_key(rows: dict[str, LabelRow], csv_dir: Path, file: Path) -> str | None:
    try:
        rel = file.resolve().relative_to(csv_dir).as_posix()
        if rel in rows:
            return rel
    except ValueError:
        pass
    return file.name if file.name in rows else None


def load_items(
    paths: Sequence[str | Path],
    *,
    max_side: int | None = 1024,
    labels_from_folders: bool = False,
    labels_csv: str | Path | None = None,
) -> tuple[list[Item], list[str]]:
    """Items for the images in `paths` (files and folders), and a warning per thing skipped.

    Bad files and byte-identical copies are skipped with a warning. Labels come from the
    enclosing folder's name (`labels_from_folders`; files directly inside a given folder
    get none) and from `labels_csv`, whose non-empty cells win. Raises ImageError when no
    usable image is left.
    """
    files, warnings = collect_images(paths)
    roots = {Path(p).expanduser().resolve() for p in paths if Path(p).expanduser().is_dir()}
    rows: dict[str, LabelRow] = {}
    csv_dir = Path()
    if labels_csv is not None:
        rows, csv_warnings = read_labels_csv(labels_csv)
        warnings += csv_warnings
        csv_dir = Path(labels_csv).resolve().parent
    used_rows: set[str] = set()
    unlabeled_at_root = 0
    items: list[Item] = []
    first_copy: dict[str, Path] = {}
    for file in files:
        key = _csv_key(rows, csv_dir, file) if rows else None
        if key is not None:
            used_rows.add(key)
        try:
            digest = file_sha256(file)
        except OSError as e:
            warnings.append(f"{file}: cannot read the file ({e.strerror or e}), skipped")
            continue
        if digest in first_copy:
            warnings.append(f"{file}: identical to {first_copy[digest]}, skipped")
            continue
        first_copy[digest] = file
        try:
            image = load_image(file, max_side=max_side)
        except ImageError as e:
            warnings.append(f"{e}; skipped")
            continue
        item = Item(image_id=digest, name=file.name, image=image, meta={"path": str(file)})
        if labels_from_folders:
            if file.parent.resolve() in roots:
                unlabeled_at_root += 1
            else:
                item.label = file.parent.name
        if key is not None:
            row = rows[key]
            item.label = row.label or item.label
            item.question = row.question
            item.options = list(row.options) if row.options else None
        items.append(item)
    if unlabeled_at_root:
        warnings.append(
            f"{unlabeled_at_root} image(s) sit directly in a given folder, not in a class "
            "folder, so they have no folder label"
        )
    if unused := sorted(set(rows) - used_rows):
        shown = ", ".join(unused[:3]) + (", ..." if len(unused) > 3 else "")
        warnings.append(
            f"{Path(labels_csv or '').name}: {len(unused)} row(s) match no image ({shown})"
        )
    if not items:
        detail = "; ".join(warnings[:5]) + (
            f"; and {len(warnings) - 5} more" if len(warnings) > 5 else ""
        )
        raise ImageError(f"no usable images in {', '.join(map(str, paths)) or 'nothing'}: {detail}")
    return items, warnings
