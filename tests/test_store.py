"""The SQLite session store: round-trips, atomic writes under concurrency, bad files."""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from sessions import SCHEMA_VERSION, NotFoundError, Store, StoreError
from sessions.paths import default_data_dir, resolve_data_dir
from sessions.store import STEP_COLUMNS
from ttrv.config import AdaptConfig
from ttrv.events import RolloutRecord, StepRecord
from ttrv.tasks import Item


def png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def step_record(step: int, **changes: float) -> dict:
    values = dict(
        step=step,
        round=1,
        reward_mean=0.5 + step / 100,
        reward_std=0.1,
        consensus=0.75,
        entropy=0.6,
        invalid_rate=0.0,
        kl=0.01,
        loss=-0.2,
        grad_norm=1.5,
        lr=2e-4,
        tokens=64,
        seconds=0.25,
        groups=2,
        groups_skipped=0,
    )
    return StepRecord(**{**values, **changes}).to_dict()


def rollout_records(step: int, image_ids: list[str], n: int) -> list[dict]:
    return [
        RolloutRecord(
            step=step,
            image_id=image_id,
            index=i,
            response=f"It is {i % 3}.",
            answer=str(i % 3),
            reward=1.0 / (1 + i % 3),
            components={"frequency": 0.5, "entropy": -0.25},
            advantage=0.1 * i - 0.3,
            trained=i % 2 == 0,
            option_order=["A", "B"] if i == 0 else None,
        ).to_dict()
        for image_id in image_ids
        for i in range(n)
    ]


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "data") as s:
        yield s


@pytest.fixture
def session(store: Store, tmp_path: Path) -> tuple[str, list[str]]:
    """A session with two labelled images from files; returns (id, image ids)."""
    sid = store.create_session("digits", AdaptConfig().to_dict(), "tiny-llava", "open")
    a = png(tmp_path / "in" / "a.png", (255, 0, 0))
    b = png(tmp_path / "in" / "b.png", (0, 255, 0))
    added = store.add_images(
        sid,
        [
            {"image_id": "img-a", "name": "a.png", "path": a, "label": "1"},
            {"image_id": "img-b", "name": "b.png", "path": b, "label": "2", "options": ["1", "2"]},
        ],
    )
    return sid, [r["image_id"] for r in added]


def test_events_through_sink_come_back_from_the_query_helpers(store, session, tmp_path):
    """Guards the engine -> sink -> UI path: every field of every event kind survives."""
    sid, ids = session
    sink = store.sink(sid)
    config = AdaptConfig().to_dict()
    sink("run_start", {"config": config, "images": [{"image_id": i} for i in ids], "model": {}})
    assert store.get_session(sid)["status"] == "running"
    sink(
        "answers",
        {
            "phase": "before",
            "answers": [
                {"image_id": "img-a", "response": "2", "answer": "2"},
                {"image_id": "img-b", "response": "2", "answer": "2"},
            ],
        },
    )
    rollouts = rollout_records(0, ids, 4)
    sink("rollouts", {"step": 0, "rollouts": rollouts})
    sink("step", step_record(0))
    adapter = tmp_path / "out" / "adapter_model.safetensors"
    adapter.parent.mkdir()
    adapter.write_bytes(b"weights")
    sink("checkpoint", {"round": 1, "step": 0, "path": str(adapter)})
    guard = {
        "step": 0,
        "action": "warn",
        "reason": "entropy",
        "signals": {"h": 0.1},
        "checkpoint": None,
    }
    sink("guard", guard)
    sink(
        "answers",
        {
            "phase": "after",
            "answers": [
                {"image_id": "img-a", "response": "1", "answer": "1"},
                {"image_id": "img-b", "response": " 2 ", "answer": " 2 "},
            ],
        },
    )
    sink("run_end", {"status": "done", "steps": 1, "reason": "finished"})

    assert store.metrics(sid) == [step_record(0)]
    got = store.rollouts(sid, "img-a")
    assert got == [r for r in rollouts if r["image_id"] == "img-a"]
    answers = {a["image_id"]: a for a in store.answers(sid)}
    assert answers["img-a"]["flipped"] is True and answers["img-a"]["correct_after"] is True
    assert answers["img-b"]["flipped"] is False and answers["img-b"]["correct_before"] is True
    assert [e["kind"] for e in store.events(sid)] == ["run_start", "checkpoint", "guard", "run_end"]
    assert store.events(sid, "guard")[0]["data"] == guard
    checkpoint = store.latest_checkpoint(sid)
    assert Path(checkpoint["path"]).parent == store.adapter_dir(sid)
    assert checkpoint["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert not checkpoint["missing"]
    session_row = store.get_session(sid)
    assert session_row["status"] == "done" and session_row["config"] == config
    headline = store.list_sessions()[0]["headline"]
    assert headline["steps"] == 1 and headline["reward_mean"] == step_record(0)["reward_mean"]
    assert headline["agreement"] == 0.5
    assert (headline["accuracy_before"], headline["accuracy_after"]) == (0.5, 1.0)
    assert store.images(sid)[1]["options"] == ["1", "2"]


def test_step_table_has_a_column_for_every_step_record_field():
    """Guards schema drift: a new StepRecord field must get a column (or land in `extra`)."""
    assert [f.name for f in dataclasses.fields(StepRecord)] == list(STEP_COLUMNS)


def test_unknown_step_keys_are_kept_not_lost(store, session):
    """Guards silently dropping metrics the engine adds before the schema knows them."""
    sid, _ = session
    store.sink(sid)("step", {**step_record(3), "new_metric": 7})
    assert store.metrics(sid)[0]["new_metric"] == 7


def test_readers_never_see_a_step_without_all_its_rollouts(store, session):
    """Guards torn reads: rollouts or a step written row by row, visible half-done."""
    sid, ids = session
    n_steps, n_rollouts = 30, 32
    sink = store.sink(sid)
    done = threading.Event()
    errors: list[str] = []
    deadline = time.monotonic() + 5

    def write() -> None:
        try:
            for step in range(n_steps):
                sink("rollouts", {"step": step, "rollouts": rollout_records(step, ids, n_rollouts)})
                sink("step", step_record(step))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))
        finally:
            done.set()

    def read() -> None:
        checks = 0
        while (not done.is_set() or checks == 0) and time.monotonic() < deadline:
            steps = [m["step"] for m in store.metrics(sid)]
            for image_id in ids:
                if steps and len(store.rollouts(sid, image_id, step=steps[-1])) != n_rollouts:
                    errors.append(f"step {steps[-1]} of {image_id} lacks rollouts")
                if len(store.rollouts(sid, image_id)) not in (0, n_rollouts):
                    errors.append(f"latest rollouts of {image_id} are partial")
            checks += 1
            time.sleep(0.002)  # leave the writer the GIL now and then

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert errors == []
    assert done.is_set() and time.monotonic() < deadline, "writer too slow"
    assert len(store.metrics(sid)) == n_steps


def test_same_image_in_two_sessions_is_stored_once(store, tmp_path):
    """Guards duplicate copies: images are content-addressed by the sha256 of their bytes."""
    path = png(tmp_path / "in" / "same.png", (1, 2, 3))
    pil = Image.new("RGB", (8, 8), (9, 9, 9))
    item = Item(image_id="pixels", name="pil", image=pil)
    s1 = store.create_session("one", {}, "m", "open")
    s2 = store.create_session("two", {}, "m", "open")
    store.add_images(s1, [{"path": path, "name": "same"}, item])
    store.add_images(
        s2, [Item(image_id="x", name="same", image=pil, meta={"path": str(path)}), item]
    )
    files = sorted((store.data_dir / "images").rglob("*"))
    stored = [f for f in files if f.is_file() and not f.name.endswith(".thumb.png")]
    assert len(stored) == 2
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert store.data_dir / "images" / sha[:2] / f"{sha}.png" in stored
    first = store.images(s1)[0]
    assert first["image_id"] == sha and (first["width"], first["height"]) == (40, 30)
    with Image.open(first["thumb"]) as thumb:
        assert max(thumb.size) <= 128


def test_delete_removes_own_images_and_adapters_but_keeps_shared(store, tmp_path):
    """Guards deleting a file another session still shows, or leaking a deleted one's files."""
    shared = png(tmp_path / "in" / "shared.png", (5, 5, 5))
    own = png(tmp_path / "in" / "own.png", (6, 6, 6))
    keep = store.create_session("keep", {}, "m", "open")
    gone = store.create_session("gone", {}, "m", "open")
    store.add_images(keep, [{"path": shared}])
    store.add_images(gone, [{"path": shared}, {"path": own}])
    adapter = store.adapter_dir(gone) / "round1-step0.safetensors"
    adapter.write_bytes(b"w")
    store.add_checkpoint(gone, 1, 0, adapter)
    store.set_status(gone, "running")
    with pytest.raises(StoreError, match="stop it"):
        store.delete_session(gone)
    store.set_status(gone, "stopped")
    own_path = Path(store.images(gone)[1]["path"])
    store.delete_session(gone)
    assert not own_path.exists() and not store.adapter_dir(gone, create=False).exists()
    assert Path(store.images(keep)[0]["path"]).exists()
    assert [s["id"] for s in store.list_sessions()] == [keep]
    with pytest.raises(NotFoundError):
        store.get_session(gone)


def test_mark_interrupted_on_start(store):
    """Guards sessions stuck "running" forever after the app or worker died."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ids = {k: store.create_session(k, {}, "m", "open") for k in ("dead", "stale", "live", "done")}
    for k in ("dead", "stale", "live"):
        store.set_status(ids[k], "running")
    store.set_status(ids["done"], "done")
    with sqlite3.connect(store.db_path) as conn:
        conn.execute("UPDATE sessions SET pid = ? WHERE id = ?", [dead.pid, ids["dead"]])
        conn.execute(
            "UPDATE sessions SET heartbeat = '2000-01-01T00:00:00.000+00:00' WHERE id = ?",
            [ids["stale"]],
        )
    conn.close()
    assert sorted(store.mark_interrupted_on_start()) == sorted([ids["dead"], ids["stale"]])
    status = {k: store.get_session(v)["status"] for k, v in ids.items()}
    assert status == {
        "dead": "interrupted",
        "stale": "interrupted",
        "live": "running",
        "done": "done",
    }
    assert "pid" in store.get_session(ids["dead"])["reason"]


def test_newer_schema_is_refused_not_migrated_down(tmp_path):
    """Guards an old app opening (and damaging) a database written by a newer release."""
    Store(tmp_path).close()
    with sqlite3.connect(tmp_path / "sessions.db") as conn:
        conn.execute(
            "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
            "VALUES ('ttrv-sessions', '0099_future', 'later')"
        )
    conn.close()
    with pytest.raises(StoreError, match="newer") as info:
        Store(tmp_path)
    assert "schema version 99" in str(info.value) and str(SCHEMA_VERSION) in str(info.value)


@pytest.mark.parametrize(
    "content",
    [b"not a database at all\n" * 50, b"SQLite format 3\x00" + bytes(range(256)) * 20],
    ids=["text", "bad-pages"],
)
def test_corrupt_database_is_refused_and_left_untouched(tmp_path, content):
    """Guards 'repairing' (overwriting) a file the user may still need."""
    db = tmp_path / "sessions.db"
    db.write_bytes(content)
    with pytest.raises(StoreError, match="untouched|damaged"):
        Store(tmp_path)
    assert db.read_bytes() == content


def test_database_of_another_program_is_refused(tmp_path):
    """Guards adding our tables into someone else's SQLite file."""
    with sqlite3.connect(tmp_path / "sessions.db") as conn:
        conn.execute("CREATE TABLE contacts (name TEXT)")
    conn.close()
    before = (tmp_path / "sessions.db").read_bytes()
    with pytest.raises(StoreError, match="another program"):
        Store(tmp_path)
    assert (tmp_path / "sessions.db").read_bytes() == before


def test_full_disk_is_a_store_error_and_saves_nothing(store, session):
    """Guards a raw sqlite3 'database or disk is full' crash, and half-saved steps."""
    sid, ids = session
    db = store._db()  # the connection the sink uses on this thread
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages + 1}")
    big = [dict(r, response="x" * 2000) for r in rollout_records(5, ids, 200)]
    with pytest.raises(StoreError, match="disk is full"):
        store.sink(sid)("rollouts", {"step": 5, "rollouts": big})
    db.execute("PRAGMA max_page_count = 1073741823")
    assert store.rollouts(sid, ids[0], step=5) == []


def test_full_disk_while_writing_an_image_file(store, session, tmp_path, monkeypatch):
    """Guards an OSError(ENOSPC) escaping raw, and image rows without their file."""
    sid, _ = session

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("sessions.store.images.write_atomic", full)
    with pytest.raises(StoreError, match="disk is full"):
        store.add_images(sid, [{"path": png(tmp_path / "in" / "new.png", (7, 7, 7))}])
    assert len(store.images(sid)) == 2


def test_missing_checkpoint_file_is_reported_not_raised(store, session, tmp_path):
    """Guards the worker crashing at a checkpoint whose file vanished."""
    sid, _ = session
    store.sink(sid)("checkpoint", {"round": 1, "step": 2, "path": str(tmp_path / "nope")})
    checkpoint = store.latest_checkpoint(sid)
    assert checkpoint["missing"] and checkpoint["sha256"] is None
    assert "does not exist" in store.events(sid, "warning")[0]["data"]["message"]


def test_malformed_events_are_clear_store_errors(store, session):
    """Guards KeyErrors from deep inside the store reaching the engine."""
    sid, _ = session
    sink = store.sink(sid)
    with pytest.raises(StoreError, match="phase"):
        sink("answers", {"phase": "later", "answers": []})
    with pytest.raises(StoreError, match="without 'round'"):
        sink("step", {"step": 1})
    with pytest.raises(StoreError, match="Unknown status"):
        store.set_status(sid, "paused")
    with pytest.raises(NotFoundError):
        store.sink("nope")


def test_data_dir_follows_env_then_platform_default(monkeypatch, tmp_path):
    """Guards writing user data into the working directory or ignoring $TTRV_DATA_DIR."""
    monkeypatch.setenv("TTRV_DATA_DIR", str(tmp_path / "env"))
    assert default_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == (tmp_path / "arg").resolve()
    monkeypatch.delenv("TTRV_DATA_DIR")
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
        assert default_data_dir() == tmp_path / "xdg" / "ttrv-workbench"
    assert default_data_dir().name == "ttrv-workbench"


def test_importing_sessions_stays_light():
    """Guards slow CLI start-up: `import sessions` must not pull sqlite-utils, PIL or torch."""
    code = (
        "import sys, sessions; "
        "print(sorted(m for m in ('torch', 'PIL', 'sqlite_utils') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip() == "[]"


def test_session_state_is_the_ticks_cheap_fingerprint(store, session):
    """It changes when a step is recorded and when the status changes, and only then; and
    it agrees with the full read's numbers."""
    sid, _ = session
    first = store.session_state(sid)
    assert first == store.session_state(sid) and first[1] == "queued" and first[3] == 0
    store.sink(sid)("step", step_record(0))
    after_step = store.session_state(sid)
    assert after_step[3] == 1 == store.get_session(sid)["headline"]["steps"]
    store.set_status(sid, "running")
    running = store.session_state(sid)
    assert running[1] == "running" and running != after_step
    with pytest.raises(StoreError):
        store.session_state("no-such-session")
