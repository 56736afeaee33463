"""Flip review of a session: the queue of images whose greedy answer changed, the marks a
person gives them, the verdict (`ttrv.review`) and its one-click application.

The marks live in the store's `reviews` table (exported with the session); applying a
verdict is a `review_applied` event. A session whose latest applied verdict is "revert"
answers with the unadapted model: `result_adapter` gives every job that answers or exports
with a session's result the same rule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ttrv.review import MARK_LABELS, review_order, verdict

if TYPE_CHECKING:
    from .store import Store

DECISIONS = ("keep", "revert")


def queue(store: Store, session_id: str) -> dict[str, Any]:
    """The review state, without any image's answers: `flips` ([{"image_id", "mark"}] for
    the images whose answer after the run differs from before, in the seeded review order,
    each `mark` or None; `flip` reads one's answers), `images` (answered before and after),
    the `verdict` (`ttrv.review.Verdict` as a dict) and `applied` (the latest applied
    decision, or None)."""
    found = store.flip_ids(session_id)  # counts and ids from SQL, no rows
    flipped = set(found["ids"])
    seed = int(
        ((store.get_session(session_id).get("config") or {}).get("optim") or {}).get("seed", 0)
    )
    marks = {i: m for i, m in store.review_marks(session_id).items() if i in flipped}
    order = review_order(found["ids"], seed)
    v = verdict(marks, len(order), found["answered"])
    return {
        "flips": [{"image_id": i, "mark": marks.get(i)} for i in order],
        "images": found["answered"],
        "verdict": v.to_dict(),
        "applied": applied(store, session_id),
    }


def flip(store: Store, session_id: str, entry: dict[str, Any]) -> dict[str, Any] | None:
    """One entry of `queue`'s `flips` as its `Store.answers` row plus its `mark` (None when
    the session no longer holds the image)."""
    row = next(iter(store.answers(session_id, entry["image_id"])), None)
    return None if row is None else {**row, "mark": entry["mark"]}


def mark(store: Store, session_id: str, image_id: str, value: str) -> dict[str, Any]:
    """Mark one flip ("before", "after", "neither", or "skip" to clear) and return the
    updated `queue`."""
    if image_id not in store.flip_ids(session_id)["ids"]:
        raise ValueError("That image's answer did not change: only flips are reviewed.")
    store.set_review_mark(session_id, image_id, value)
    return queue(store, session_id)


def apply(store: Store, session_id: str, decision: str) -> dict[str, Any]:
    """Apply a decision: "keep" the adapter or "revert" the session's result to the
    unadapted model; recorded as a `review_applied` event with the verdict it followed."""
    if decision not in DECISIONS:
        raise ValueError(f"Unknown decision {decision!r}: keep or revert.")
    state = queue(store, session_id)
    store.sink(session_id)(
        "review_applied",
        {
            "decision": decision,
            "verdict": state["verdict"],
            "marks": {f["image_id"]: f["mark"] for f in state["flips"] if f["mark"]},
        },
    )
    return {**state, "applied": decision}


def applied(store: Store, session_id: str) -> str | None:
    events = store.events(session_id, kind="review_applied")
    return events[-1]["data"]["decision"] if events else None


def result_adapter(store: Store, session_id: str) -> tuple[bool, dict[str, Any] | None]:
    """What a session's result is, for every job that answers or exports with it:
    (reverted by its flip review, its latest checkpoint on disk or None). A reverted
    session answers with the unadapted model, so it has no checkpoint to use."""
    if applied(store, session_id) == "revert":
        return True, None
    ckpt = store.latest_checkpoint(session_id)
    return False, ckpt if ckpt and not ckpt["missing"] else None


def session_adapter(store: Store, session_id: str) -> dict[str, Any] | None:
    """The checkpoint a session answers with, or None (none saved, or reverted)."""
    return result_adapter(store, session_id)[1]


def verdict_text(state: dict[str, Any]) -> str:
    """One paragraph for the UI: the verdict and what has been applied."""
    v = state["verdict"]
    text = v["message"]
    if state["applied"] == "revert":
        text += " Applied: the session's result is the unadapted model."
    elif state["applied"] == "keep":
        text += " Applied: the session keeps its adapter."
    return text


__all__ = [
    "DECISIONS",
    "MARK_LABELS",
    "applied",
    "apply",
    "flip",
    "mark",
    "queue",
    "result_adapter",
    "session_adapter",
]
