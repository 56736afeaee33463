"""Pure functions from store rows to numbers, text and plotly figures.

Nothing here touches Gradio or the store: every function takes the dicts that
`sessions.store.Store` returns (`metrics`, `rollouts`, `answers`, `events`) and is
tested on hand-written rows.
"""

from __future__ import annotations

import html
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

INVALID = "<invalid>"  # ttrv.answers.INVALID (not imported: keeps this module light)
# (column, title) of the live training curves, in grid order.
CURVES: tuple[tuple[str, str], ...] = (
    ("reward_mean", "reward (mean ± std)"),
    ("consensus", "consensus (top-answer share)"),
    ("entropy", "answer entropy (nats)"),
    ("invalid_rate", "invalid rate"),
    ("kl", "KL to base"),
    ("loss", "loss"),
    ("lr", "learning rate"),
    ("grad_norm", "grad norm"),
)
COLORS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2")
# An image is "uncertain" when its top answer holds less than this share of its rollouts.
UNCERTAIN_CONSENSUS = 0.5
# Collapse warning: one answer holds at least this share of the images' greedy answers...
COLLAPSE_SHARE = 0.5
# ...and at least this many images answered (a 2-image session cannot "collapse").
COLLAPSE_MIN_IMAGES = 4

ACTIVE = ("queued", "running", "stopping")


# -- progress --------------------------------------------------------------------------------


def total_steps(n_images: int, rounds: int, images_per_step: int) -> int:
    """Planned GRPO steps: rounds * ceil(images / images_per_step) (an upper bound: images
    whose rollouts all agree may be skipped in later rounds)."""
    if n_images <= 0:
        return 0
    return max(1, rounds) * math.ceil(n_images / max(1, images_per_step))


def planned_steps(n_images: int, rounds: int, images_per_step: int,
                  steps: list[dict[str, Any]], converged: dict[str, int]) -> int:  # fmt: skip
    """Steps the run will take as far as the store can tell, when converged images are
    skipped: the steps done, the rest of the current round (its order was fixed when it
    began, over the images not converged in earlier rounds), and every later round over
    the images not converged yet. Equals `total_steps` before anything converged."""
    if not steps:
        return total_steps(n_images, rounds, images_per_step)
    per_round = Counter(int(s["round"]) for s in steps)
    round_of = {int(s["step"]): int(s["round"]) for s in steps}
    current = max(per_round)
    # A rollout row may land before its step row: count it in the current round.
    done_in = [round_of.get(step, current) for step in converged.values()]
    active_then = n_images - sum(r < current for r in done_in)
    rest_of_round = max(0, math.ceil(active_then / max(1, images_per_step)) - per_round[current])
    later = max(0, rounds - 1 - current) * math.ceil(
        max(0, n_images - len(converged)) / max(1, images_per_step)
    )
    return len(steps) + rest_of_round + later


@dataclass
class Progress:
    done: int
    total: int  # the steps the run will take, as far as known now
    round: int | None  # 1-based round of the last step
    rounds: int
    step_s: float | None  # mean seconds per step over the recent steps
    eta_s: float | None
    status: str  # the session's status
    planned: int = 0  # rounds * ceil(images / images_per_step), what the schedule assumes
    converged: int = 0  # images skipped in later rounds because all their rollouts agreed

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0


def progress(steps: list[dict[str, Any]], config: dict[str, Any], n_images: int,
             status: str, converged: dict[str, int] | None = None) -> Progress:  # fmt: skip
    """Where a run stands. `converged` (`Store.converged_images`) shortens the expected
    total as images converge, instead of the total jumping down when the run ends."""
    optim = config.get("optim", {})
    rounds = int(optim.get("rounds", 1))
    per_step = int(optim.get("images_per_step", 1))
    n_images = adapted_images(n_images, config)
    planned = total_steps(n_images, rounds, per_step)
    skip = bool(optim.get("skip_converged", True)) and converged
    total = planned_steps(n_images, rounds, per_step, steps, converged) if skip else planned
    done = len(steps)
    recent = [s["seconds"] for s in steps[-10:] if s.get("seconds")]
    step_s = sum(recent) / len(recent) if recent else None
    eta = step_s * max(0, total - done) if step_s is not None and status in ACTIVE else None
    last_round = steps[-1].get("round") if steps else None
    if status == "done":  # what actually ran
        total = done
    return Progress(
        done=done,
        total=max(total, done),
        round=None if last_round is None else int(last_round) + 1,
        rounds=rounds,
        step_s=step_s,
        eta_s=eta,
        status=status,
        planned=planned,
        converged=len(converged or {}) if skip else 0,
    )


def plan_note(p: Progress, config: dict[str, Any]) -> str:
    """Why the run takes (or took) fewer steps than planned, and what that did to the
    learning-rate schedule (it is planned over all `planned` steps), or ""."""
    if p.planned <= p.total or p.status in ("stopped", "failed", "interrupted"):
        return ""
    text = (
        f"{p.planned} steps were planned; {p.converged} image(s) converged (all rollouts "
        f"agreed) and are skipped in later rounds"
    )
    schedule = config.get("optim", {}).get("schedule", "constant")
    if schedule != "constant":
        text += (
            f", so the {schedule} learning-rate schedule, laid out over {p.planned} steps, "
            f"stops at step {p.total} before it fully decays"
        )
    return text + "."


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def phase_text(p: Progress, has_before: bool, has_after: bool) -> str:
    """What the run is doing now, in words."""
    if p.status == "queued":
        return "queued: waiting for the worker (another job may be running)"
    if p.status == "stopping":
        return "stopping after the current step"
    if p.status == "running":
        if p.done == 0:
            return (
                "loading the model and answering every image before adaptation (baseline)"
                if not has_before
                else "sampling the first step's rollouts"
            )
        if p.done >= p.total and not has_after:
            return "answering every image after adaptation"
        return "adapting"
    return p.status


def progress_html(p: Progress, phase: str, elapsed_s: float | None = None,
                  note: str = "") -> str:  # fmt: skip
    """A progress bar with "Step x / y", round, elapsed and ETA (elem ids for tests), and
    `note` (e.g. `plan_note`) in small print below."""
    pct = round(100 * p.fraction)
    bits = [f"<b class='ttrv-steps'>Step {p.done} / {p.total}</b>"]
    if p.round is not None:
        bits.append(f"round {p.round} / {p.rounds}")
    if p.step_s is not None:
        # two significant figures: a fast model's 0.04 s/step is not "0.0 s/step"
        bits.append(f"{p.step_s:.2g} s/step" if p.step_s < 10 else f"{p.step_s:.0f} s/step")
    if elapsed_s is not None:
        bits.append(f"elapsed {clock(elapsed_s)}")
    if p.eta_s is not None:
        bits.append(f"ETA {clock(p.eta_s)}")
    return (
        f"<div class='ttrv-progress' data-done='{p.done}' data-total='{p.total}' "
        f"data-status='{html.escape(p.status)}'>"
        f"<div class='ttrv-bar'><div style='width:{pct}%'></div></div>"
        f"<div>{' · '.join(bits)} · <i>{html.escape(phase)}</i></div>"
        + (f"<div class='ttrv-plan'><small>{html.escape(note)}</small></div>" if note else "")
        + "</div>"
    )


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def run_headline(session: dict[str, Any], events: list[dict[str, Any]]) -> str:
    """A finished run in one line: status and steps, accuracy before -> after (labelled
    images), answers changed, and what the guard did; "" while it is active."""
    status = session["status"]
    before_run = run_plan_lines(events)
    if status in ACTIVE:
        return "\n\n".join(before_run)
    h = session["headline"]
    parts = [f"**Run {status}** after {h.get('steps') or 0} steps"]
    if h.get("accuracy_before") is not None or h.get("accuracy_after") is not None:
        parts.append(
            f"accuracy **{_pct(h.get('accuracy_before'))} → {_pct(h.get('accuracy_after'))}** "
            f"({h.get('labelled')} labelled images; labels only score, never train)"
        )
    if h.get("compared"):
        parts.append(f"**{h.get('flipped')} of {h['compared']}** answers changed")
    rollbacks = [e["data"] for e in events
                 if e["kind"] == "guard" and e["data"].get("action") == "rollback"]  # fmt: skip
    if rollbacks:
        d = rollbacks[-1]
        target = d.get("rolled_back_to") or "the last healthy checkpoint"
        parts.append(
            f"guard: **rolled back to {html.escape(str(target))}** at step {d.get('step')} "
            f"({html.escape(str(d.get('reason')))})"
        )
    elif session.get("config", {}).get("guard", {}).get("guard", True):
        parts.append("guard: no rollback")
    else:
        parts.append("guard: off")
    reviews = [e["data"] for e in events if e["kind"] == "review_applied"]
    if reviews:
        parts.append(f"flip review: **{reviews[-1].get('decision')}** applied")
    elif h.get("flipped"):
        parts.append("settle it in Inspect → Flip review (a few marks give a verdict)")
    return "\n\n".join([" · ".join(parts), *before_run])


def run_plan_lines(events: list[dict[str, Any]]) -> list[str]:
    """The watch-pool note and the forecast a run made before training (latest run)."""
    lines = []
    starts = [e["data"] for e in events if e["kind"] == "run_start" and e["data"].get("split")]
    if starts:
        lines.append(f"Watch pool: {html.escape(starts[-1]['split']['note'])}")
    forecasts = [e["data"] for e in events if e["kind"] == "forecast"]
    if forecasts:
        lines.append(f"Forecast: {html.escape(str(forecasts[-1].get('message')))}")
    return lines


def adapted_images(n_images: int, config: dict[str, Any]) -> int:
    """How many of a session's images a run trains on (the guard's watch pool is not)."""
    from ttrv.config import AdaptConfig, ConfigError
    from ttrv.watch import split_sizes

    try:
        return split_sizes(n_images, AdaptConfig.from_dict(config))[0]
    except (ConfigError, TypeError, ValueError):  # an older session's config: count all
        return n_images


def _clock_of(stamp: str | None) -> str:
    return stamp[11:19] if stamp and len(stamp) >= 19 else "--:--:--"


def run_log(events: list[dict[str, Any]], jobs: list[dict[str, Any]], limit: int = 200) -> str:
    """What the worker did for a session, oldest first, as Markdown lines with the time:
    its jobs (queued, started, ended, errors) and logged events (start, checkpoints,
    guard decisions, warnings, forecast, end); the last `limit` lines."""
    lines: list[tuple[str, str]] = []
    for j in jobs:
        what = f"{j['kind']} job {j['id']}"
        if j.get("request", {}).get("resume"):
            what += " (resume)"
        lines.append((j.get("created") or "", f"{what} queued"))
        if j.get("started"):
            lines.append((j["started"], f"{what} started"))
        if j.get("finished"):
            err = f": {j['error']}" if j.get("error") else ""
            lines.append((j["finished"], f"{what} {j['status']}{err}"))
    for e in events:
        d, kind = e.get("data") or {}, e["kind"]
        if kind == "run_start":
            text = f"run started on {len(d.get('images') or [])} images"
            if (d.get("split") or {}).get("note"):
                text += f"; {d['split']['note']}"
        elif kind == "checkpoint":
            text = f"checkpoint saved at step {d.get('step')} (round {d.get('round')})"
        elif kind == "guard":
            text = f"guard **{d.get('action')}** at step {d.get('step')}: {d.get('reason')}"
        elif kind == "warning":
            text = f"⚠ {d.get('message')}"
        elif kind == "forecast":
            text = f"forecast: {d.get('message')}"
        elif kind == "run_end":
            text = (
                f"run ended **{d.get('status')}** after {d.get('steps')} steps: {d.get('reason')}"
            )
        else:
            text = kind.replace("_", " ")
        lines.append((e.get("created") or "", text))
    lines.sort(key=lambda t: t[0])
    shown = lines[-limit:]
    if not shown:
        return "Nothing logged yet."
    return "\n".join(f"- `{_clock_of(t)}` {html.escape(text, quote=False)}" for t, text in shown)


# -- curves ------------------------------------------------------------------------------------


def curves_figure(runs: dict[str, list[dict[str, Any]]], height: int = 460) -> go.Figure:
    """Training curves of one or more runs ({name: metrics rows}), one panel per metric."""
    fig = make_subplots(
        rows=2, cols=4, subplot_titles=[t for _, t in CURVES],
        horizontal_spacing=0.06, vertical_spacing=0.16,
    )  # fmt: skip
    for i, (name, steps) in enumerate(runs.items()):
        color = COLORS[i % len(COLORS)]
        xs = [s["step"] + 1 for s in steps]
        for j, (column, _) in enumerate(CURVES):
            row, col = divmod(j, 4)
            ys = [s.get(column) for s in steps]
            if column == "reward_mean":
                std = [s.get("reward_std") or 0.0 for s in steps]
                upper = [None if y is None else y + d for y, d in zip(ys, std, strict=True)]
                lower = [None if y is None else y - d for y, d in zip(ys, std, strict=True)]
                fig.add_trace(
                    go.Scatter(x=xs + xs[::-1], y=upper + lower[::-1], fill="toself",
                               fillcolor=color, opacity=0.15, line={"width": 0},
                               hoverinfo="skip", showlegend=False, legendgroup=name),
                    row=row + 1, col=col + 1,
                )  # fmt: skip
            fig.add_trace(
                go.Scatter(x=xs, y=ys, mode="lines+markers", name=name, legendgroup=name,
                           showlegend=j == 0, line={"color": color, "width": 2},
                           marker={"size": 4}),
                row=row + 1, col=col + 1,
            )  # fmt: skip
    fig.update_layout(
        height=height,
        margin={"l": 40, "r": 10, "t": 40, "b": 30},
        legend={"orientation": "h", "y": -0.08},
        showlegend=len(runs) > 1,
        template="plotly_white",
    )
    fig.update_annotations(font_size=12)
    for j, (column, _) in enumerate(CURVES):
        if any(runs.values()) and all(
            s.get(column) is None for steps in runs.values() for s in steps
        ):
            row, col = divmod(j, 4)
            fig.add_annotation(text="not measured", showarrow=False, row=row + 1, col=col + 1,
                               x=0.5, y=0.5, xref="x domain", yref="y domain",
                               font={"color": "#9ca3af"})  # fmt: skip
    fig.update_xaxes(title_text=None, rangemode="tozero")
    if not any(runs.values()):
        fig.add_annotation(text="No steps yet", showarrow=False, xref="paper", yref="paper",
                           x=0.5, y=0.5, font={"size": 16, "color": "#6b7280"})  # fmt: skip
    return fig


# -- per image ---------------------------------------------------------------------------------


def entropy_term(rollout: dict[str, Any]) -> float | None:
    """The part of a rollout's reward that comes from the answer entropy (-alpha * H for
    ttrv rewards, all of it for the entropy reward); None when the reward has no such term."""
    comp = rollout.get("components") or {}
    reward = rollout.get("reward")
    if reward is None or "neg_entropy" not in comp:
        return None
    return reward - comp["frequency"] if "frequency" in comp else reward


def rollout_groups(rollouts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per distinct answer, most common first: answer, count, share, frequency
    (reward component, mean), entropy_term (mean, see `entropy_term`), reward (mean),
    advantage (mean), trained (how many were trained on), example response."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rollouts:
        groups.setdefault(r.get("answer") or INVALID, []).append(r)
    n = len(rollouts)

    def mean(values: list[Any]) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) / len(known) if known else None

    rows = []
    for answer, rs in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        rows.append(
            {
                "answer": answer,
                "count": len(rs),
                "share": len(rs) / n,
                "frequency": mean([(r.get("components") or {}).get("frequency") for r in rs]),
                "entropy_term": mean([entropy_term(r) for r in rs]),
                "reward": mean([r.get("reward") for r in rs]),
                "advantage": mean([r.get("advantage") for r in rs]),
                "trained": sum(bool(r.get("trained")) for r in rs),
                "example": (rs[0].get("response") or "").strip()[:200],
            }
        )
    return rows


def advantage_scope(config: dict[str, Any]) -> str:
    """ "group" or "batch", as `ttrv.config.RewardConfig.scope` resolves it."""
    reward = config.get("reward", {})
    scope = reward.get("advantage_scope", "auto")
    if scope != "auto":
        return scope
    from ttrv.rewards import REWARDS  # the registry holds each reward's own scope

    spec = REWARDS.get(reward.get("reward", "ttrv"))
    return spec.scope if spec is not None else "group"


def sign_note(config: dict[str, Any]) -> str:
    """One line on how to read the signs of rewards and advantages for this run."""
    if advantage_scope(config) == "batch":
        return (
            "Reward = frequency + entropy term (−α·H, ≤ 0, the same for every rollout of an "
            "image). Advantages are normalised over all images of the step (batch scope), so "
            "even the top answer is negative when other images in that step agreed more: "
            "it is pushed up less than theirs, not pushed away."
        )
    return (
        "Reward = frequency + entropy term (−α·H, ≤ 0, the same for every rollout of an "
        "image). Advantages are normalised within this image's rollouts (group scope): "
        "answers above the image's mean reward are positive, the others negative."
    )


def image_stats(rollouts: list[dict[str, Any]]) -> dict[str, float | None]:
    """consensus (top-answer share, invalid not counted as an answer) and invalid share."""
    if not rollouts:
        return {"consensus": None, "invalid": None, "n": 0}
    answers = [r.get("answer") or INVALID for r in rollouts]
    valid = Counter(a for a in answers if a != INVALID)
    n = len(answers)
    return {
        "consensus": max(valid.values()) / n if valid else 0.0,
        "invalid": sum(a == INVALID for a in answers) / n,
        "n": n,
    }


def reward_figure(rollouts: list[dict[str, Any]], height: int = 260) -> go.Figure:
    """Histogram of the rollouts' rewards, stacked by answer, on bins shared by all answers.

    When every rollout scored the same, the one bar is drawn narrow at that value with
    the axis centred on it (plotly's automatic bins draw it from x-0.5 to x+0.5)."""
    fig = go.Figure()
    values = [r["reward"] for r in rollouts if r.get("reward") is not None]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    span = hi - lo
    size = span / 20 if span > 1e-9 else 0.02
    bins = {"start": lo - size / 2, "end": hi + size / 2, "size": size}
    for i, row in enumerate(rollout_groups(rollouts)):
        rewards = [
            r["reward"] for r in rollouts
            if (r.get("answer") or INVALID) == row["answer"] and r.get("reward") is not None
        ]  # fmt: skip
        fig.add_trace(
            go.Histogram(x=rewards, name=str(row["answer"]), xbins=bins, autobinx=False,
                         marker_color=COLORS[i % len(COLORS)])
        )  # fmt: skip
    title = "reward of each rollout, by answer"
    if values and span <= 1e-9:
        title = f"all {len(values)} rollouts scored {lo:.3g}"
        fig.update_xaxes(range=[lo - 0.5, hi + 0.5])
    fig.update_layout(
        barmode="stack", height=height, template="plotly_white",
        margin={"l": 40, "r": 10, "t": 30, "b": 30},
        title={"text": title, "font": {"size": 13}},
        xaxis_title=None, yaxis_title="rollouts",
    )  # fmt: skip
    return fig


# -- across images -----------------------------------------------------------------------------


def answer_counts(rows: list[dict[str, Any]], which: str) -> Counter:
    return Counter(r[which] for r in rows if r.get(which) is not None)


def collapse_warning(rows: list[dict[str, Any]]) -> str | None:
    """A warning when the greedy answers pile onto one answer, else None.

    When one answer holds >= COLLAPSE_SHARE of the (>= COLLAPSE_MIN_IMAGES) images' latest
    answers: a collapse warning if it gained images or other answers vanished during
    adaptation, else a note that the model leaned that way from the start.
    """
    after = answer_counts(rows, "after")
    before = answer_counts(rows, "before")
    n = sum(after.values())
    if n < COLLAPSE_MIN_IMAGES:
        return None
    top, count = after.most_common(1)[0]
    share = count / n
    before_share = before.get(top, 0) / sum(before.values()) if before else 0.0
    if share >= COLLAPSE_SHARE and (share > before_share or len(after) < len(before)):
        return (
            f"⚠ Collapse risk: {count} of {n} images ({share:.0%}) now answer "
            f"{top!r} (before adaptation: {before_share:.0%}); {len(after)} distinct answers "
            f"remain of {len(before)}. Self-consistency rewards sharpen whatever the model "
            "already prefers: check a few images, lower the learning rate or rounds, or "
            "keep the guard on."
        )
    if share >= COLLAPSE_SHARE:
        return (
            f"⚠ {count} of {n} images answer {top!r}, as {before_share:.0%} did before "
            "adaptation: the model leans to one answer, and adapting on its own votes tends "
            "to strengthen such a bias."
        )
    return None


def before_after_bars(
    x: list[str], series: list[tuple[str, list[int]] | None], title: str, height: int = 280
) -> go.Figure:
    """Grouped bars of images per category, an earlier series (grey) beside a later one
    (blue), either None when absent: Inspect's answers and consensus charts."""
    fig = go.Figure()
    for entry, color in zip(series, ("#94a3b8", "#2563eb"), strict=True):
        if entry is not None:
            fig.add_trace(go.Bar(x=x, y=entry[1], name=entry[0], marker_color=color))
    fig.update_layout(
        barmode="group", height=height, template="plotly_white",
        margin={"l": 40, "r": 10, "t": 30, "b": 30},
        title={"text": title, "font": {"size": 13}},
        yaxis_title="images", legend={"orientation": "h", "y": 1.12, "x": 1, "xanchor": "right"},
    )  # fmt: skip
    return fig


def answers_figure(rows: list[dict[str, Any]], height: int = 280) -> go.Figure:
    """Greedy answers across all images: how many images gave each answer, before vs after."""
    before, after = answer_counts(rows, "before"), answer_counts(rows, "after")
    labels = [a for a, _ in (before + after).most_common()]
    series = [(name, [counts.get(a, 0) for a in labels]) if counts else None
              for name, counts in (("before", before), ("after", after))]  # fmt: skip
    return before_after_bars([str(a) for a in labels], series,
                             "greedy answer of each image, before vs after", height)  # fmt: skip


def consensus_figure(bins: dict[str, list[int]], height: int = 280) -> go.Figure | None:
    """Images by consensus (share of an image's N rollouts agreeing with its top answer),
    at each image's first sampled step vs its last: adaptation that sharpens the model
    moves the mass to the right. None before any step."""
    if not any(sum(b) for b in bins.values()):
        return None
    labels = [f"{10 * i}-{10 * i + 10}%" for i in range(10)]
    series = [("first sampled", bins.get("first", [0] * 10)),
              ("last sampled", bins.get("last", [0] * 10))]  # fmt: skip
    return before_after_bars(labels, series,
                             "consensus of each image's rollouts, first vs last step", height)  # fmt: skip


def matches_filter(row: dict[str, Any], stats: dict[str, Any], which: str) -> bool:
    """Whether an image passes an Inspect filter: all, changed, uncertain, wrong, invalid.

    `row` is a `Store.answers` row, `stats` its `image_stats`.
    """
    if which == "changed":
        return bool(row.get("flipped"))
    if which == "uncertain":
        c = stats.get("consensus")
        return c is not None and c < UNCERTAIN_CONSENSUS
    if which == "wrong":
        verdict = row.get("correct_after")
        if verdict is None:
            verdict = row.get("correct_before")
        return verdict is False
    if which == "invalid":
        greedy = row.get("after") if row.get("after") is not None else row.get("before")
        return greedy == INVALID or (stats.get("invalid") or 0) >= 0.5
    return True


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}"
    return str(value)
