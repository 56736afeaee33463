"""Flip review, shown in Inspect: settle whether a run helped with a few clicks.

After a run every image is answered before and after. The images whose answer changed
("flips") are offered one at a time, in a seeded random order (`sessions.review`), with
both answers and the image's rollouts; the person marks which answer was right. After each
mark the verdict (net change in accuracy over all flips, with an interval, and a
recommendation) is redrawn; one click applies it: keep the adapter, or revert the
session's result to the unadapted model. Marks and decisions live in the store.
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from sessions import review

from . import charts
from .state import Context, error, guarded, info, ok

BUTTONS = (("before", "Before was right"), ("after", "After is right"),
           ("neither", "Neither is right"), ("skip", "Skip"))  # fmt: skip


def _next_index(flips: list[dict], start: int) -> int:
    """The first unmarked flip from `start` on (wrapping), else `start` clamped."""
    if not flips:
        return 0
    n = len(flips)
    for k in range(n):
        i = (start + k) % n
        if flips[i]["mark"] is None:
            return i
    return min(max(start, 0), n - 1)


def verdict_markdown(state: dict[str, Any]) -> str:
    v = state["verdict"]
    if v["flips"] == 0:
        return info("No answer changed in this session's last run: nothing to review.")
    head = (
        f"**{v['flips']} of {state['images']} answers changed** · reviewed {v['reviewed']} "
        f"(after right {v['after_right']}, before right {v['before_right']}, neither "
        f"{v['neither']})"
    )
    body = html.escape(review.verdict_text(state))
    return f"{head}\n\n{body}"


def flip_markdown(flip: dict | None, position: int, total: int) -> str:
    if flip is None:
        return ""
    mark = review.MARK_LABELS.get(flip["mark"] or "", "not marked yet")
    return (
        f"**Flip {position + 1} of {total}: {html.escape(flip['name'])}**  \n"
        f"before: **{html.escape(str(flip['before']))}** → after: "
        f"**{html.escape(str(flip['after']))}**  \nmark: {mark}"
    )


def build(ctx: Context) -> dict[str, Any]:
    with gr.Accordion("Flip review: was the change right?", open=True, elem_id="review"):
        gr.Markdown(
            "Only images whose answer changed can change accuracy. Mark a few (they come in "
            "a random order, so a handful is a fair sample) and the verdict estimates the "
            "run's net effect on all images."
        )
        verdict = gr.Markdown(elem_id="review-verdict")
        with gr.Row():
            picture = gr.Image(label="image", height=180, interactive=False, scale=1,
                               elem_id="review-image")  # fmt: skip
            with gr.Column(scale=2):
                flip = gr.Markdown(elem_id="review-flip")
                votes = gr.Markdown(elem_id="review-votes")
        with gr.Row():
            buttons = [gr.Button(label, elem_id=f"review-{m}", size="sm") for m, label in BUTTONS]
        with gr.Row():
            keep_btn = gr.Button("Apply: keep the adapter", elem_id="review-keep")
            revert_btn = gr.Button("Apply: roll back to the unadapted model",
                                   elem_id="review-revert")  # fmt: skip
        status = gr.Markdown(elem_id="review-status")
    index = gr.State(0)

    def draw(sid: str | None, at: int, state: dict[str, Any] | None = None) -> tuple:
        """The panel for `state` (`review.queue`; read here when not given)."""
        if not sid:
            return info("No session yet."), None, "", "", 0, ""
        state = state or review.queue(ctx.store, sid)
        flips = state["flips"]
        if not flips:
            return verdict_markdown(state), None, "", "", 0, ""
        at = _next_index(flips, at)
        current = review.flip(ctx.store, sid, flips[at])  # the one flip shown
        if current is None:
            return verdict_markdown(state), None, "", "", at, ""
        image = next(iter(ctx.store.images(sid, current["image_id"])), {})
        groups = charts.rollout_groups(ctx.store.rollouts(sid, current["image_id"]))
        votes_text = (
            "rollouts (latest step): "
            + ", ".join(f"{html.escape(str(g['answer']))} ×{g['count']}" for g in groups[:6])
            if groups
            else "no rollouts for this image (it was not adapted on: a watch-pool image or "
            "one only answered)"
        )
        return (
            verdict_markdown(state),
            image.get("path"),
            flip_markdown(current, at, len(flips)),
            votes_text,
            at,
            "",
        )

    @guarded(outputs=6, status=5)
    def show(sid: str | None, at: int) -> tuple:
        return draw(sid, at)

    def marker(value: str):
        @guarded(outputs=6, status=5)
        def mark(sid: str | None, at: int) -> tuple:
            if not sid:
                return (*draw(sid, at)[:5], error("Open a session first."))
            state = review.queue(ctx.store, sid)
            flips = state["flips"]
            if not flips:
                return draw(sid, at, state)
            current = flips[min(at, len(flips) - 1)]
            state = review.mark(ctx.store, sid, current["image_id"], value)
            # skip moves on without marking; a mark moves to the next unmarked flip
            return draw(sid, (at + 1) % len(flips), state)

        return mark

    def applier(decision: str):
        @guarded(outputs=6, status=5)
        def apply(sid: str | None, at: int) -> tuple:
            if not sid:
                return (*draw(sid, at)[:5], error("Open a session first."))
            state = review.apply(ctx.store, sid, decision)
            done = (
                "The session keeps its adapter."
                if decision == "keep"
                else "The session's result is now the unadapted model (Ask and Evaluate use "
                "no adapter); the adapted weights stay on disk."
            )
            return (*draw(sid, at, state)[:5], ok(done))

        return apply

    outs = [verdict, picture, flip, votes, index, status]
    for (value, _), btn in zip(BUTTONS, buttons, strict=True):
        btn.click(marker(value), [ctx.session, index], outs, api_name=f"review_{value}")
    keep_btn.click(applier("keep"), [ctx.session, index], outs, api_name="review_keep")
    revert_btn.click(applier("revert"), [ctx.session, index], outs, api_name="review_revert")
    ctx.on_session_change(show, [ctx.session, index], outs)
    return {"refresh": (show, [ctx.session, index], outs)}
