"""Read models: what the UI, the CLI and the benchmarks read from a session, each from one
snapshot: per-step metrics, rollouts, per-image answers before and after, flips and review
marks, events, two sessions compared, and the headline numbers of the session list."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ttrv.config import config_diff

from ..schema import StoreError
from .base import StoreBase, query_rows
from .tables import now, parse_json_columns, to_json

if TYPE_CHECKING:
    from sqlite_utils import Database


@functools.lru_cache(maxsize=4096)  # a session holds few distinct answers, many times over
def _norm(answer: str | None) -> str | None:
    return None if answer is None else " ".join(str(answer).split()).casefold()


def _same(a: str | None, b: str | None) -> bool | None:
    return None if a is None or b is None else _norm(a) == _norm(b)


def _last_round(phases: Iterable[str]) -> str | None:
    """The "round-k" phase with the largest k, or None."""
    rounds = [p for p in phases if p.startswith("round-")]
    return max(rounds, key=lambda p: int(p[6:])) if rounds else None


def _with_norm(db: Database) -> Database:
    """`db` with the SQL function ttrv_norm(text) (`_norm`: trimmed, whitespace collapsed,
    case folded), so a query compares answers as the store does."""
    db.conn.create_function("ttrv_norm", 1, _norm, deterministic=True)
    return db


# Each image's greedy answer before and after ("after", else the last "round-k", as
# `answer_rows` picks it), its label, and its rollouts' summary at its latest step (n, top,
# invalid: NULL without rollouts), one row per image of session :sid.
STATS_JOIN = (
    "LEFT JOIN (SELECT image_id, max(step), n, top, invalid FROM image_steps WHERE "
    "session_id = :sid GROUP BY image_id) st ON st.image_id = si.image_id "
)
PER_IMAGE = (
    "WITH per_image AS (SELECT si.image_id, si.position, si.label, si.sha256, "
    "b.answer AS before, CASE WHEN af.image_id IS NOT NULL THEN af.answer ELSE "
    "(SELECT r.answer FROM answers r WHERE r.session_id = :sid AND r.image_id = si.image_id "
    "AND substr(r.phase, 1, 6) = 'round-' ORDER BY CAST(substr(r.phase, 7) AS INTEGER) DESC "
    "LIMIT 1) END AS after, st.n, st.top, st.invalid FROM session_images si "
    "LEFT JOIN answers b ON b.session_id = :sid AND b.phase = 'before' AND "
    "b.image_id = si.image_id LEFT JOIN answers af ON af.session_id = :sid AND "
    "af.phase = 'after' AND af.image_id = si.image_id " + STATS_JOIN +
    "WHERE si.session_id = :sid) "
)  # fmt: skip
# The same without the rollouts' summary (n, top, invalid are NULL): the headline's and
# Compare's answers.
PER_IMAGE_ANSWERS = PER_IMAGE.replace(STATS_JOIN, "").replace(
    "st.n, st.top, st.invalid", "NULL AS n, NULL AS top, NULL AS invalid"
)
# Inspect's filters over `PER_IMAGE` rows, as `ui.charts.matches_filter` decides them from an
# `answers` row and its `image_stats` (consensus top/n < 0.5, invalid share >= 0.5).
FILTER_SQL = {
    "all": "1",
    "changed": "(before IS NOT NULL AND after IS NOT NULL AND "
    "ttrv_norm(before) != ttrv_norm(after))",
    "uncertain": "(top * 2 < n)",
    "wrong": "(label IS NOT NULL AND CASE WHEN after IS NOT NULL THEN ttrv_norm(after) != "
    "ttrv_norm(label) ELSE before IS NOT NULL AND ttrv_norm(before) != ttrv_norm(label) END)",
    "invalid": "(coalesce(after, before) = '<invalid>' OR invalid * 2 >= n)",
}
# An image's consensus at its last sampled step, in tenths as Inspect's histogram bins it
# (`Reads._consensus_bins`), within [:bin_lo, :bin_hi]; any when :bin_lo < 0.
CONSENSUS_SQL = (
    "(:bin_lo < 0 OR (n > 0 AND min(9, CAST(10.0 * top / n AS INTEGER)) "
    "BETWEEN :bin_lo AND :bin_hi))"
)
# An answer given before or after (any when empty) and a label (any when empty).
VALUES_SQL = (
    "(:answer = '' OR ttrv_norm(:answer) IN (ttrv_norm(before), ttrv_norm(after))) AND "
    "(:label = '' OR (label IS NOT NULL AND ttrv_norm(label) = ttrv_norm(:label)))"
)


def headline(db: Database, session_id: str) -> dict[str, Any]:
    """steps, last_step, reward_mean and consensus of the last step, images,
    compared (images with before and after answers), flipped, agreement (share of
    compared images whose answer did not change), labelled, accuracy_before/after
    (over labelled images answered in that phase; None without labels)."""
    last = query_rows(
        db,
        "SELECT step, reward_mean, consensus, (SELECT count(*) FROM steps WHERE "
        "session_id = ?1) AS steps FROM steps WHERE session_id = ?1 "
        "ORDER BY step DESC LIMIT 1",
        [session_id],
    )
    last_row = last[0] if last else {}
    # (label, before, after) per image, "after" as `answer_rows` picks it, in one query.
    per_image = db.execute(
        PER_IMAGE_ANSWERS + "SELECT label, before, after FROM per_image", {"sid": session_id}
    ).fetchall()
    compared = flipped = labelled = 0
    right = {"before": [0, 0], "after": [0, 0]}  # [correct, known] over labelled images
    for label, before, after in per_image:
        same = _same(before, after)
        if same is not None:
            compared += 1
            flipped += not same
        if label is None:
            continue
        labelled += 1
        for key, answer in (("before", before), ("after", after)):
            correct = _same(answer, label)
            if correct is not None:
                right[key][0] += correct
                right[key][1] += 1

    def accuracy(key: str) -> float | None:
        correct, known = right[key]
        return correct / known if known else None

    return {
        "steps": last_row.get("steps", 0),
        "last_step": last_row.get("step"),
        "reward_mean": last_row.get("reward_mean"),
        "consensus": last_row.get("consensus"),
        "images": len(per_image),
        "compared": compared,
        "flipped": flipped,
        "agreement": 1 - flipped / compared if compared else None,
        "labelled": labelled,
        "accuracy_before": accuracy("before"),
        "accuracy_after": accuracy("after"),
    }


def answer_rows(
    db: Database,
    session_id: str,
    image_id: str | None = None,
    limit: int | None = None,
    offset: int = 0,
    image_ids: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The rows `ReadModels.answers` describes (all, one image's, a page, or those of
    `image_ids`), inside the caller's snapshot."""
    where, params = "session_id = ?", [session_id]
    if image_id is not None:
        where += " AND image_id = ?"
        params.append(image_id)
    if image_ids is not None:
        where += " AND image_id IN (SELECT value FROM json_each(?))"
        params.append(to_json(list(image_ids)))
    if limit is not None or offset:
        where += " ORDER BY position LIMIT ? OFFSET ?"
        params += [-1 if limit is None else int(limit), int(offset)]
    else:
        where += " ORDER BY position"
    keys = ("image_id", "name", "position", "label", "sha256")
    images = db.execute(
        f"SELECT {', '.join(keys)} FROM session_images WHERE {where}", params
    ).fetchall()
    if len(images) == 0:
        return []
    sql = "SELECT phase, image_id, response, answer FROM answers WHERE session_id = ?"
    answer_params: list[Any] = [session_id]
    if image_id is not None or image_ids is not None or limit is not None or offset:
        sql += f" AND image_id IN (SELECT image_id FROM session_images WHERE {where})"
        answer_params += params
    phases: dict[str, dict[str, tuple]] = {}
    for phase, iid, response, answer in db.execute(sql, answer_params):
        phases.setdefault(iid, {})[phase] = (answer, response)
    out = []
    for image in images:
        seen = phases.get(image[0], {})
        before = seen.get("before", (None, None))
        after_phase = "after" if "after" in seen else _last_round(seen)
        after = seen[after_phase] if after_phase else (None, None)
        label = image[3]
        same = _same(before[0], after[0])
        out.append(
            {
                **dict(zip(keys, image, strict=True)),
                "before": before[0],
                "before_response": before[1],
                "after": after[0],
                "after_response": after[1],
                "after_phase": after_phase,
                "phases": {p: a for p, (a, _r) in seen.items()},
                "flipped": None if same is None else not same,
                "correct_before": _same(before[0], label),
                "correct_after": _same(after[0], label),
            }
        )
    return out


class ReadModels(StoreBase):
    """Queries for the UI. `compare` reads both sessions through `get_session` (`Sessions`)."""

    def metrics(self, session_id: str) -> list[dict[str, Any]]:
        """One dict per step (every StepRecord field, plus `extra` keys), ordered by step."""
        with self.snapshot("reading metrics") as db:
            self.session_row(db, session_id)
            rows = query_rows(
                db, "SELECT * FROM steps WHERE session_id = ? ORDER BY step", [session_id]
            )
        out = []
        for r in rows:
            extra_json = r.pop("extra")
            extra = json.loads(extra_json) if extra_json else {}
            r.pop("session_id")
            r.pop("created")
            out.append({**r, **extra})
        return out

    def rollouts(self, session_id: str, image_id: str, step: int | None = None) -> list[dict]:
        """The rollouts of one image at `step` (default: the latest step that has rollouts
        for it), ordered by index, as RolloutRecord dicts."""
        with self.snapshot("reading rollouts") as db:
            self.session_row(db, session_id)
            if step is None:
                step = db.execute(
                    "SELECT max(step) FROM rollouts WHERE session_id = ? AND image_id = ?",
                    [session_id, image_id],
                ).fetchone()[0]
            rows = query_rows(
                db,
                "SELECT * FROM rollouts WHERE session_id = ? AND image_id = ? AND step = ? "
                'ORDER BY "index"',
                [session_id, image_id, step],
            )
        for r in rows:
            r.pop("session_id")
            r["trained"] = bool(r["trained"])
            parse_json_columns("rollouts", r)
        return rows

    def rollout_stats(self, session_id: str) -> dict[str, dict[str, Any]]:
        """{image_id: {"step", "n", "consensus", "invalid"}} at each image's latest step with
        rollouts, from the per-(image, step) summary (`image_steps`) instead of every
        rollout: consensus is the most common valid answer's share of the n rollouts,
        invalid the share without a valid answer (as `ui.charts.image_stats` computes them
        from `rollouts`)."""
        with self.snapshot("reading rollout statistics") as db:
            self.session_row(db, session_id)
            rows = db.execute(
                "SELECT image_id, max(step), n, top, invalid FROM image_steps "
                "WHERE session_id = ? GROUP BY image_id",
                [session_id],
            ).fetchall()
        return {
            image_id: {"step": step, "n": n, "consensus": top / n, "invalid": invalid / n}
            for image_id, step, n, top, invalid in rows
        }

    def flips(self, session_id: str) -> dict[str, Any]:
        """`flip_ids`' `answered` and `rows`: the `answers` rows of the flipped images,
        in image order."""
        found = self.flip_ids(session_id)
        with self.snapshot("reading flips") as db:
            rows = answer_rows(db, session_id, image_ids=found["ids"]) if found["ids"] else []
        return {"answered": found["answered"], "rows": rows}

    def answer_phases(self, session_id: str) -> dict[str, int]:
        """{phase: answers given in it (None answers not counted)} for each phase the
        session has answer rows in: whether the baseline or the final pass has run,
        without reading every image's answers."""
        with self.snapshot("reading answer phases") as db:
            self.session_row(db, session_id)
            rows = db.execute(
                "SELECT phase, count(answer) FROM answers WHERE session_id = ? GROUP BY phase",
                [session_id],
            ).fetchall()
        return dict(rows)

    def inspect_summary(self, session_id: str) -> dict[str, Any]:
        """What Inspect's overview, chart and value pickers show, from one aggregate over
        (before, after, label) instead of every image's row: `images`, `answered_before`
        (images with a "before" answer), `counts` ({filter: images passing it}, the
        filters of `FILTER_SQL`), `before` / `after` ({answer: images giving it}, answers
        as stored), `values` ({answer: images giving it before or after}), `labels`
        ({label: images}) and `consensus` ({"first", "last"}: `_consensus_bins`)."""
        counts = dict.fromkeys(FILTER_SQL, 0)
        before: dict[str, int] = {}
        after: dict[str, int] = {}
        values: dict[str, int] = {}
        labels: dict[str, int] = {}
        answered_before = 0
        with self.snapshot("reading the answers' summary") as db:
            self.session_row(db, session_id)
            groups = db.execute(
                PER_IMAGE + "SELECT before, after, label, count(*), "
                f"total({FILTER_SQL['uncertain']}), total({FILTER_SQL['invalid']}) "
                "FROM per_image GROUP BY before, after, label",
                {"sid": session_id},
            ).fetchall()
            consensus = {
                when: self._consensus_bins(db, session_id, pick)
                for when, pick in (("first", "min"), ("last", "max"))
            }
        for b, a, label, k, uncertain, invalid in groups:
            counts["all"] += k
            counts["changed"] += k * (_same(b, a) is False)
            verdict = _same(a, label)
            counts["wrong"] += k * ((_same(b, label) if verdict is None else verdict) is False)
            counts["uncertain"] += int(uncertain)
            counts["invalid"] += int(invalid)
            answered_before += k * (b is not None)
            for seen, answer in ((before, b), (after, a)):
                if answer is not None:
                    seen[answer] = seen.get(answer, 0) + k
            for answer in {str(x) for x in (b, a) if x is not None}:
                values[answer] = values.get(answer, 0) + k
            if label is not None:
                labels[label] = labels.get(label, 0) + k
        return {"images": counts["all"], "answered_before": answered_before, "counts": counts,
                "before": before, "after": after, "values": values, "labels": labels,
                "consensus": consensus}  # fmt: skip

    @staticmethod
    def _consensus_bins(db: Any, session_id: str, pick: str) -> list[int]:
        """Images per tenth of consensus (the share of an image's N rollouts agreeing with
        its top answer; 100% in the last bin) at each image's first ("min") or last
        ("max") sampled step: [10 counts]."""
        rows = db.execute(
            "SELECT min(9, CAST(10.0 * top / n AS INTEGER)), count(*) FROM (SELECT image_id, "
            f"{pick}(step), n, top FROM image_steps WHERE session_id = ? AND n > 0 "
            "GROUP BY image_id) GROUP BY 1",
            [session_id],
        ).fetchall()
        bins = [0] * 10
        for b, k in rows:
            bins[int(b)] += k
        return bins

    def inspect_page(
        self,
        session_id: str,
        which: str = "all",
        answer: str | None = "",
        label: str | None = "",
        *,
        consensus: tuple[int, int] | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> dict[str, Any]:
        """The images Inspect shows for a filter (`FILTER_SQL`), an answer given before or
        after, a label (each compared as the store compares answers; empty: any) and a
        range of consensus tenths at the last sampled step (`consensus`: first and last
        bin, 0-9, as the histogram bins it; None: any): `total` (images passing) and, for
        a page of them in image order, `rows` (`answers` rows) and `thumbs` ({image_id:
        thumbnail path or None})."""
        if which not in FILTER_SQL:
            raise StoreError(f"Unknown filter {which!r}: one of {', '.join(FILTER_SQL)}.")
        lo, hi = consensus if consensus is not None else (-1, -1)
        params = {"sid": session_id, "answer": answer or "", "label": label or "",
                  "bin_lo": lo, "bin_hi": hi}  # fmt: skip
        with self.snapshot("reading a page of images") as db:
            self.session_row(db, session_id)
            ids = [r[0] for r in _with_norm(db).execute(
                PER_IMAGE + f"SELECT image_id FROM per_image WHERE {FILTER_SQL[which]} AND "
                f"{VALUES_SQL} AND {CONSENSUS_SQL} ORDER BY position",
                params,
            )]  # fmt: skip
            page = ids[offset : None if limit is None else offset + limit]
            rows = answer_rows(db, session_id, image_ids=page) if page else []
            thumbs = dict(db.execute(
                "SELECT si.image_id, i.thumb FROM session_images si LEFT JOIN images i ON "
                "i.id = si.sha256 WHERE si.session_id = ? AND si.image_id IN "
                "(SELECT value FROM json_each(?))",
                [session_id, to_json(page)],
            ).fetchall())  # fmt: skip
        root = str(self.data_dir)
        return {
            "total": len(ids),
            "rows": rows,
            "thumbs": {i: os.path.join(root, t) if t else None for i, t in thumbs.items()},
        }

    def flip_ids(self, session_id: str) -> dict[str, Any]:
        """The flip review's counts without any image's row: `answered` (images with a
        "before" answer and an "after" answer row) and `ids` (those whose answer flipped,
        compared as the store compares answers, in image order)."""
        with self.snapshot("reading flips") as db:
            self.session_row(db, session_id)
            answered, ids = 0, []
            for image_id, flipped in _with_norm(db).execute(
                "SELECT b.image_id, af.answer IS NOT NULL AND ttrv_norm(af.answer) != "
                "ttrv_norm(b.answer) FROM answers b JOIN answers af ON af.session_id = "
                "b.session_id AND af.image_id = b.image_id AND af.phase = 'after' "
                "JOIN session_images si ON si.session_id = b.session_id AND "
                "si.image_id = b.image_id WHERE b.session_id = ? AND b.phase = 'before' "
                "AND b.answer IS NOT NULL ORDER BY si.position",
                [session_id],
            ):
                answered += 1
                if flipped:
                    ids.append(image_id)
        return {"answered": answered, "ids": ids}

    def converged_images(self, session_id: str) -> dict[str, int]:
        """{image_id: first step at which all of its rollouts gave one valid answer}: the
        images `optim.skip_converged` drops from later rounds (`ttrv.adapt.is_converged`)."""
        with self.snapshot("reading converged images") as db:
            self.session_row(db, session_id)
            rows = db.execute(
                "SELECT image_id, min(step) FROM image_steps WHERE session_id = ? AND "
                "invalid = 0 AND answers = 1 GROUP BY image_id",
                [session_id],
            ).fetchall()
        return {image_id: int(step) for image_id, step in rows}

    def answers(
        self,
        session_id: str,
        image_id: str | None = None,
        *,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Per image, in order: image_id, name, position, label, sha256, before,
        before_response, after, after_response, after_phase ("after", else the last
        "round-k" answered), phases ({phase: answer}), flipped, correct_before,
        correct_after. Answers match after trimming and case folding; flipped/correct are
        None when an answer (or the label) is missing.

        `image_id` gives that image's row alone (an empty list when the session has no such
        image); `limit`/`offset` one page of rows in image order: neither reads the rest."""
        with self.snapshot("reading answers") as db:
            self.session_row(db, session_id)
            return answer_rows(db, session_id, image_id, limit, offset)

    # -- flip review -----------------------------------------------------------------------

    def set_review_mark(self, session_id: str, image_id: str, mark: str) -> None:
        """Record which answer of a flipped image was right ("before", "after", "neither");
        "skip" removes a mark."""
        if mark not in ("before", "after", "neither", "skip"):
            raise StoreError(f"Unknown review mark {mark!r}: before, after, neither or skip.")
        with self.transaction("saving a review mark") as db:
            self.session_row(db, session_id)
            db.execute(
                "DELETE FROM reviews WHERE session_id = ? AND image_id = ?",
                [session_id, image_id],
            )
            if mark != "skip":
                db["reviews"].insert(
                    {"session_id": session_id, "image_id": image_id, "mark": mark, "created": now()}
                )

    def review_marks(self, session_id: str) -> dict[str, str]:
        """image_id -> mark, for the session's reviewed flips."""
        with self.snapshot("reading review marks") as db:
            self.session_row(db, session_id)
            rows = db.execute(
                "SELECT image_id, mark FROM reviews WHERE session_id = ? ORDER BY created",
                [session_id],
            ).fetchall()
        return {image_id: mark for image_id, mark in rows}

    def compare(
        self, a: str, b: str, *, limit: int | None = None, offset: int = 0
    ) -> dict[str, Any]:
        """Two sessions side by side: {"a": session, "b": session (both as get_session),
        "config_diff": [{"key", "a", "b"}] (dotted keys), "shared" (images both sessions
        hold, matched by content sha256, else by image_id), "differing" (those whose four
        answers, A and B before and after, are not all the same text), "images": [{"key",
        "name", "label", "a": answers row, "b": answers row}]}: the shared images, differing
        first, each part in A's image order; `limit`/`offset` take one page of them and
        read only that page's rows."""
        sessions = {"a": self.get_session(a), "b": self.get_session(b)}
        with self.snapshot("comparing sessions") as db:
            keyed = {}
            for side, sid in (("a", a), ("b", b)):
                keyed[side] = {
                    sha or image_id: (image_id, before, after)
                    for image_id, sha, before, after in db.execute(
                        PER_IMAGE_ANSWERS + "SELECT image_id, sha256, before, after FROM per_image "
                        "ORDER BY position",
                        {"sid": sid},
                    )
                }
            pairs = []
            for key, (image_a, *answers_a) in keyed["a"].items():
                if key in keyed["b"]:
                    image_b, *answers_b = keyed["b"][key]
                    same = len({x or "" for x in answers_a + answers_b}) == 1
                    pairs.append((same, key, image_a, image_b))
            pairs.sort(key=lambda p: p[0])  # stable: A's image order within each part
            page = pairs[offset : None if limit is None else offset + limit]
            rows = {
                side: {r["image_id"]: r for r in answer_rows(
                    db, sid, image_ids=[p[2 if side == "a" else 3] for p in page])}
                for side, sid in (("a", a), ("b", b))
            } if page else {}  # fmt: skip
        shared = []
        for _same_text, key, image_a, image_b in page:
            row_a, row_b = rows["a"][image_a], rows["b"][image_b]
            label = row_a["label"] if row_a["label"] is not None else row_b["label"]
            shared.append({"key": key, "name": row_a["name"], "label": label,
                           "a": row_a, "b": row_b})  # fmt: skip
        return {
            **sessions,
            "config_diff": config_diff(sessions["a"]["config"], sessions["b"]["config"]),
            "shared": len(pairs),
            "differing": sum(not p[0] for p in pairs),
            "images": shared,
        }

    def events(self, session_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        """Logged events in order: id, kind, data (parsed), created; optionally one kind."""
        sql = "SELECT id, kind, data, created FROM events WHERE session_id = ?"
        params: list[Any] = [session_id]
        if kind is not None:
            sql += " AND kind = ?"
            params.append(kind)
        with self.snapshot("reading events") as db:
            self.session_row(db, session_id)
            rows = query_rows(db, sql + " ORDER BY id", params)
        return [parse_json_columns("events", r) for r in rows]
