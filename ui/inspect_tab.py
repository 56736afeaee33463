"""Inspect tab: what adaptation did to each image, and to the answers as a whole.

Per image: its N rollouts grouped by answer (counts, rewards, advantages), a reward
histogram, the greedy answer before and after and whether it flipped. Filters pick the
images that changed, stayed uncertain, are wrong (when labels exist) or invalid, and those
with a given answer (before or after), label or consensus range at their last sampled
step. Across
images: the answer distribution before vs after, with a warning when the model is
collapsing onto one answer, the consensus of each image's rollouts at its first vs last
sampled step, and the guard's events.
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from . import charts, review_panel
from .draft import GALLERY_LIMIT
from .state import Context, error, guarded, info

FILTERS = {
    "all": "All",
    "changed": "Changed",
    "uncertain": f"Uncertain (top answer < {charts.UNCERTAIN_CONSENSUS:.0%} of rollouts)",
    "wrong": "Wrong (needs labels)",
    "invalid": "Invalid",
}
# Consensus ranges at an image's last sampled step, as tenths of the histogram: value
# "first-last" bin (0-9), shown as a percentage range; "" is any.
CONSENSUS_RANGES = {"": "any", "0-2": "0-30%", "3-5": "30-60%", "6-8": "60-90%",
                    "9-9": "90-100%"}  # fmt: skip


def consensus_bins(value: str | None) -> tuple[int, int] | None:
    """A CONSENSUS_RANGES value as (first bin, last bin); None for any."""
    if not value:
        return None
    if value not in CONSENSUS_RANGES:
        raise ValueError(
            f"Unknown consensus range {value!r}: one of {', '.join(CONSENSUS_RANGES)}."
        )
    lo, hi = value.split("-")
    return int(lo), int(hi)


GROUP_HEADERS = ["answer", "count", "share", "frequency", "entropy term", "reward", "advantage",
                 "trained", "example response"]  # fmt: skip
TICK_S = 2.0  # live refresh while a run is active and this tab is shown


def overview(summary: dict[str, Any], session: dict) -> str:
    """Counts per filter and accuracy (when labels exist), from `Store.inspect_summary`."""
    counts = summary["counts"]
    h = session["headline"]
    parts = [
        f"**{summary['images']} images** · {counts['changed']} changed · "
        f"{counts['uncertain']} uncertain · {counts['invalid']} invalid"
    ]
    if h.get("labelled"):
        parts.append(
            f" · {counts['wrong']} wrong · accuracy (labels, evaluation only) "
            f"{charts.fmt(h.get('accuracy_before'), 2)} → {charts.fmt(h.get('accuracy_after'), 2)}"
        )
    if session["status"] in charts.ACTIVE:
        parts.append(f"\n\nRun {session['status']} · step {h.get('steps') or 0} · this view "
                     "follows the run")  # fmt: skip
    if not summary["answered_before"]:
        parts.append("\n\nNo answers yet: the baseline runs at the start of the adaptation.")
    return "".join(parts)


def count_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One {"before": a} / {"after": a} row per image giving answer a: the rows
    `charts.answers_figure` and `charts.collapse_warning` count, from the summary's counts."""
    return [{which: a} for which in ("before", "after")
            for a, k in summary[which].items() for _ in range(k)]  # fmt: skip


def norm(value: Any) -> str:
    return str(value).strip().casefold()


def matches_values(row: dict[str, Any], answer: str | None, label: str | None) -> bool:
    """Whether an image has `answer` before or after adapting and carries `label` (either
    empty: any), compared as the store compares answers (trimmed, case folded): one row's
    version of the store's `VALUES_SQL`, which `inspect_page` filters with."""
    if answer and norm(answer) not in {norm(row[k]) for k in ("before", "after")
                                       if row.get(k) is not None}:  # fmt: skip
        return False
    return not label or (row.get("label") is not None and norm(row["label"]) == norm(label))


def value_choices(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> list[tuple[str, str]]:
    """("any" first) the distinct values of `keys` across rows, most frequent first."""
    counts: dict[str, int] = {}
    for r in rows:
        for v in {str(r[k]) for k in keys if r.get(k) is not None}:
            counts[v] = counts.get(v, 0) + 1
    return choices(counts)


def choices(counts: dict[str, int]) -> list[tuple[str, str]]:
    """("any" first) {value: images} as dropdown choices, most frequent first."""
    ordered = sorted(counts, key=lambda v: (-counts[v], v))
    return [("any", ""), *((f"{v} ({counts[v]})", v) for v in ordered)]


def guard_text(events: list[dict]) -> str:
    kinds = ("run_start", "forecast", "guard", "warning", "run_end", "review_applied")
    shown = [e for e in events if e["kind"] in kinds]
    if not shown:
        return "No guard events."
    lines = []
    for e in shown:
        d = e["data"]
        if e["kind"] == "guard":
            lines.append(f"- step {d.get('step')}: **{d.get('action')}** — "
                         f"{html.escape(str(d.get('reason')))}")  # fmt: skip
        elif e["kind"] == "warning":
            lines.append(f"- ⚠ {html.escape(str(d.get('message')))}")
        elif e["kind"] == "run_start":
            if (d.get("split") or {}).get("note"):
                lines.append(f"- watch pool: {html.escape(d['split']['note'])}")
        elif e["kind"] == "forecast":
            lines.append(f"- forecast: {html.escape(str(d.get('message')))}")
        elif e["kind"] == "review_applied":
            lines.append(f"- flip review applied: **{html.escape(str(d.get('decision')))}**")
        else:
            lines.append(f"- run ended: **{d.get('status')}** after {d.get('steps')} steps — "
                         f"{html.escape(str(d.get('reason') or ''))}")  # fmt: skip
    return "\n".join(lines)


def detail_text(row: dict, stats: dict, step: int | None) -> str:
    def answer(kind: str) -> str:
        a, resp = row.get(kind), row.get(f"{kind}_response")
        if a is None:
            return "—"
        raw = f" <small>(response: `{html.escape((resp or '').strip()[:80])}`)</small>"
        return f"**{html.escape(str(a))}**{raw}"

    flipped = {True: "**flipped**", False: "unchanged", None: "—"}[row.get("flipped")]
    lines = [
        f"### {html.escape(row['name'])}",
        f"- before adaptation: {answer('before')}",
        f"- after adaptation: {answer('after')}"
        + (
            f" <small>({row['after_phase']})</small>"
            if row.get("after_phase") not in (None, "after")
            else ""
        ),  # fmt: skip
        f"- {flipped}",
    ]
    if row.get("label") is not None:
        verdict = {True: "✓ right", False: "✗ wrong", None: "—"}
        lines.append(
            f"- label (evaluation only): **{html.escape(row['label'])}** · before "
            f"{verdict[row.get('correct_before')]} · after {verdict[row.get('correct_after')]}"
        )
    if stats.get("n"):
        lines.append(
            f"- {stats['n']} rollouts at step {step}: consensus {stats['consensus']:.0%}, "
            f"invalid {stats['invalid']:.0%}"
        )
    else:
        lines.append("- no rollouts recorded for this image yet")
    return "\n".join(lines)


def build(ctx: Context) -> dict[str, Any]:
    with gr.Row():
        which = gr.Radio([(v, k) for k, v in FILTERS.items()], value="all", label="Show",
                         elem_id="inspect-filter", scale=4)  # fmt: skip
        answer_pick = gr.Dropdown([("any", "")], value="", label="Answer (before or after)",
                                  allow_custom_value=True, elem_id="inspect-answer",
                                  scale=1)  # fmt: skip
        label_pick = gr.Dropdown([("any", "")], value="", label="Label", allow_custom_value=True,
                                 elem_id="inspect-label", scale=1)  # fmt: skip
        consensus_pick = gr.Dropdown([(v, k) for k, v in CONSENSUS_RANGES.items()], value="",
                                     label="Consensus (last step)", elem_id="inspect-consensus-range",
                                     scale=1)  # fmt: skip
        refresh_btn = gr.Button("↻ Refresh", scale=0, elem_id="inspect-refresh")
    summary = gr.Markdown(elem_id="inspect-summary")
    collapse = gr.Markdown(elem_id="inspect-collapse")
    with gr.Row():
        with gr.Column(scale=3):
            gallery = gr.Gallery(
                label="Images (click one)",
                columns=6,
                height=300,
                allow_preview=False,
                fit_columns=False,
                elem_id="inspect-gallery",
                elem_classes=["ttrv-gallery"],
            )
            image_pick = gr.Dropdown(label="Or pick by name", choices=[], elem_id="inspect-image",
                                     allow_custom_value=True)  # fmt: skip
        with gr.Column(scale=2):
            distribution = gr.Plot(label="Answers across images", elem_id="inspect-answers")
            consensus = gr.Plot(label="Consensus across images", elem_id="inspect-consensus")
    with gr.Row():
        with gr.Column(scale=1):
            picture = gr.Image(label="Selected image", type="filepath", interactive=False, height=240,
                               elem_id="inspect-picture")  # fmt: skip
        with gr.Column(scale=2):
            detail = gr.Markdown(elem_id="inspect-detail")
            rewards = gr.Plot(label="Reward distribution", elem_id="inspect-rewards")
    groups = gr.Dataframe(
        headers=GROUP_HEADERS,
        interactive=False,
        wrap=True,
        column_widths=["12%", "7%", "7%", "9%", "10%", "8%", "9%", "7%", "31%"],
        label="Rollouts grouped by answer",
        elem_id="inspect-groups",
    )
    sign = gr.Markdown(elem_id="inspect-sign")
    with gr.Accordion("Guard events", open=False):
        guard = gr.Markdown(elem_id="inspect-guard")
    panel = review_panel.build(ctx)
    shown_ids = gr.State([])

    @guarded(outputs=11)
    def refresh(sid: str | None, filt: str, current: str | None, answer: str | None = "",
                label: str | None = "", consensus: str | None = "") -> tuple:  # fmt: skip
        if not sid:
            return (info("No session yet: start an adaptation or open one in Sessions."),
                    "", gr.skip(), [], gr.Dropdown(choices=[], value=None), [], "", None,
                    gr.skip(), gr.skip(), None)  # fmt: skip
        session = ctx.store.get_session(sid)
        summary = ctx.store.inspect_summary(sid)  # SQL aggregates, no per-image rows
        page = ctx.store.inspect_page(sid, filt, answer, label, consensus=consensus_bins(consensus),
                                      limit=GALLERY_LIMIT)  # fmt: skip
        shown = page["rows"]  # the first page of the images passing the filters
        note = ""
        if answer or label or consensus:
            named = " and ".join(
                [f"answer {answer!r}"] * bool(answer)
                + [f"label {label!r}"] * bool(label)
                + [f"consensus {CONSENSUS_RANGES[consensus]}"] * bool(consensus)
            )
            note += f"\n\n{page['total']} image(s) shown with {html.escape(named)}."
        if filt == "wrong" and not summary["labels"]:
            note = "\n\n" + info("No labels in this session, so nothing can be called wrong.")
        in_gallery = [r for r in shown if page["thumbs"].get(r["image_id"])]
        gallery_items = [
            (page["thumbs"][r["image_id"]],
             f"{r['name']}: {r['before'] or '—'} → {r['after'] or '—'}")
            for r in in_gallery
        ]  # fmt: skip
        if page["total"] > len(shown):
            note += (f"\n\nThe gallery and the list show the first {len(shown)} of "
                     f"{page['total']}: narrow them with an answer or a label.")  # fmt: skip
        elif len(shown) > len(in_gallery):
            note += f"\n\nThe gallery shows {len(in_gallery)}; pick any image in the list."
        ids = [r["image_id"] for r in shown]
        value = current if current in ids else (ids[0] if ids else None)
        counted = count_rows(summary)
        return (
            overview(summary, session) + note,
            charts.collapse_warning(counted) or "",
            charts.answers_figure(counted),
            gallery_items,
            gr.Dropdown(choices=[(r["name"], r["image_id"]) for r in shown], value=value),
            [r["image_id"] for r in in_gallery],
            guard_text(ctx.store.events(sid)),
            value,
            gr.Dropdown(choices=choices(summary["values"]), value=answer or ""),
            gr.Dropdown(choices=choices(summary["labels"]), value=label or ""),
            charts.consensus_figure(summary["consensus"]),
        )

    @guarded(outputs=5, status=1)
    def show_image(sid: str | None, image_id: str | None) -> tuple:
        if not sid or not image_id:
            return None, "", [], gr.skip(), ""
        row = next(iter(ctx.store.answers(sid, image_id)), None)
        if row is None:
            return None, error("This image is not in the session."), [], gr.skip(), ""
        image = next(iter(ctx.store.images(sid, image_id)), {})
        rollouts = ctx.store.rollouts(sid, image_id)
        step = rollouts[0]["step"] if rollouts else None
        table = [
            [g["answer"], g["count"], f"{g['share']:.0%}", charts.fmt(g["frequency"]),
             charts.fmt(g["entropy_term"]), charts.fmt(g["reward"]), charts.fmt(g["advantage"]),
             g["trained"], g["example"]]
            for g in charts.rollout_groups(rollouts)
        ]  # fmt: skip
        config = ctx.store.get_session(sid)["config"]
        return (
            image.get("path"),
            detail_text(row, charts.image_stats(rollouts), step),
            table,
            charts.reward_figure(rollouts) if rollouts else None,
            charts.sign_note(config) if rollouts else "",
        )

    def pick(ids: list[str], evt: gr.SelectData) -> Any:
        return ids[evt.index] if 0 <= evt.index < len(ids) else gr.skip()

    def live(sid: str | None, filt: str, current: str | None, answer: str | None,
             label: str | None, consensus: str | None, last: Any) -> tuple:  # fmt: skip
        """The timer's refresh: the overview and the shown image, redrawn only when the
        session moved on since the last tick (a finished session is drawn once)."""
        skip = (gr.skip(),) * (len(outs) + len(detail_outs) + 1)
        if not sid:
            return skip
        try:
            fingerprint = ctx.store.session_state(sid)  # cheap: no per-image aggregate
        except Exception:  # noqa: BLE001 - deleted meanwhile: the next session change redraws
            return skip
        if fingerprint == last:
            return skip
        overview_parts = refresh(sid, filt, current, answer, label, consensus)
        shown = overview_parts[7] if isinstance(overview_parts[7], str) else None
        return (*overview_parts, *show_image(sid, shown), fingerprint)

    hidden = gr.State(None)  # the image to show after a refresh
    seen = gr.State(None)  # the session state the live view last drew
    timer = gr.Timer(TICK_S, active=False)  # switched on while this tab is shown
    ctx.parts["inspect_timer"] = timer
    outs = [summary, collapse, distribution, gallery, image_pick, shown_ids, guard, hidden,
            answer_pick, label_pick, consensus]  # fmt: skip
    detail_outs = [picture, detail, groups, rewards, sign]
    refresh_inputs = [ctx.session, which, image_pick, answer_pick, label_pick, consensus_pick]
    refresh_btn.click(refresh, refresh_inputs, outs, api_name="inspect_refresh").then(
        show_image, [ctx.session, hidden], detail_outs, api_visibility="private"
    )
    # The value dropdowns are also set by `refresh` itself: they follow user input only.
    for event in (which.change, answer_pick.input, label_pick.input, consensus_pick.input):
        event(refresh, refresh_inputs, outs, api_visibility="private").then(
            show_image, [ctx.session, hidden], detail_outs, api_visibility="private"
        )
    refresh_btn.click(*panel["refresh"], api_visibility="private")  # the flip review too
    image_pick.input(show_image, [ctx.session, image_pick], detail_outs, api_name="inspect_image")
    gallery.select(pick, [shown_ids], image_pick, api_visibility="private").then(
        show_image, [ctx.session, image_pick], detail_outs, api_visibility="private"
    )
    timer.tick(live, [*refresh_inputs, seen], [*outs, *detail_outs, seen],
               show_progress="hidden", api_name="inspect_live")  # fmt: skip
    then = (show_image, [ctx.session, hidden], detail_outs)
    ctx.on_session_change(refresh, refresh_inputs, outs, then=then)
    return {"on_select": (refresh, refresh_inputs, outs), "then": then}
