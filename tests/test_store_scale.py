"""The store's reads at scale (issue 11): paged and per-image queries, the per-(image, step)
rollout summary, and migration 0004 on an existing database.

Correctness only (timings: `python -m bench.store_scale`): each new query must return what
the whole-session reads it replaces returned, written out here as they were.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from bench.store_scale import build_session
from sessions import Store, schema
from sessions.store.reads import _same

INVALID = "<invalid>"


def legacy_answers(store: Store, sid: str) -> list[dict]:
    """`Store.answers` as it was before paging: every image and every answer row."""
    db = store._db()
    images = list(
        db.query(
            "SELECT image_id, name, position, label, sha256 FROM session_images "
            "WHERE session_id = ? ORDER BY position",
            [sid],
        )
    )
    phases: dict[str, dict] = {}
    for a in db.query(
        "SELECT phase, image_id, response, answer FROM answers WHERE session_id = ?", [sid]
    ):
        phases.setdefault(a["image_id"], {})[a["phase"]] = a
    out = []
    for image in images:
        seen = phases.get(image["image_id"], {})
        before = seen.get("before")
        rounds = sorted((p for p in seen if p.startswith("round-")), key=lambda p: int(p[6:]))
        after_phase = "after" if "after" in seen else (rounds[-1] if rounds else None)
        after = seen.get(after_phase) if after_phase else None
        same = _same(before and before["answer"], after and after["answer"])
        out.append(
            {
                **image,
                "before": before and before["answer"],
                "before_response": before and before["response"],
                "after": after and after["answer"],
                "after_response": after and after["response"],
                "after_phase": after_phase,
                "phases": {p: seen[p]["answer"] for p in seen},
                "flipped": None if same is None else not same,
                "correct_before": _same(before and before["answer"], image["label"]),
                "correct_after": _same(after and after["answer"], image["label"]),
            }
        )
    return out


def legacy_headline_counts(rows: list[dict]) -> dict:
    compared = [a for a in rows if a["flipped"] is not None]
    labelled = [a for a in rows if a["label"] is not None]

    def accuracy(key: str) -> float | None:
        known = [a[key] for a in labelled if a[key] is not None]
        return sum(known) / len(known) if known else None

    flipped = sum(a["flipped"] for a in compared)
    return {
        "images": len(rows),
        "compared": len(compared),
        "flipped": flipped,
        "agreement": 1 - flipped / len(compared) if compared else None,
        "labelled": len(labelled),
        "accuracy_before": accuracy("correct_before"),
        "accuracy_after": accuracy("correct_after"),
    }


def legacy_converged(store: Store, sid: str) -> dict[str, int]:
    rows = store._db().execute(
        "SELECT image_id, min(step) FROM (SELECT image_id, step FROM rollouts "
        "WHERE session_id = ? GROUP BY image_id, step HAVING "
        "count(DISTINCT coalesce(answer, '<invalid>')) = 1 AND "
        "min(coalesce(answer, '<invalid>')) != '<invalid>') GROUP BY image_id",
        [sid],
    )
    return {image_id: int(step) for image_id, step in rows}


def stats_from_rollouts(rollouts: list[dict]) -> dict:
    """ui.charts.image_stats over one image's latest rollouts, plus its step."""
    answers = [r.get("answer") or INVALID for r in rollouts]
    valid = Counter(a for a in answers if a != INVALID)
    n = len(answers)
    return {
        "step": rollouts[0]["step"],
        "n": n,
        "consensus": max(valid.values()) / n if valid else 0.0,
        "invalid": sum(a == INVALID for a in answers) / n,
    }


def legacy_stats(store: Store, sid: str) -> dict[str, dict]:
    out = {}
    for image in store.images(sid):
        rollouts = store.rollouts(sid, image["image_id"])
        if rollouts:
            out[image["image_id"]] = stats_from_rollouts(rollouts)
    return out


def rollout(step: int, image_id: str, index: int, answer: str | None) -> dict:
    return {"step": step, "image_id": image_id, "index": index, "response": str(answer),
            "answer": answer, "reward": 0.5, "components": {"frequency": 0.5}}  # fmt: skip


def add_edge_cases(store: Store, sid: str) -> None:
    """Images the synthetic run does not produce: never answered, answered only in a
    round (no "after"), a missing answer, no label, all-invalid and converged rollouts,
    a step replayed after a rollback."""
    sink = store.sink(sid)
    sink("run_start", {"config": None, "images": [{"image_id": f"edge{i}"} for i in range(4)]})
    sink("answers", {"phase": "before", "answers": [
        {"image_id": "edge1", "response": "7", "answer": "7"},
        {"image_id": "edge2", "response": "", "answer": None},
        {"image_id": "edge3", "response": " Seven ", "answer": " SEVEN "},
    ]})  # fmt: skip
    sink("answers", {"phase": "round-2", "answers": [
        {"image_id": "edge1", "response": "1", "answer": "1"},
        {"image_id": "edge3", "response": "seven", "answer": "seven"},
    ]})  # fmt: skip
    sink("answers", {"phase": "round-10", "answers": [
        {"image_id": "edge1", "response": "4", "answer": "4"},
    ]})  # fmt: skip
    sink("rollouts", {"step": 900, "rollouts": [
        *(rollout(900, "edge0", i, INVALID) for i in range(4)),
        *(rollout(900, "edge1", i, "3") for i in range(4)),
        *(rollout(900, "edge2", i, [None, "", "5", "5"][i]) for i in range(4)),
    ]})  # fmt: skip
    # replayed after a rollback: step 900 of edge1 now disagrees
    sink("rollouts", {"step": 900, "rollouts": [rollout(900, "edge1", i, "3" if i else "8")
                                                for i in range(4)]})  # fmt: skip
    sink("rollouts", {"step": 901, "rollouts": [rollout(901, "edge2", i, "6") for i in range(4)]})
    sink("run_end", {"status": "done", "steps": 902, "reason": ""})


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "data")
    yield s
    s.close()


@pytest.fixture()
def session(store: Store) -> str:
    sid = build_session(store, "small", count=10, n=4, rounds=2, per_step=3, seed=3)
    add_edge_cases(store, sid)
    return sid


def test_answers_pages_and_one_image_match_the_whole_read(store: Store, session: str) -> None:
    """Paging (Inspect's one image, pages of rows) must return the rows the whole-session
    read returned, in the same order, and nothing for an image the session lacks."""
    full = legacy_answers(store, session)
    assert len(full) == 14
    assert store.answers(session) == full
    for row in full:
        assert store.answers(session, row["image_id"]) == [row]
    assert store.answers(session, "no-such-image") == []
    pages = [store.answers(session, limit=4, offset=k) for k in range(0, 16, 4)]
    assert [r for page in pages for r in page] == full
    assert store.answers(session, offset=10) == full[10:]
    edge1 = store.answers(session, "edge1")[0]
    assert (edge1["after_phase"], edge1["after"], edge1["flipped"]) == ("round-10", "4", True)


def test_answer_phases_say_what_the_answers_hold(store: Store, session: str) -> None:
    """The Adapt tab's "has the baseline / final pass run?" without every image's answers:
    the same verdicts as scanning the rows."""
    rows = legacy_answers(store, session)
    phases = store.answer_phases(session)
    assert (phases.get("before", 0) > 0) == any(r["before"] is not None for r in rows)
    assert ("after" in phases) == any(r["after_phase"] == "after" for r in rows)
    assert phases["round-10"] == 1
    empty = store.create_session("empty", {}, "m", "open")
    assert store.answer_phases(empty) == {}


def test_flip_review_reads_only_the_flips(store: Store, session: str) -> None:
    """`Store.flips` and the review queue built on it hold the images and counts that
    filtering every image's answers gave: answers equal after normalising are no flip,
    an image without a "before" answer or an "after" row is not counted."""
    from sessions import review

    store.sink(session)("answers", {"phase": "after", "answers": [
        {"image_id": "edge3", "response": "seven", "answer": "seven"},  # " SEVEN " before
        {"image_id": "edge1", "response": "", "answer": None},  # answered, not compared
    ]})  # fmt: skip
    rows = [r for r in legacy_answers(store, session) if r["before"] is not None]
    answered = [r for r in rows if r["after_phase"] == "after"]
    flipped = [r for r in answered if r["flipped"]]
    assert flipped and len(answered) > len(flipped)
    found = store.flips(session)
    assert found == {"answered": len(answered), "rows": flipped}
    state = review.queue(store, session)
    assert state["images"] == len(answered)
    assert sorted(f["image_id"] for f in state["flips"]) == sorted(r["image_id"] for r in flipped)


def test_images_pages_and_one_image_match_the_whole_read(store: Store, session: str) -> None:
    """`images` with image_id / limit / offset returns slices of the whole list."""
    full = store.images(session)
    assert len(full) == 14
    rel = (
        store._db()
        .execute(
            "SELECT i.path, i.thumb FROM session_images si JOIN images i ON i.id = si.sha256 "
            "WHERE si.session_id = ? ORDER BY si.position LIMIT 1",
            [session],
        )
        .fetchone()
    )
    assert (full[0]["path"], full[0]["thumb"]) == tuple(str(store.data_dir / r) for r in rel)
    assert full[-1]["path"] is None  # known only from run_start
    assert [store.images(session, r["image_id"])[0] for r in full] == full
    assert store.images(session, limit=5, offset=3) == full[3:8]
    assert store.images(session, offset=12) == full[12:]
    assert store.images(session, "no-such-image") == []


def test_headline_matches_the_answers_it_summarises(store: Store, session: str) -> None:
    """The headline's SQL must count flips and accuracy as the per-image rows do
    (answers compared after trimming and case folding, "after" else the last round)."""
    head = store.get_session(session)["headline"]
    expected = legacy_headline_counts(legacy_answers(store, session))
    assert {k: head[k] for k in expected} == expected
    listed = {s["id"]: s["headline"] for s in store.list_sessions()}
    assert listed[session] == head


def test_rollout_stats_and_converged_match_the_rollouts(store: Store, session: str) -> None:
    """The per-(image, step) summary kept by triggers gives what aggregating the rollouts
    gives: latest-step consensus and invalid share per image, and converged images -
    also after a replayed step replaced an image's rollouts."""
    stats = store.rollout_stats(session)
    assert stats == legacy_stats(store, session)
    assert stats["edge0"] == {"step": 900, "n": 4, "consensus": 0.0, "invalid": 1.0}
    assert stats["edge1"]["consensus"] == 0.75  # the replay, not the first write
    assert stats["edge2"]["step"] == 901
    converged = store.converged_images(session)
    assert converged == legacy_converged(store, session)
    assert "edge1" not in converged and converged["edge2"] == 901


def test_summary_follows_deletes_import_and_session_delete(
    store: Store, session: str, tmp_path: Path
) -> None:
    """Rows deleted from rollouts (a rewind, a deleted session) leave no stale summary,
    and an imported archive (rows inserted directly) gets its summary too."""
    db = store._db()
    with db.conn:
        db.execute("DELETE FROM rollouts WHERE session_id = ? AND step >= 901", [session])
    assert store.rollout_stats(session) == legacy_stats(store, session)
    assert store.rollout_stats(session)["edge2"]["step"] == 900
    archive = store.export_session(session, tmp_path / "s.zip")
    copy = store.import_archive(archive)
    assert store.rollout_stats(copy) == store.rollout_stats(session)
    assert store.converged_images(copy) == store.converged_images(session)
    store.delete_session(session)
    left = db.execute("SELECT count(*) FROM image_steps WHERE session_id = ?", [session])
    assert left.fetchone()[0] == 0


def test_migration_0004_applies_to_an_existing_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database written at schema version 3 opens, is migrated, and its existing
    rollouts are summarised (backfill), so the new reads agree with the old ones."""
    data = tmp_path / "data"
    with monkeypatch.context() as m:
        m.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:3])
        old = Store(data)
        assert schema.schema_version(old._db()) == 3
        sid = build_session(old, "old", count=6, n=4, rounds=2, per_step=2, seed=5)
        add_edge_cases(old, sid)
        before = {
            "answers": legacy_answers(old, sid),
            "converged": legacy_converged(old, sid),
            "stats": legacy_stats(old, sid),
            "headline": old.get_session(sid)["headline"],
        }
        assert "image_steps" not in old._db().table_names()
        old.close()
    store = Store(data)
    try:
        db = store._db()
        assert schema.schema_version(db) == 4
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"answers_image", "session_images_position"} <= indexes
        assert store.answers(sid) == before["answers"]
        assert store.converged_images(sid) == before["converged"]
        assert store.rollout_stats(sid) == before["stats"]
        assert store.get_session(sid)["headline"] == before["headline"]
        # and the triggers keep it current for rows written after the migration
        store.sink(sid)("rollouts", {"step": 950, "rollouts": [rollout(950, "edge0", 0, "2")]})
        assert store.rollout_stats(sid)["edge0"] == {
            "step": 950, "n": 1, "consensus": 1.0, "invalid": 0.0
        }  # fmt: skip
    finally:
        store.close()
    assert json.loads(json.dumps(before["headline"]))  # JSON-able, as the UI sends it


def test_inspect_summary_counts_as_the_rows_do(store: Store, session: str) -> None:
    """Inspect's counts, chart data and value pickers come from one aggregate: they must be
    what counting every image's `answers` row and `image_stats` gave (ui/inspect_tab.py
    before issue 11), for every filter."""
    from ui import charts
    from ui.inspect_tab import count_rows

    rows = legacy_answers(store, session)
    stats = legacy_stats(store, session)
    empty = charts.image_stats([])
    summary = store.inspect_summary(session)
    assert summary["counts"] == {
        k: sum(charts.matches_filter(r, stats.get(r["image_id"], empty), k) for r in rows)
        for k in ("all", "changed", "uncertain", "wrong", "invalid")
    }
    assert summary["images"] == len(rows)
    assert summary["answered_before"] == sum(r["before"] is not None for r in rows)
    for which in ("before", "after"):
        assert summary[which] == dict(charts.answer_counts(rows, which))
    values = Counter(v for r in rows for v in {str(r[k]) for k in ("before", "after")
                                               if r[k] is not None})  # fmt: skip
    assert summary["values"] == dict(values)
    assert summary["labels"] == dict(Counter(r["label"] for r in rows if r["label"]))
    counted = count_rows(summary)
    assert charts.collapse_warning(counted) == charts.collapse_warning(rows)


def test_consensus_bins_count_each_images_first_and_last_sampled_step(
    store: Store, session: str
) -> None:
    """Inspect's consensus histogram: per image, the share of its rollouts agreeing with
    its top valid answer at its first and at its last sampled step, counted per tenth (a
    full agreement in the last bin), as counting every rollout gives."""
    from collections import defaultdict

    by_step: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    rows = store._db().execute(
        "SELECT image_id, step, answer FROM rollouts WHERE session_id = ?", [session]
    )
    for image_id, step, answer in rows:
        by_step[image_id][step].append(answer or INVALID)
    want = {"first": [0] * 10, "last": [0] * 10}
    for steps in by_step.values():
        for when, step in (("first", min(steps)), ("last", max(steps))):
            stats = stats_from_rollouts([{"step": step, "answer": a} for a in steps[step]])
            want[when][min(9, int(10 * stats["consensus"]))] += 1
    got = store.inspect_summary(session)["consensus"]
    assert got == want and sum(got["last"]) == len(by_step) > 0
    assert got["first"] != got["last"]  # the fixture's rounds differ: not one read twice


def test_consensus_range_filter_picks_the_images_of_those_bins(store: Store, session: str) -> None:
    """Inspect's consensus range (tenths at the last sampled step, as the histogram bins
    them): the images whose latest rollouts agree that much, and only those; combined
    with another filter, both hold."""
    stats = legacy_stats(store, session)
    order = [r["image_id"] for r in legacy_answers(store, session)]

    def bin_of(image_id: str) -> int | None:
        st = stats.get(image_id)
        return None if not st or not st["n"] else min(9, int(10 * st["consensus"]))

    seen = 0
    for lo, hi in ((0, 2), (3, 5), (6, 8), (9, 9), (0, 9)):
        want = [i for i in order if bin_of(i) is not None and lo <= bin_of(i) <= hi]
        page = store.inspect_page(session, consensus=(lo, hi))
        assert [r["image_id"] for r in page["rows"]] == want and page["total"] == len(want)
        seen += len(want) * (hi - lo < 9)
    assert seen == sum(bin_of(i) is not None for i in order) > 0  # the ranges cover all
    both = store.inspect_page(session, "changed", consensus=(0, 9))["rows"]
    changed = store.inspect_page(session, "changed")["rows"]
    assert [r["image_id"] for r in both] == [r["image_id"] for r in changed
                                            if bin_of(r["image_id"]) is not None]  # fmt: skip


def test_inspect_page_filters_as_the_rows_do(store: Store, session: str) -> None:
    """The SQL filters (and answer / label values) pick the images `matches_filter` and
    `matches_values` picked from every row, in image order, and a page is a slice."""
    from ui import charts
    from ui.inspect_tab import matches_values

    rows = legacy_answers(store, session)
    stats = legacy_stats(store, session)
    empty = charts.image_stats([])
    some = next(r for r in rows if r["after"] is not None and r["label"] is not None)
    for which in ("all", "changed", "uncertain", "wrong", "invalid"):
        for answer, label in (("", ""), (some["after"].upper(), ""), ("", some["label"]),
                              (" SEVEN", None)):  # fmt: skip
            want = [r for r in rows if charts.matches_filter(r, stats.get(r["image_id"], empty),
                    which) and matches_values(r, answer, label)]  # fmt: skip
            found = store.inspect_page(session, which, answer, label)
            assert (found["total"], found["rows"]) == (len(want), want), (which, answer, label)
    page = store.inspect_page(session, limit=3, offset=2)
    assert page["total"] == len(rows) and page["rows"] == rows[2:5]
    images = {i["image_id"]: i["thumb"] for i in store.images(session)}
    assert page["thumbs"] == {r["image_id"]: images[r["image_id"]] for r in rows[2:5]}


def test_compare_pages_differing_rows_first(store: Store, session: str) -> None:
    """Compare's page holds what the whole comparison held, differing rows first (as the
    Sessions tab sorted them), and counts the shared and differing images."""
    other = build_session(store, "other", count=10, n=4, rounds=1, per_step=3, seed=4)
    a_rows = {r["sha256"] or r["image_id"]: r for r in legacy_answers(store, session)}
    b_rows = {r["sha256"] or r["image_id"]: r for r in legacy_answers(store, other)}
    shared = [(k, r, b_rows[k]) for k, r in a_rows.items() if k in b_rows]

    def same(a: dict, b: dict) -> bool:
        return len({a["before"] or "", a["after"] or "", b["before"] or "", b["after"] or ""}) == 1

    want = sorted(shared, key=lambda s: same(s[1], s[2]))
    full = store.compare(session, other)
    assert [(i["key"], i["a"], i["b"]) for i in full["images"]] == want
    assert full["shared"] == len(want) == 10
    assert full["differing"] == sum(not same(a, b) for _, a, b in want)
    assert store.compare(session, other, limit=4, offset=3)["images"] == full["images"][3:7]
