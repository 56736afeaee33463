"""Session archives: lossless export/import, and refusal of archives that are not ours."""

from __future__ import annotations

import io
import json
import stat
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from sessions import Store, StoreError, read_manifest
from ttrv.config import AdaptConfig
from ttrv.tasks import Item

from .test_store import png, rollout_records, step_record


def build_source(tmp_path: Path, config: dict | None = None) -> tuple[Store, str]:
    """A finished session with images, steps, rollouts, answers, a checkpoint and events,
    in an open store under `tmp_path / "source"` (close it). `config`: the session's."""
    store = Store(tmp_path / "source")
    config = config or AdaptConfig().to_dict()
    sid = store.create_session("export me", config, config["model"]["model"], "classes")
    store.add_images(
        sid,
        [
            {"path": png(tmp_path / "in" / "a.png", (10, 20, 30)), "label": "3"},
            Item(image_id="pil", name="pil", image=Image.new("L", (9, 9), 7), options=["a"]),
        ],
    )
    ids = [r["image_id"] for r in store.images(sid)]
    sink = store.sink(sid)
    sink("run_start", {"config": config, "images": [], "model": {"x": 1}})
    sink(
        "answers",
        {"phase": "before", "answers": [{"image_id": ids[0], "response": "é", "answer": "é"}]},
    )
    for step in range(2):
        sink("rollouts", {"step": step, "rollouts": rollout_records(step, ids, 3)})
        sink("step", step_record(step, loss=float("inf")))
    folder = store.adapter_dir(sid) / "round1-step1"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"\x00weights")
    (folder / "adapter_config.json").write_text("{}")
    sink("checkpoint", {"round": 1, "step": 1, "path": str(folder)})
    sink("guard", {"step": 1, "action": "warn", "reason": "r", "signals": {}, "checkpoint": None})
    sink(
        "answers",
        {"phase": "round-1", "answers": [{"image_id": ids[0], "response": "3", "answer": "3"}]},
    )
    sink("run_end", {"status": "guard_stopped", "steps": 2, "reason": "entropy fell"})
    return store, sid


@pytest.fixture
def source(tmp_path: Path):
    store, sid = build_source(tmp_path)
    with store:
        yield store, sid


def comparable(store: Store, sid: str) -> dict[str, list[dict]]:
    """Every table's rows for the session, without ids and with adapter paths made relative,
    and without the "imported" events that an import adds (the archive's own rows only)."""
    tables = store.dump(sid)
    tables["events"] = [e for e in tables["events"] if e["kind"] != "imported"]
    drop = {"id", "session_id"}
    out = {}
    for table, rows in tables.items():
        keep = set() if table == "images" else drop
        out[table] = [{k: v for k, v in r.items() if k not in keep} for r in rows]
    for checkpoint in out["checkpoints"]:
        checkpoint["path"] = checkpoint["path"].replace(f"adapters/{sid}/", "adapters/")
    return out


def test_export_then_import_gives_the_same_data(source, tmp_path):
    """Guards lossy archives: every row of every table, the images and adapters come back."""
    store, sid = source
    archive = store.export_session(sid, tmp_path / "out" / "session.zip")
    manifest = read_manifest(archive)
    assert manifest["format"] == "ttrv-workbench-session" and manifest["missing"] == []
    with zipfile.ZipFile(archive) as zf:
        assert {"csv/steps.csv", "csv/rollouts.csv", "csv/answers.csv"} <= set(zf.namelist())

    with Store(tmp_path / "fresh") as fresh:
        same = fresh.import_archive(archive)
        assert same == sid  # the id is free there, so it is kept
        assert comparable(fresh, same) == comparable(store, sid)
        (imported,) = fresh.events(same, kind="imported")
        assert imported["data"]["trust_remote_code_reset"] is False
        assert imported["data"]["model_on_this_machine"] is True  # the bundled model
        assert not fresh.events(same, kind="warning")
        assert (
            Path(fresh.images(same)[0]["path"]).read_bytes()
            == (tmp_path / "in" / "a.png").read_bytes()
        )
        checkpoint = fresh.latest_checkpoint(same)
        assert (
            not checkpoint["missing"]
            and checkpoint["sha256"] == store.latest_checkpoint(sid)["sha256"]
        )

    again = store.import_archive(archive)
    assert again != sid  # taken in the source store: a new id
    assert comparable(store, again) == comparable(store, sid)
    assert store.get_session(again)["status"] == "stopped"
    image_files = [f for f in (store.data_dir / "images").rglob("*") if f.is_file()]
    assert len(image_files) == 4  # two images + two thumbnails, not copied again


def test_missing_adapter_is_reported_in_the_manifest(source, tmp_path):
    """Guards export crashing because the user deleted an adapter folder by hand."""
    store, sid = source
    for f in sorted(store.adapter_dir(sid).rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    manifest = read_manifest(store.export_session(sid, tmp_path / "s.zip"))
    assert manifest["missing"] == ["checkpoint round 1 step 1"]


def rewritten(archive: Path, dest: Path, extra: dict[str, bytes] | None = None, **changes) -> Path:
    """A copy of `archive` with members replaced (bytes) or dropped (None), plus `extra`."""
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(dest, "w") as out:
        for info in src.infolist():
            data = changes.get(info.filename, src.read(info))
            if data is not None:
                out.writestr(info, data)
        for name, data in (extra or {}).items():
            out.writestr(name, data)
    return dest


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` except the database (whose WAL files come and go)."""
    files = (p for p in root.rglob("*") if p.is_file() and not p.name.startswith("sessions.db"))
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


@pytest.mark.parametrize(
    "member",
    ["../evil.txt", "/tmp/ttrv-evil.txt", "adapters/../../evil.txt", "..\\evil.txt", "C:/evil.txt"],
)
def test_zip_slip_archives_are_refused_before_extracting(source, tmp_path, member):
    """Guards writing outside the data directory through crafted member names."""
    store, sid = source
    archive = store.export_session(sid, tmp_path / "good.zip")
    manifest = json.loads(zipfile.ZipFile(archive).read("manifest.json"))
    manifest["files"][member] = {"sha256": "0" * 64, "bytes": 1}
    bad = rewritten(
        archive, tmp_path / "bad.zip", {member: b"evil"}, **{"manifest.json": json.dumps(manifest)}
    )
    with Store(tmp_path / "victim") as victim:
        before = snapshot(victim.data_dir)
        with pytest.raises(StoreError, match="unsafe path|leaves"):
            victim.import_archive(bad)
        assert victim.list_sessions() == []
        assert snapshot(victim.data_dir) == before
    assert not any(p.name == "evil.txt" for p in tmp_path.rglob("*"))
    assert not Path("/tmp/ttrv-evil.txt").exists()


def test_symlink_members_are_refused(source, tmp_path):
    """Guards a link member pointing outside the data directory (extracted, then followed)."""
    store, sid = source
    archive = store.export_session(sid, tmp_path / "good.zip")
    link = zipfile.ZipInfo("adapters/link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(link, "/etc/passwd")
    with Store(tmp_path / "victim") as victim, pytest.raises(StoreError, match="link"):
        victim.import_archive(archive)


def test_archives_that_are_not_ours_are_refused(source, tmp_path):
    """Guards importing any zip (or non-zip) the user picked by mistake."""
    store, sid = source
    good = store.export_session(sid, tmp_path / "good.zip")
    not_zip = tmp_path / "notes.zip"
    not_zip.write_text("hello")
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as zf:
        zf.writestr("readme.txt", "hi")
    cases = {
        not_zip: "not a readable zip",
        plain: "no manifest",
        rewritten(
            good, tmp_path / "fmt.zip", **{"manifest.json": b'{"format": "other"}'}
        ): "unknown format",
        rewritten(good, tmp_path / "json.zip", **{"manifest.json": b"{nope"}): "not valid JSON",
        rewritten(
            good,
            tmp_path / "newer.zip",
            **{"manifest.json": json.dumps({**read_manifest(good), "version": 99})},
        ): "newer",
    }
    with Store(tmp_path / "victim") as victim:
        for archive, message in cases.items():
            with pytest.raises(StoreError, match=message):
                victim.import_archive(archive)
        assert victim.list_sessions() == []


def test_tampered_files_are_refused(source, tmp_path):
    """Guards importing a damaged or edited image/adapter under a trusted hash."""
    store, sid = source
    good = store.export_session(sid, tmp_path / "good.zip")
    name = next(n for n in read_manifest(good)["files"] if n.startswith("adapters/"))
    bad = rewritten(good, tmp_path / "bad.zip", **{name: b"other bytes"})
    with Store(tmp_path / "victim") as victim:
        with pytest.raises(StoreError, match="sha256"):
            victim.import_archive(bad)
        assert victim.list_sessions() == []
        assert not any(p.is_file() for p in (victim.data_dir / "adapters").rglob("*"))


def test_csv_export_is_readable(source, tmp_path):
    """Guards a CSV that spreadsheets cannot open (missing header, wrong row count)."""
    store, sid = source
    archive = store.export_session(sid, tmp_path / "s.zip")
    with zipfile.ZipFile(archive) as zf:
        text = zf.read("csv/rollouts.csv").decode()
    lines = io.StringIO(text).read().splitlines()
    assert lines[0].startswith("session_id,step,image_id,index")
    assert len(lines) == 1 + 2 * 2 * 3
