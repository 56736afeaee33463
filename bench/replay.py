"""The guard replayed on guard-off runs, and the flip review played on their ends.

Every benchmark run trains with the guard off and records, at each round's end, the greedy
answers on the adaptation images (and the watch pool) and the adapter weights. The engine's
own guard functions (`ttrv.adapt.greedy_signals`, `ttrv.guard.decide`) then decide, exactly
as `adapt` does, where a guarded run would have stopped and which round it would have rolled
back to: on a live run (`replay_guard`), on a stored one (`replay_record`), or on a saved file
with the guard its job gets from the current code (`replay_engine_guard`, for `--report`).
`play_reviews` plays `python -m ttrv adapt --review N` with a reviewer who knows the labels.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, replace
from typing import Any

from bench.grid import Job, job_config, setting_overrides

REVIEW_SIZES = (10, 20)


def play_reviews(
    base: list[str], end: list[str], items: list[Any], task: Any, seed: int
) -> dict[str, Any]:
    """The flip review played on a (guarded) run, as `python -m ttrv adapt --review N` plays
    it: every image of the split is answered before and after; a reviewer who knows the
    labels marks the first N flips in the seeded review order; the verdict keeps the run or
    reverts it to the unadapted model. Returns, per N, the recommendation and the greedy
    accuracy change over all images with and without the review applied."""
    from ttrv.answers import canonical_label
    from ttrv.review import flips, labelled_review

    ids = [str(i) for i in range(len(items))]
    labels = {i: canonical_label(it.label, task) for i, it in zip(ids, items, strict=True)}
    before, after = dict(zip(ids, base, strict=True)), dict(zip(ids, end, strict=True))
    delta = sum((after[i] == labels[i]) - (before[i] == labels[i]) for i in ids) / len(ids)
    out: dict[str, Any] = {"flips": len(flips(before, after)), "delta": delta}
    for n in REVIEW_SIZES:
        _, v = labelled_review(before, after, labels, seed, n)
        out[str(n)] = {
            "recommendation": v.recommendation,
            "estimate": v.estimate,
            "reviewed": v.reviewed,
            "delta": 0.0 if v.recommendation == "revert" else delta,
        }
    return out


def replay_signals(
    base: dict[str, Any], rounds: list[dict[str, Any]], guard: dict[str, Any]
) -> dict[str, Any]:
    """Where `adapt`'s guard ends, given the signals of each watched set (`ttrv.guard.SETS`)
    before adaptation and at the end of each round (benchmark runs check at round ends only:
    `check_every` is 0 in their configs, so this is the engine's decision sequence).

    Every check goes through `ttrv.guard.decide`, the engine's own decision: a trip rolls
    back to the last clearly healthy round (0 = the unadapted model) and stops. `guard`
    holds GuardConfig fields (missing ones take the GuardConfig defaults), plus two
    candidates the engine does not have: `max_position_entropy_drop`, a separate (tighter)
    bound for the option-letter spread, and `rollback="start"`: on a trip, go back to the
    unadapted model whatever the earlier rounds looked like.
    """
    from ttrv.config import GuardConfig
    from ttrv.guard import decide

    guard = dict(guard)
    max_position_drop = guard.pop("max_position_entropy_drop", None)
    to_start = guard.pop("rollback", "best") == "start"
    cfg = GuardConfig(**{**guard, "guard": True})  # replayed for every variant
    target = 0
    verdicts: list[str] = []
    for k, now in enumerate(rounds, start=1):
        d = decide(base, now, cfg)
        reasons = [d.reason]
        b, n = base.get("adapted"), now.get("adapted")
        if max_position_drop is not None and b and n and b.position_entropy and n.position_entropy:
            drop = 1 - n.position_entropy / b.position_entropy
            if drop > max_position_drop:
                reasons.append(f"the spread of chosen option letters fell by {drop:.1%}")
        reason = "; ".join(r for r in reasons if r)
        verdicts.append(reason)
        if reason:
            return {
                "round": 0 if to_start else target,
                "status": "guard_stopped",
                "reason": reason,
                "tripped_at": k,
                "verdicts": verdicts,
            }
        if d.healthy:
            target = k
    return {
        "round": len(rounds),
        "status": "done",
        "reason": "",
        "tripped_at": None,
        "verdicts": verdicts,
    }


def replay_guard(
    task: Any,
    items: list[Any],
    before: list[Any],
    rounds: list[dict[str, Any]],
    guard: dict[str, Any],
    watch: list[Any] | None = None,
    votes: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """The engine's guard on a guard-off run: signals of the greedy answers on the adapted
    images (`items`) and the watch pool (`watch`), as `adapt` computes them, before and at
    each round's end. `before` and each round's "answers" are the sink's dicts (any images,
    matched by id; `replay_record` turns stored answer strings into them); `votes` are the
    forecast's favoured answers (image id -> answers), for unexplained flips."""
    from ttrv.adapt import set_signals

    sets = {k: v for k, v in {"adapted": items, "watch": watch or []}.items() if v}
    base = set_signals(task, sets, before)
    now = [set_signals(task, sets, r["answers"], before, votes) for r in rounds]
    return replay_signals(base, now, guard)


@functools.cache
def split_items(split: str, seed: int) -> list[Any]:
    """A whole split's multiple-choice items (options drawn by `seed`), built once per
    process: every replay of a stored run needs them and none changes them."""
    from ttrv.digits import digit_items

    return digit_items(split, "multiple_choice", seed=seed)


def replay_record(
    record: dict[str, Any], guard: dict[str, Any], monitor: bool = False
) -> dict[str, Any]:
    """Replay a guard setting on a stored run (needs its `trajectory`): the round it ends
    on and that round's metrics. `monitor`: the guard watches the greedy answers of the
    images *not* adapted on (unlabeled, label-free signals) instead of the adapted ones, a
    possible engine change measured offline."""
    from ttrv.config import TaskConfig
    from ttrv.guard import Signals

    traj = record["trajectory"]
    if monitor:
        n = len(record["rounds"])
        sig = [Signals(**traj[str(r)]["signals_heldout"]) for r in range(n + 1)]
        # the held-out changed share (None where a run did not record it: the check is off)
        sig = [replace(sig[0], changed_answers=None)] + [
            replace(sig[r], changed_answers=traj[str(r)].get("changed_heldout"))
            for r in range(1, n + 1)
        ]
        rep = replay_signals({"adapted": sig[0]}, [{"adapted": x} for x in sig[1:]], guard)
    else:
        task = TaskConfig(**record["config"]["task"])
        items = split_items(record["split"], record["seed"])
        adapted = [items[p] for p in record["adapted_positions"]]
        watch = [items[p] for p in record.get("watch_positions", [])]

        def answers(its: list[Any], xs: list[str]) -> list[dict[str, str]]:
            return [{"image_id": it.image_id, "answer": x} for it, x in zip(its, xs, strict=True)]

        before = answers(adapted, record["before"]) + answers(watch, record.get("before_watch", []))
        rounds = [
            {"answers": answers(adapted, r["answers"]) + answers(watch, r.get("answers_watch", []))}
            for r in record["rounds"]
        ]
        rep = replay_guard(
            task, adapted, before, rounds, guard, watch=watch, votes=record.get("votes")
        )
    return {**rep, "metrics": traj[str(rep["round"])]}


def replay_engine_guard(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored runs with their engine-guard outcome re-decided by the current guard code,
    from the per-round greedy answers they recorded (no model is run). The guard settings
    are those its job would get now (GuardConfig defaults, then the variant's and the
    setting's overrides), so a table can be rebuilt after the defaults change. Runs without
    stored rounds are kept as they are."""
    out = []
    for r in records:
        if "baseline" in r or "trajectory" not in r or "rounds" not in r:
            out.append(r)
            continue
        job = Job(
            r["model"],
            r["variant"],
            r["seed"],
            r["images"],
            split=r["split"],
            setting=r["setting"],
            overrides=setting_overrides(r["setting"]),
        )
        # The guard the run's job gets from the current code (defaults, then the variant's
        # and the setting's overrides), not the one stored with the run.
        guard = asdict(job_config(job, r["config"]["model"]["model"]).guard)
        decided = replay_record(r, guard)
        decided.pop("metrics")  # `outcome` finds them (final weights or a stored round)
        r = {**r, "config": {**r["config"], "guard": guard}, "guarded": decided}
        if "greedy" in r and str(decided["round"]) in r["greedy"]:
            from ttrv.config import TaskConfig

            items = split_items(r["split"], r["seed"])
            g = r["greedy"]
            task = TaskConfig(**r["config"]["task"])
            r["review"] = play_reviews(g["0"], g[str(decided["round"])], items, task, r["seed"])
        r.pop("guarded_proposed", None)  # an older file's replayed candidate guard
        out.append(r)
    return out
