"""The benchmark's markdown: the main tables (every variant against its paired baseline),
the stress table, per-letter accuracy, the flip-review table and the --tune tables with the
selections their rules make (`tune_report`); `report` picks those for a set of runs.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from bench.grid import GUARD_CANDIDATES, MAIN_VARIANTS, TUNE_GRID
from bench.replay import REVIEW_SIZES, replay_record
from bench.summary import aggregate, mean_std, outcome, paired_vs


def pts(ms: tuple[float, float, int], signed: bool = True) -> str:
    m, s, _ = ms
    if math.isnan(m):
        return "-"
    return f"{100 * m:+.1f} ± {100 * s:.1f}" if signed else f"{100 * m:.1f} ± {100 * s:.1f}"


def _rows(table: dict[str, Any], model: str, setting: str, images: int) -> list[dict[str, Any]]:
    rows = [
        row
        for row in table.values()
        if row["model"] == model
        and row["setting"] == setting
        and row["images"] == images
        and row["variant"] != "none"
    ]
    return sorted(rows, key=lambda r: MAIN_VARIANTS.index(r["variant"]))


def markdown(records: list[dict[str, Any]], table: dict[str, Any], command: str) -> str:
    """Main tables: per model and setting, every variant against its paired baseline."""
    lines = [
        f"Command: `{command}`",
        "",
        "Deltas in points against the same seed's unadapted baseline (same options), "
        "mean ± std over seeds, on all test images unless marked held-out (the images "
        "not adapted on). *Headline* = the variant's own guard setting (on for "
        "default / pre_tuning, off for the others). Guard columns: every run trained "
        "with the guard off, then replayed with the engine's guard (the variant's "
        "GuardConfig; for all but pre_tuning the defaults) from its stored per-round "
        "greedy answers.",
        "",
    ]
    keys = sorted({(r["model"], r["setting"], r["images"]) for r in records if "baseline" not in r})
    for model, setting, images in keys:
        base_rows = [
            row for row in table.values() if row["model"] == model and row["variant"] == "none"
        ]
        lines += [f"### {model}: {setting}, adapt on K={images} unlabeled test images", ""]
        if base_rows:
            b = base_rows[0]["headline"]
            lines += [
                f"Baseline (no adaptation; mean ± std over {len(base_rows[0]['seeds'])} "
                f"option draws): greedy {pts(b['all.greedy_acc'], False)}, expected "
                f"{pts(b['all.expected_acc'], False)}, maj@N {pts(b['all.maj_acc'], False)}, "
                f"entropy {b['all.entropy'][0]:.2f} nats, invalid greedy "
                f"{pts(b['all.invalid_greedy'], False)} %.",
                "",
            ]
        lines += [
            "| variant | seeds | greedy Δ | greedy Δ held-out | expected Δ | maj@N Δ | "
            "entropy | invalid | guard off: greedy Δ | engine guard: greedy Δ (trips) | "
            "worst run (guard off / engine guard) | collapses (guard off / engine guard) |",
            "|" + "---|" * 12,
        ]
        for row in _rows(table, model, setting, images):
            h, ug, gd = row["headline"], row["unguarded"], row["guarded"]
            n = len(row["seeds"])
            lines.append(
                f"| {row['variant']} | {n} | {pts(h['all.greedy_acc.delta'])} | "
                f"{pts(h['heldout.greedy_acc.delta'])} | {pts(h['all.expected_acc.delta'])} | "
                f"{pts(h['all.maj_acc.delta'])} | {h['all.entropy'][0]:.2f} | "
                f"{100 * h['all.invalid_greedy'][0]:.1f}% | {pts(ug['all.greedy_acc.delta'])} | "
                f"{pts(gd['all.greedy_acc.delta'])} ({gd['trips']}/{n}) | "
                f"{100 * ug['worst_delta']:+.1f} / {100 * gd['worst_delta']:+.1f} | "
                f"{ug['collapsed']} / {gd['collapsed']} |"
            )
        lines.append("")
        if setting == "main":
            lines += paired_table(records, model, setting, images)
    lines += review_lines(records)
    return "\n".join(lines)


def paired_table(records: list[dict[str, Any]], model: str, setting: str, images: int) -> list[str]:
    """default minus each other variant, per seed (headline outcomes), mean ± std."""
    variants = [
        v
        for v in MAIN_VARIANTS
        if v not in ("none", "default")
        and any(
            r["variant"] == v
            and r["model"] == model
            and r["setting"] == setting
            and r["images"] == images
            for r in records
        )
    ]
    if not variants:
        return []
    out = [
        "Paired: default minus each variant, same seed (greedy / expected, points):",
        "",
        "| vs | greedy | expected |",
        "|---|---|---|",
    ]
    for v in variants:
        g = paired_vs(records, "default", v, model, setting, images)
        e = paired_vs(records, "default", v, model, setting, images, "expected_acc")
        out.append(f"| {v} | {pts(g)} | {pts(e)} |")
    return out + [""]


def stress_markdown(records: list[dict[str, Any]], table: dict[str, Any], command: str) -> str:
    """Stress tables: greedy Δ without guard and with the engine's guard; worst run, trips
    and collapses per (model, setting, variant)."""
    lines = [
        f"Command: `{command}`",
        "",
        "Greedy accuracy change on all test images (points, mean ± std over seeds, paired "
        "with each seed's baseline). Worst = the lowest single run. Collapses are judged "
        "on the test outputs without labels (one answer for >= 50% of images, one letter "
        "for >= 60%, or invalid output >= 50% and up >= 10 points or >= 99% and up at "
        "all); *caught* = the "
        "unguarded run collapsed and the guard tripped.",
        "",
        "| model | setting | variant | guard off | engine guard | worst (off / engine) | "
        "trips | collapses off | caught | collapses left |",
        "|" + "---|" * 10,
    ]
    keys = sorted({(r["model"], r["setting"], r["images"]) for r in records if "baseline" not in r})
    for model, setting, images in keys:
        for row in _rows(table, model, setting, images):
            ug, gd = row["unguarded"], row["guarded"]
            n = len(row["seeds"])
            label = setting if setting != "main" else f"K={images}"
            lines.append(
                f"| {model} | {label} | {row['variant']} | {pts(ug['all.greedy_acc.delta'])} | "
                f"{pts(gd['all.greedy_acc.delta'])} | "
                f"{100 * ug['worst_delta']:+.1f} / {100 * gd['worst_delta']:+.1f} | "
                f"{gd['trips']}/{n} | {ug['collapsed']}/{n} | {gd['caught']} | "
                f"{gd['collapsed']} |"
            )
    lines += ["", *review_lines(records)]
    return "\n".join(lines)


def letters_table(records: list[dict[str, Any]], model: str, setting: str, images: int) -> str:
    """Per gold letter: greedy accuracy and how often each letter is given, mean over seeds,
    guard off (the per-letter metrics are stored for the final weights only)."""
    from ttrv.tasks import LETTERS

    out = [
        "| variant | " + " | ".join(f"acc when {L} / share {L}" for L in LETTERS[:4]) + " |",
        "|---|" + "---|" * 4,
    ]
    for variant in MAIN_VARIANTS:
        recs = [
            r
            for r in records
            if r["model"] == model
            and r["variant"] == variant
            and (variant == "none" or (r["setting"] == setting and r["images"] == images))
        ]
        if not recs:
            continue
        cells = []
        for L in LETTERS[:4]:
            acc = statistics.fmean(
                outcome(r, "unguarded")["per_letter"].get(L, {}).get("accuracy", 0.0) for r in recs
            )
            share = statistics.fmean(
                outcome(r, "unguarded")["marginal_letters"].get(L, 0.0) for r in recs
            )
            cells.append(f"{100 * acc:.0f}% / {100 * share:.0f}%")
        out.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def tune_report(records: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The --tune tables and the selections their rules make (val labels only).

    Config rule: among the `ttrv-*` / `frequency-*` settings, the highest mean over models
    of the mean val greedy delta (unguarded); settings within 0.5 points of it count as tied
    and the cheapest wins (least rollout work, then fewer option orders, then lower lr).
    Guard rule: among the guards that keep at least 90% of the selected config's unguarded
    gain on every model, the one with the fewest runs (over the whole grid) ending more than
    2 points below their baseline; ties go to the higher mean guarded gain of the selected
    config. (A first rule, fewest harmful runs alone, picked a guard whose false alarms
    erased the base model's gain; see docs/benchmark.md.)
    """
    base = {(r["model"], r["seed"]): r["baseline"]["all"] for r in records if "baseline" in r}
    runs = [r for r in records if "baseline" not in r]
    models = sorted({r["model"] for r in runs})
    settings = list(dict.fromkeys(r["setting"] for r in runs))

    def delta(r: dict[str, Any], m: dict[str, Any], key: str = "greedy_acc") -> float:
        return m["all"][key] - base[(r["model"], r["seed"])][key]

    lines = [
        "| setting | "
        + " | ".join(f"{m}: greedy Δ / expected Δ / invalid" for m in models)
        + " | guard trips (its own guard) |",
        "|---|" + "---|" * (len(models) + 1),
    ]
    score: dict[str, float] = {}
    unguarded: dict[tuple[str, str], float] = {}
    for st in settings:
        cells, per_model, trips = [], [], 0
        for m in models:
            rs = [r for r in runs if r["setting"] == st and r["model"] == m]
            g = mean_std(delta(r, r["unguarded"]["metrics"]) for r in rs)
            e = mean_std(delta(r, r["unguarded"]["metrics"], "expected_acc") for r in rs)
            inv = statistics.fmean(r["unguarded"]["metrics"]["all"]["invalid_greedy"] for r in rs)
            trips += sum(r["guarded"]["status"] != "done" for r in rs)
            cells.append(f"{pts(g)} / {pts(e)} / {100 * inv:.0f}%")
            per_model.append(g[0])
            unguarded[(st, m)] = g[0]
        n = sum(1 for r in runs if r["setting"] == st)
        lines.append(f"| {st} | " + " | ".join(cells) + f" | {trips}/{n} |")
        if st.startswith(("ttrv-", "frequency-")):
            score[st] = statistics.fmean(per_model)

    def cost(st: str) -> tuple[int, int, float]:
        over = TUNE_GRID[st][1]
        optim = over.get("optim", {})
        work = optim.get("rounds", 2) * over.get("rollout", {}).get("n_rollouts", 16)
        return (work, over.get("task", {}).get("option_orders", 1), optim.get("learning_rate", 0))

    best = max(score.values())
    tied = [st for st, v in score.items() if v >= best - 0.005]
    chosen = min(tied, key=cost)

    glines = [
        "| guard | watches | runs ending < -2 pts | trips | "
        + " | ".join(f"{chosen} on {m}: guarded Δ" for m in models)
        + " |",
        "|---|---|---|---|" + "---|" * len(models),
    ]
    gstats: dict[tuple[str, bool], tuple[bool, int, float]] = {}
    # Runs made before the held-out changed share was recorded cannot replay it.
    heldout_changed = all("changed_heldout" in r["trajectory"].get("1", {}) for r in runs)
    for g, gcfg in GUARD_CANDIDATES.items():
        for monitor in (False, True):
            if monitor and not heldout_changed and gcfg.get("max_changed_answers", 1.0) < 1:
                continue
            reps = [(r, replay_record(r, gcfg, monitor)) for r in runs]
            harmful = sum(delta(r, rep["metrics"]) < -0.02 for r, rep in reps)
            trips = sum(rep["status"] != "done" for _, rep in reps)
            sel = {
                m: statistics.fmean(
                    delta(r, rep["metrics"])
                    for r, rep in reps
                    if r["setting"] == chosen and r["model"] == m
                )
                for m in models
            }
            keeps = all(
                sel[m] >= 0.9 * unguarded[(chosen, m)] for m in models if unguarded[(chosen, m)] > 0
            )
            gstats[(g, monitor)] = (keeps, harmful, statistics.fmean(sel.values()))
            where = "held-out unlabeled images" if monitor else "adapted images (engine)"
            glines.append(
                f"| {g} | {where} | {harmful}/{len(runs)} | {trips} | "
                + " | ".join(f"{100 * sel[m]:+.1f}" for m in models)
                + " |"
            )

    def pick(monitor: bool) -> str:
        ok = [k for k, v in gstats.items() if k[1] == monitor and v[0]]
        return min(ok, key=lambda k: (gstats[k][1], -gstats[k][2]))[0]

    guard, monitor_guard = pick(False), pick(True)
    if not heldout_changed:
        glines.append(
            "\n(Held-out rows of the `changed` candidates left out: these runs did not record "
            "the changed share on the held-out images.)"
        )
    md = (
        "\n".join(lines)
        + "\n\n"
        + "\n".join(glines)
        + "\n\n"
        + f"Selected config: **{chosen}** (mean val greedy Δ over models "
        + f"{100 * score[chosen]:+.1f}; best {100 * best:+.1f}). Selected guard (engine "
        + f"signals on the adapted images): **{guard}**; watching held-out images: "
        + f"**{monitor_guard}**."
    )
    return md, {
        "config": chosen,
        "guard": guard,
        "guard_settings": GUARD_CANDIDATES[guard],
        "monitor_guard": monitor_guard,
        "scores": score,
    }


def review_lines(records: list[dict[str, Any]]) -> list[str]:
    """The flip-review table: each variant's engine-guard outcome, then with a review of
    N flips applied (keep or revert), per model."""
    runs = [r for r in records if "review" in r]
    if not runs:
        return []
    lines = [
        "### Flip review (played with the labels, after the engine guard)",
        "",
        "Greedy Δ over all test images (points, mean ± std over runs); *> 1 down*: runs ending "
        "more than 1 point below their baseline; *gains kept*: of the runs whose guarded "
        "Δ was at least +1, the share the review kept.",
        "",
        "| model | setting | variant | runs | flips | guard only | > 1 down | "
        + " | ".join(f"review {n}: Δ | > 1 down | reverted | gains kept" for n in REVIEW_SIZES)
        + " |",
        "|" + "---|" * (7 + 4 * len(REVIEW_SIZES)),
    ]
    keys = sorted({(r["model"], r["setting"], r["variant"]) for r in runs})
    for model, setting, variant in keys:
        rs = [
            r for r in runs if (r["model"], r["setting"], r["variant"]) == (model, setting, variant)
        ]
        guard = [100 * r["review"]["delta"] for r in rs]
        cells = [
            model, setting, variant, str(len(rs)),
            f"{statistics.fmean(r['review']['flips'] for r in rs):.0f}",
            pts(mean_std(g / 100 for g in guard)), str(sum(g < -1 for g in guard)),
        ]  # fmt: skip
        for n in REVIEW_SIZES:
            rev = [100 * r["review"][str(n)]["delta"] for r in rs]
            gains = [r for r in rs if 100 * r["review"]["delta"] >= 1]
            kept = sum(r["review"][str(n)]["recommendation"] != "revert" for r in gains)
            cells += [
                pts(mean_std(v / 100 for v in rev)),
                str(sum(v < -1 for v in rev)),
                str(sum(r["review"][str(n)]["recommendation"] == "revert" for r in rs)),
                f"{kept}/{len(gains)}" if gains else "-",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def report(
    records: list[dict[str, Any]],
    command: str,
    tune: bool,
    elapsed: float,
    workers: int,
    stress: bool = False,
) -> tuple[str, dict[str, Any]]:
    """The markdown and the aggregated table of a set of runs."""
    table = aggregate(records)
    if tune:
        md, selection = tune_report(records)
        md = f"Command: `{command}`\n\n" + md
        table = {"selection": selection, **table}
    elif stress:
        md = stress_markdown(records, table, command)
    else:
        md = markdown(records, table, command)
        mains = sorted(
            {
                (r["model"], r["setting"], r["images"])
                for r in records
                if "baseline" not in r and r["setting"] == "main"
            }
        )
        for m, setting, images in mains:
            md += f"\n\n#### {m}: greedy accuracy by gold option letter (K={images}, guard off)\n\n"
            md += letters_table(records, m, setting, images)
    md += f"\n\nWall time {elapsed / 60:.1f} min ({workers} worker processes).\n"
    return md, table
