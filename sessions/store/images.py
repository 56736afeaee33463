"""Images: reading and thumbnailing them, storing their files once per data directory
(content-addressed by sha256), and linking them to sessions."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import paths
from ..schema import StoreError, translate
from .base import StoreBase
from .files import write_atomic
from .tables import now, parse_json_columns, to_json

if TYPE_CHECKING:
    from sqlite_utils import Database

THUMB_PX = 128


class _ImageFile:
    """One image's bytes ready to store: from a file path or an in-memory PIL image."""

    def __init__(self, data: bytes, ext: str, width: int, height: int, thumb: bytes) -> None:
        self.data, self.ext, self.width, self.height, self.thumb = data, ext, width, height, thumb
        self.sha256 = hashlib.sha256(data).hexdigest()


def load_image(source: Any, name: str) -> _ImageFile:
    """Read `source` (a path or a PIL image) into bytes + size + a 128 px PNG thumbnail.

    A path keeps its original bytes under the extension of the format Pillow finds in them
    (never the file's own suffix: the images folder is served, and a browser would render a
    `.html` name as a page); other formats, and PIL images, are stored as PNG.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, str | os.PathLike):
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StoreError(f"Cannot read image {name!r} from {path}: {exc}") from exc
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise StoreError(f"{path} is not an image Pillow can read ({exc}).") from exc
        ext = paths.ext_for_format(image.format)
        if ext is None:  # readable, but not a format served as it is: store it as PNG
            if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
                image = image.convert("RGBA")  # modes PNG cannot hold (CMYK, YCbCr, F...)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data, ext = buffer.getvalue(), ".png"
    elif isinstance(source, Image.Image):
        image = source
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data, ext = buffer.getvalue(), ".png"
    else:
        raise StoreError(
            f"Image {name!r} has neither a readable file path nor a PIL image "
            f"(got {type(source).__name__})."
        )
    thumb = image.copy()
    if thumb.mode not in ("RGB", "RGBA", "L", "LA"):
        thumb = thumb.convert("RGBA")
    thumb.thumbnail((THUMB_PX, THUMB_PX))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return _ImageFile(data, ext, image.width, image.height, buffer.getvalue())


def _item_fields(item: Any) -> dict[str, Any]:
    """Normalise an item (a `ttrv.tasks.Item` or a dict) to the fields the store keeps."""
    if isinstance(item, dict):
        get = item.get
        meta = item.get("meta") or {}
    else:

        def get(key: str, default: Any = None) -> Any:
            return getattr(item, key, default)

        meta = getattr(item, "meta", None) or {}
    path = get("path") or get("source") or meta.get("path")
    source: Any = path if path and Path(path).is_file() else get("image")
    if source is None:
        source = path  # let load_image report the unreadable path
    options = get("options")
    if options is not None and (
        not isinstance(options, list | tuple) or not all(isinstance(o, str) for o in options)
    ):
        raise StoreError(f"Options of image {get('name')!r} must be a list of strings.")
    label, question = get("label"), get("question")
    return {
        "image_id": get("image_id"),
        "name": get("name") or (Path(path).name if path else None),
        "source": source,
        "label": None if label is None else str(label),
        "question": question,
        "options": None if options is None else list(options),
    }


class Images(StoreBase):
    """The `images` rows (one per stored file) and `session_images` (a session's images,
    in order, with their labels and questions)."""

    def add_images(self, session_id: str, items: Iterable[Any]) -> list[dict[str, Any]]:
        """Add images to a session, each stored once per data directory.

        Each item is a `ttrv.tasks.Item` (its `meta["path"]`, when it is a readable file,
        gives the original bytes; else `image` is stored as PNG) or a dict with `image_id`
        (default: the sha256 of the stored bytes), `name`, `path` or `image` (PIL), `label`,
        `question`, `options`. `image_id` is the id the engine uses in its events; the
        stored file is named by the sha256 of its bytes. Re-adding an image_id updates its
        label, question and options and keeps its position. Returns the added images as
        `images()` describes them.
        """
        with self.snapshot("adding images") as db:
            self.session_row(db, session_id)
        image_rows, links = [], []
        with self.storing_files() as written:
            try:
                for item in items:  # one image in memory at a time
                    fields = _item_fields(item)
                    image = load_image(fields.pop("source"), str(fields["name"] or "image"))
                    fields["image_id"] = str(fields["image_id"] or image.sha256)
                    fields["name"] = str(fields["name"] or fields["image_id"][:12])
                    if fields["options"] is not None:
                        fields["options"] = to_json(fields["options"])
                    rel, thumb_rel, new = self._store_image_file(image)
                    if new:
                        written.append(image.sha256)
                    image_rows.append(
                        {
                            "id": image.sha256,
                            "ext": image.ext,
                            "width": image.width,
                            "height": image.height,
                            "bytes": len(image.data),
                            "path": rel,
                            "thumb": thumb_rel,
                            "created": now(),
                        }
                    )
                    links.append({"session_id": session_id, "sha256": image.sha256, **fields})
                with self.transaction("adding images") as db:
                    self._link_images(db, session_id, image_rows, links)
            except OSError as exc:
                raise translate(exc, "storing images") from exc
        ids = {link["image_id"] for link in links}
        return [r for r in self.images(session_id) if r["image_id"] in ids]

    def _link_images(
        self, db: Database, session_id: str, image_rows: list[dict], links: list[dict]
    ) -> None:
        self.session_row(db, session_id)
        db["images"].insert_all(image_rows, ignore=True)
        position = db.execute(
            "SELECT coalesce(max(position) + 1, 0) FROM session_images WHERE session_id = ?",
            [session_id],
        ).fetchone()[0]
        for link in links:
            old = db.execute(
                "SELECT position FROM session_images WHERE session_id = ? AND image_id = ?",
                [session_id, link["image_id"]],
            ).fetchone()
            db["session_images"].insert(
                {**link, "position": old[0] if old else position}, replace=True
            )
            position += 0 if old else 1

    def images(
        self,
        session_id: str,
        image_id: str | None = None,
        *,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """The session's images in order: image_id, name, position, label, question,
        options (list or None), sha256, width, height, path and thumb (absolute, or None
        for an image known only from the engine's run_start). `image_id` gives that image
        alone (or an empty list); `limit`/`offset` one page in order."""
        where, params = "si.session_id = ?", [session_id]
        if image_id is not None:
            where += " AND si.image_id = ?"
            params.append(image_id)
        where += " ORDER BY si.position"
        if limit is not None or offset:
            where += " LIMIT ? OFFSET ?"
            params += [-1 if limit is None else int(limit), int(offset)]
        keys = ("image_id", "name", "position", "label", "question", "options", "sha256",
                "width", "height", "path", "thumb")  # fmt: skip
        with self.snapshot("listing images") as db:
            self.session_row(db, session_id)
            found = db.execute(
                "SELECT si.image_id, si.name, si.position, si.label, si.question, si.options, "
                "si.sha256, i.width, i.height, i.path, i.thumb FROM session_images si "
                f"LEFT JOIN images i ON i.id = si.sha256 WHERE {where}",
                params,
            ).fetchall()
        root = str(self.data_dir)  # os.path.join: a Path per file costs ~10 us x 20,000
        rows = []
        for values in found:
            r = dict(zip(keys, values, strict=True))
            parse_json_columns("session_images", r)
            for key in ("path", "thumb"):
                r[key] = os.path.join(root, r[key]) if r[key] else None
            rows.append(r)
        return rows

    @contextlib.contextmanager
    def storing_files(self) -> Iterator[list[str]]:
        """Hold the store's file lock while a block writes files into the data directory
        and inserts the rows that reference them. The block appends the sha256 of each
        image file it writes to the yielded list; when the block raises, the files of those
        that no `images` row references are removed again, so a failed add or import
        leaves no stray file behind."""
        written: list[str] = []
        with self._files_lock:
            try:
                yield written
            except BaseException:
                self._remove_unreferenced(written)
                raise

    def _store_image_file(self, image: _ImageFile) -> tuple[str, str, bool]:
        """Write the image and its thumbnail once (content-addressed); (path, thumb, new)."""
        rel = paths.image_relpath(image.sha256, image.ext)
        thumb_rel = paths.thumb_relpath(image.sha256)
        target = self.data_dir / rel
        new = not target.exists()
        if new:
            write_atomic(target, image.data)
        if not (self.data_dir / thumb_rel).exists():
            write_atomic(self.data_dir / thumb_rel, image.thumb)
        return rel, thumb_rel, new

    def _remove_unreferenced(self, shas: Iterable[str]) -> None:
        """Remove image files (written by a failed call) that no row references."""
        db = self._db()
        for sha in shas:
            used = db.execute("SELECT 1 FROM images WHERE id = ?", [sha]).fetchone()
            if used:
                continue
            folder = self.data_dir / paths.IMAGES / sha[:2]
            for f in folder.glob(f"{sha}.*"):
                with contextlib.suppress(OSError):
                    f.unlink()
