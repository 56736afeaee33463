"""Session archives as an attacker would craft them (issue 11, Security).

Each attack is built from a real export, changed the way a shared archive could be, and
must be refused with a clear message (writing nothing) or defused and shown: a config that
turns remote code on, a model the archive names but this machine does not have, an html
page stored as an "image", a zip bomb, rows of the wrong types, and damaged members.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from sessions import Store, StoreError, archive, jobs, paths
from sessions.worker import Worker, run_until_idle
from ttrv.config import AdaptConfig

from .test_archive import build_source, rewritten, snapshot
from .test_store import png

MiB = 1 << 20


@pytest.fixture
def good(tmp_path: Path) -> Path:
    """A real export of a finished session (bundled model, no remote code)."""
    store, sid = build_source(tmp_path)
    with store:
        return store.export_session(sid, tmp_path / "good.zip")


def exported(tmp_path: Path, **model: object) -> Path:
    """An export of a session whose config's model section has `model` changes."""
    config = AdaptConfig().to_dict()
    config["model"].update(model)
    store, sid = build_source(tmp_path, config)
    with store:
        return store.export_session(sid, tmp_path / "shared.zip")


def tables_of(path: Path) -> dict[str, list[dict]]:
    with zipfile.ZipFile(path) as zf:
        return {
            n[len("tables/") : -len(".json")]: json.loads(zf.read(n))
            for n in zf.namelist()
            if n.startswith("tables/")
        }


def with_tables(
    path: Path,
    dest: Path,
    edit: Callable[[dict[str, list[dict]]], None],
    files: dict[str, bytes] | None = None,
) -> Path:
    """A copy of the archive `path` with its tables changed by `edit` and `files` added
    (listed in the manifest with their true sha256, as a careful attacker would)."""
    tables = tables_of(path)
    edit(tables)
    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    for name, data in (files or {}).items():
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    changes: dict[str, bytes] = {
        f"tables/{t}.json": json.dumps(rows).encode() for t, rows in tables.items()
    }
    changes["manifest.json"] = json.dumps(manifest).encode()
    return rewritten(path, dest, files, **changes)


def refused_cleanly(archive_path: Path, root: Path, match: str) -> StoreError:
    """Import into a fresh store must raise StoreError matching `match` and write nothing."""
    with Store(root) as victim:
        before = snapshot(victim.data_dir)
        with pytest.raises(StoreError, match=match) as caught:
            victim.import_archive(archive_path)
        assert victim.list_sessions() == []
        assert snapshot(victim.data_dir) == before
        assert not any(p.name.startswith(".tmp") for p in victim.data_dir.rglob("*"))
    return caught.value


# -- 1. remote code and models the archive names -------------------------------------------


def test_import_turns_remote_code_off_and_says_so(tmp_path):
    """Guards an archive whose config turns `trust_remote_code` on by itself."""
    shared = exported(tmp_path, trust_remote_code=True)
    with Store(tmp_path / "victim") as victim:
        sid = victim.import_archive(shared)
        config = victim.get_session(sid)["config"]
        assert config["model"]["trust_remote_code"] is False
        (imported,) = victim.events(sid, kind="imported")
        assert imported["data"]["trust_remote_code_reset"] is True
        warnings = [e["data"]["message"] for e in victim.events(sid, kind="warning")]
        assert any("remote code" in w and "turned off" in w for w in warnings), warnings

        # The person may turn it on again, for this session only, and that is recorded.
        archive.allow_remote_code(victim, sid)
        assert victim.get_session(sid)["config"]["model"]["trust_remote_code"] is True
        warnings = [e["data"]["message"] for e in victim.events(sid, kind="warning")]
        assert any("turned on" in w for w in warnings), warnings


def remote_code_model(folder: Path, marker: Path) -> Path:
    """A model folder whose config class is custom code that leaves `marker` when it runs."""
    folder.mkdir(parents=True)
    config = {"model_type": "ttrv_evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\n\n\n"
        "class EvilConfig(PretrainedConfig):\n"
        "    model_type = 'ttrv_evil'\n"
    )
    return folder


def test_resuming_an_imported_session_does_not_run_the_models_code(tmp_path, monkeypatch):
    """Guards the demonstrated attack: import, then run a job, and the model's code ran."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    marker = tmp_path / "code-ran"
    folder = remote_code_model(tmp_path / "models" / "evil", marker)
    shared = exported(tmp_path, model=str(folder), trust_remote_code=True)
    with Store(tmp_path / "victim") as victim:
        sid = victim.import_archive(shared)
        job = jobs.submit(victim, "baseline", {}, sid)
        run_until_idle(Worker(victim))
        result = jobs.get(victim, job)
        assert not marker.exists(), "the model's own code ran"
        assert result["status"] == "failed"
        assert "trust_remote_code" in result["error"], result["error"]


def test_imported_session_never_fetches_a_model_missing_here(tmp_path, monkeypatch):
    """Guards a hub id named by an archive being downloaded (and run) without asking."""
    import ttrv.loading

    calls: list[object] = []
    monkeypatch.setattr(ttrv.loading, "load_model", lambda cfg: calls.append(cfg))
    name = "ttrv-tests-nobody/not-on-this-machine"
    shared = exported(tmp_path, model=name)
    with Store(tmp_path / "victim") as victim:
        sid = victim.import_archive(shared)
        (imported,) = victim.events(sid, kind="imported")
        assert imported["data"]["model_on_this_machine"] is False
        warnings = [e["data"]["message"] for e in victim.events(sid, kind="warning")]
        assert any(name in w and "not on this machine" in w for w in warnings), warnings
        for kind in ("baseline", "evaluate", "ask"):
            request = {"image_path": str(png(tmp_path / "q.png", (1, 2, 3)))}
            job = jobs.submit(victim, kind, request if kind == "ask" else {}, sid)
            run_until_idle(Worker(victim))
            result = jobs.get(victim, job)
            assert result["status"] == "failed", kind
            assert "not on this machine" in result["error"] and name in result["error"]
    assert calls == []  # nothing tried to load (or download) it


def test_model_presence_check_sees_local_folders_only(tmp_path):
    """Guards the presence check itself: a folder with config.json is local, else not."""
    from ttrv.config import BUNDLED_MODEL

    assert archive.model_on_this_machine(BUNDLED_MODEL)
    assert not archive.model_on_this_machine(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    assert not archive.model_on_this_machine(str(tmp_path / "empty"))
    assert not archive.model_on_this_machine("ttrv-tests-nobody/absent")
    assert not archive.model_on_this_machine("not a valid hub id ../..")


# -- 2. stored files that a browser would render -----------------------------------------


def _png_bytes(color: tuple[int, int, int] = (1, 2, 3)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buffer, format="PNG")
    return buffer.getvalue()


PAGE = b"<html><body><script>fetch('/gradio_api/file=sessions.db')</script></body></html>"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'


@pytest.mark.parametrize(
    ("ext", "data", "thumb"),
    [
        (".html", PAGE, _png_bytes()),  # the reported attack
        (".svg", SVG, _png_bytes()),  # an image type that carries script
        (".png", PAGE, _png_bytes()),  # an image name over a page
        (".png", _png_bytes((9, 9, 9)), PAGE),  # a page as the thumbnail
        (".jpg", _png_bytes((8, 8, 8)), _png_bytes()),  # content and name disagree
    ],
    ids=["html", "svg", "page-named-png", "page-as-thumbnail", "png-named-jpg"],
)
def test_imported_image_that_is_not_that_image_is_refused(good, tmp_path, ext, data, thumb):
    """Guards an html file stored under the images folder, which the UI serves inline."""
    sha = hashlib.sha256(data).hexdigest()
    name, thumb_name = f"images/{sha[:2]}/{sha}{ext}", f"images/{sha[:2]}/{sha}.thumb.png"

    def add_image(tables: dict[str, list[dict]]) -> None:
        image = tables["images"][0]
        tables["images"].append(
            {**image, "id": sha, "ext": ext, "bytes": len(data), "path": name, "thumb": thumb_name}
        )
        link = tables["session_images"][0]
        tables["session_images"].append(
            {**link, "image_id": "page", "sha256": sha, "name": "page", "position": 9}
        )

    bad = with_tables(good, tmp_path / "bad.zip", add_image, {name: data, thumb_name: thumb})
    refused_cleanly(bad, tmp_path / "victim", "not an image|not a .* image|not a PNG")


def test_added_image_is_stored_under_the_extension_of_its_content(tmp_path):
    """Guards the add-image path keeping a user's (or a zip's) `.html` name on disk."""
    disguised = tmp_path / "in" / "photo.html"
    disguised.parent.mkdir()
    disguised.write_bytes(_png_bytes((5, 6, 7)))
    odd = tmp_path / "in" / "portable.ppm"  # readable, but not a type we serve: re-encoded
    Image.new("RGB", (5, 5), (200, 0, 0)).save(odd, format="PPM")
    with Store(tmp_path / "data") as store:
        sid = store.create_session("s", AdaptConfig().to_dict(), "m", "open")
        rows = store.add_images(sid, [{"path": disguised}, {"path": odd}])
        stored = [Path(r["path"]) for r in rows]
        assert [p.suffix for p in stored] == [".png", ".png"]
        assert stored[0].read_bytes() == disguised.read_bytes()  # PNG kept byte for byte
        with Image.open(stored[1]) as image:
            assert image.format == "PNG" and image.getpixel((0, 0)) == (200, 0, 0)
        files = [p.suffix for p in (store.data_dir / "images").rglob("*") if p.is_file()]
        assert set(files) == {".png"}
        with pytest.raises(StoreError, match="not an image"):
            page = tmp_path / "in" / "page.png"
            page.write_bytes(PAGE)
            store.add_images(sid, [{"path": page}])
    with pytest.raises(ValueError, match="not an image"):
        paths.image_relpath("a" * 64, ".html")


def test_ui_serves_images_and_thumbnails_but_never_the_database(tmp_path):
    """Guards `sessions.db`, its WAL and adapters being downloadable from the app."""
    from gradio.utils import is_allowed_file

    from ui.workbench import launch_options

    with Store(tmp_path / "data") as store:
        sid = store.create_session("s", AdaptConfig().to_dict(), "m", "open")
        (image,) = store.add_images(sid, [{"path": png(tmp_path / "a.png", (1, 1, 1))}])
        allowed = launch_options(store, tmp_path / "demo")["allowed_paths"]
        adapter = store.adapter_dir(sid) / "round1-step1" / "adapter_model.safetensors"
        adapter.parent.mkdir(parents=True)
        adapter.write_bytes(b"w")

        def served(p: Path) -> bool:
            return is_allowed_file(p.resolve(), [], allowed, [])[0]

        data = store.data_dir
        for secret in (data / "sessions.db", data / "sessions.db-wal", data / "sessions.db-shm"):
            assert not served(secret), secret
        assert not served(adapter)
        assert served(Path(image["path"])) and served(Path(image["thumb"]))
        assert served(tmp_path / "demo" / "digit.png")
        assert paths.servable_dirs(data) == [str(data / "images")]


# -- 3. size limits ------------------------------------------------------------------------


def with_member(good: Path, dest: Path, name: str, size: int, fill: bytes = b" ") -> Path:
    """`good` with member `name` replaced by a JSON list of `size` bytes of `fill`, written in
    1 MiB pieces (a 1 GiB member costs 3 s and 1 MB of disk, never 1 GiB of memory)."""
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            if info.filename != name:
                out.writestr(info, src.read(info))
        with out.open(name, "w", force_zip64=size > 1 << 31) as f:
            f.write(b"[")
            piece = fill * MiB
            for _ in range(size // MiB):
                f.write(piece)
            f.write(b"]")
    return dest


def test_one_gib_json_member_is_refused_without_reading_it(good, tmp_path):
    """Guards the reported bomb: a small archive whose JSON table unpacks to 1 GiB."""
    bomb = with_member(good, tmp_path / "bomb.zip", "tables/rollouts.json", 1 << 30)
    assert bomb.stat().st_size < 4 * MiB
    tracemalloc.start()
    try:
        error = refused_cleanly(bomb, tmp_path / "victim", "tables/rollouts.json")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "GiB" in str(error) and "Nothing was extracted" in str(error)
    assert peak < 32 * MiB, f"peak {peak / MiB:.1f} MiB"


def test_highly_compressed_member_is_refused(good, tmp_path):
    """Guards a bomb under the size limit: 64 MiB packed a thousand to one."""
    bomb = with_member(good, tmp_path / "ratio.zip", "tables/steps.json", 64 * MiB)
    refused_cleanly(bomb, tmp_path / "victim", "compress")


def test_total_unpacked_size_is_bounded(good, tmp_path, monkeypatch):
    """Guards many members each under the limit that together fill the disk."""
    with zipfile.ZipFile(good) as zf:
        sizes = [i.file_size for i in zf.infolist()]
    limit = sum(sizes) - 1  # every member is well under it; together they are one byte over
    assert max(sizes) < limit
    monkeypatch.setattr(archive, "MAX_TOTAL_BYTES", limit)
    refused_cleanly(good, tmp_path / "victim", "it would unpack to")


def _patch_sizes(path: Path, name: str, declared: int) -> None:
    """Make the zip headers of `name` claim `declared` uncompressed bytes (CRC untouched)."""
    blob = bytearray(path.read_bytes())
    encoded = name.encode()
    start = 0
    while (at := blob.find(encoded, start)) >= 0:
        start = at + 1
        if blob[at - 30 : at - 26] == b"PK\x03\x04":  # local header: size at offset 22
            struct.pack_into("<I", blob, at - 30 + 22, declared)
        elif blob[at - 46 : at - 42] == b"PK\x01\x02":  # central directory: offset 24
            struct.pack_into("<I", blob, at - 46 + 24, declared)
    path.write_bytes(bytes(blob))


def test_member_larger_than_it_declares_is_refused(good, tmp_path):
    """Guards trusting declared sizes: headers say 100 bytes, the data holds 50 MiB."""
    liar = with_member(good, tmp_path / "liar.zip", "tables/steps.json", 50 * MiB, fill=b"[1],")
    _patch_sizes(liar, "tables/steps.json", 100)
    assert zipfile.ZipFile(liar).getinfo("tables/steps.json").file_size == 100
    tracemalloc.start()
    try:
        refused_cleanly(liar, tmp_path / "victim", "damaged")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * MiB, f"peak {peak / MiB:.1f} MiB"


# -- 4. rows of the wrong shape, damaged members -------------------------------------------


def _set(table: str, column: str, value: object, row: int = 0) -> Callable[[dict], None]:
    def edit(tables: dict[str, list[dict]]) -> None:
        tables[table][row][column] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_set("steps", "step", "1; DROP TABLE steps"), "steps row 1: step must be a whole number"),
        (_set("steps", "step", 1.5), "step must be a whole number"),
        (_set("rollouts", "reward", "high"), "reward must be a number"),
        (_set("answers", "answer", ["a"]), "answer must be text"),
        (_set("sessions", "config", "trust_remote_code=True"), "config is not a settings object"),
        (_set("sessions", "config", {"model": {"run": "rm -rf /"}}), "not valid settings"),
        (_set("sessions", "config", {"lora": {"rank": -3}}), "not valid settings"),
        (_set("sessions", "status", "pwned"), "status 'pwned' is not one of"),
        (_set("checkpoints", "path", "/etc"), "checkpoint path '/etc'"),
        (_set("checkpoints", "path", "adapters/../../../etc"), "checkpoint path"),
        (_set("checkpoints", "path", "images/ab/x.png"), "checkpoint path"),
        (_set("session_images", "sha256", "f" * 64), "refers to an image"),
        (_set("events", "kind", None), "events row 1 has no kind"),
        (lambda t: t["steps"].append("not a row"), "steps row 3 is not an object"),
    ],
    ids=[
        "step-text",
        "step-fraction",
        "reward-text",
        "answer-list",
        "config-string",
        "config-unknown-field",
        "config-invalid-value",
        "status-unknown",
        "checkpoint-absolute",
        "checkpoint-escaping",
        "checkpoint-outside-adapters",
        "image-link-dangling",
        "event-without-kind",
        "row-not-object",
    ],
)
def test_malformed_rows_are_refused_with_a_clear_message(good, tmp_path, edit, match):
    """Guards rows of the wrong type or pointing outside the data directory being stored."""
    bad = with_tables(good, tmp_path / "bad.zip", edit)
    refused_cleanly(bad, tmp_path / "victim", match)


def _corrupt(path: Path, name: str) -> None:
    """Overwrite the start of `name`'s deflate stream with bytes zlib refuses."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    blob = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", blob, info.header_offset + 26)
    data_at = info.header_offset + 30 + name_len + extra_len
    blob[data_at : data_at + 8] = b"\xff" * 8  # block type 3: "invalid block type"
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("member", ["tables/rollouts.json", "manifest.json", "images"])
def test_damaged_member_gives_a_clear_message(good, tmp_path, member):
    """Guards a raw zlib.error / BadZipFile reaching the person for a damaged download."""
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(good.read_bytes())
    if member == "images":
        with zipfile.ZipFile(good) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".thumb.png"))
    _corrupt(damaged, member)
    error = refused_cleanly(damaged, tmp_path / "victim", "damaged")
    assert member in str(error)
