"""The benchmark's numbers: the metrics of one evaluation (`summarize`), label-free collapse
tests (`collapse_flags`), the outcome a run ends with in each mode (headline, unguarded,
guarded) and paired deltas against each seed's baseline, mean +- std over seeds
(`aggregate`, `paired_vs`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any


def summarize(
    ev: Any,
    items: list[Any],
    task: Any,
    adapted: set[int],
    n_votes: int,
    full: bool,
    reference: Any = None,
) -> dict[str, Any]:
    """Scalar metrics on all / held-out / adapted images; with `full`, per-answer accuracy
    and marginals on all images."""
    from ttrv import metrics as M
    from ttrv.answers import INVALID, canonical_label
    from ttrv.guard import changed_share, signals
    from ttrv.tasks import LETTERS

    labels = [canonical_label(it.label, task) for it in items]
    majority = M.majority_vote_probs(ev.dists, labels, n_votes)

    def scalars(idx: list[int]) -> dict[str, float]:
        if not idx:
            return {}
        g = [ev.greedy[i] for i in idx]
        y = [labels[i] for i in idx]
        d = [ev.dists[i] for i in idx]
        return {
            "n": len(idx),
            "greedy_acc": M.greedy_accuracy(g, y),
            "expected_acc": M.expected_accuracy(d, y),
            "maj_acc": float(sum(majority[i] for i in idx) / len(idx)),
            "entropy": M.mean_entropy(d),
            "invalid_greedy": M.invalid_rate(g),
            "invalid_sampled": M.invalid_mass(d),
        }

    everything = list(range(len(items)))
    heldout = [i for i in everything if i not in adapted]
    out: dict[str, Any] = {
        "all": scalars(everything),
        "heldout": scalars(heldout),
        "adapted": scalars(sorted(adapted)),
        "leak": ev.leak,
        "fallback": ev.fallback,
    }
    # The guard's signals on the images not adapted on (label-free), for replaying a guard
    # that watches unlabeled held-out images.
    out["signals_heldout"] = signals(
        [ev.greedy[i] for i in heldout],
        positions=[ev.positions[i] for i in heldout if ev.positions[i] is not None],
    ).to_dict()
    if reference is not None:  # label-free: how many held-out answers moved since `reference`
        out["changed_heldout"] = changed_share(
            [reference.greedy[i] for i in heldout], [ev.greedy[i] for i in heldout]
        )
    letters = [LETTERS[p] if p is not None else INVALID for p in ev.positions]
    gold_letters = [
        LETTERS[[canonical_label(o, task) for o in it.options].index(y)]
        for it, y in zip(items, labels, strict=True)
    ]
    valid = [a for a in ev.greedy if a != INVALID]
    out["shape"] = {
        "top_answer_share": max(M.marginal(valid).values(), default=0.0) * len(valid) / len(items),
        "top_letter_share": max(
            (v for k, v in M.marginal(letters).items() if k != INVALID), default=0.0
        ),
        "min_letter_share": min(M.marginal(letters).get(L, 0.0) for L in LETTERS[:4]),
    }
    if full:
        out["per_letter"] = M.per_answer_accuracy(letters, gold_letters)
        out["per_digit"] = M.per_answer_accuracy(ev.greedy, labels)
        out["marginal_letters"] = M.marginal(letters)
        out["marginal_answers"] = M.marginal(ev.greedy)
        out["sampled_marginal"] = {k: round(v, 4) for k, v in M.mean_distribution(ev.dists).items()}
    return out


def collapse_flags(metrics: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """Label-free collapse tests on the test outputs: one answer or one option letter for
    most images, or invalid output taking over (relative to the baseline)."""
    flags = []
    shape, all_ = metrics["shape"], metrics["all"]
    if shape["top_answer_share"] >= 0.5:
        flags.append(f"one answer for {shape['top_answer_share']:.0%} of images")
    if shape["top_letter_share"] >= 0.6:
        flags.append(f"one letter for {shape['top_letter_share']:.0%} of images")
    rise = all_["invalid_greedy"] - base["all"]["invalid_greedy"]
    if all_["invalid_greedy"] >= 0.5 and (
        rise >= 0.1 or (all_["invalid_greedy"] >= 0.99 and rise > 0)
    ):
        flags.append(
            f"invalid output {base['all']['invalid_greedy']:.0%} -> {all_['invalid_greedy']:.0%}"
        )
    return flags


SCALARS = ("greedy_acc", "expected_acc", "maj_acc", "entropy", "invalid_greedy")


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    v = list(values)
    if not v:
        return math.nan, math.nan, 0
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0), len(v)


MODES = ("headline", "unguarded", "guarded")


def outcome(rec: dict[str, Any], mode: str = "headline") -> dict[str, Any]:
    """The metrics a run ends with. headline: the variant's own guard setting; unguarded;
    guarded: the engine's guard (replayed)."""
    if "baseline" in rec:
        return rec["baseline"]
    if mode == "headline":
        on = rec["config"]["guard"]["guard"] if "config" in rec else rec["guard_on"]
        mode = "guarded" if on else "unguarded"
    entry = rec[mode]
    if "metrics" in entry:
        return entry["metrics"]
    if entry["round"] == rec["unguarded"]["round"]:  # stored once (see `compact`)
        return rec["unguarded"]["metrics"]
    return rec["trajectory"][str(entry["round"])]


def status(rec: dict[str, Any], mode: str) -> str:
    return rec["guarded"]["status"] if mode == "guarded" else "done"


def aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (model, setting, images, variant): paired deltas against the same seed's baseline,
    for each outcome mode, plus collapse and guard counts."""
    base = {(r["model"], r["split"], r["seed"]): r["baseline"] for r in records if "baseline" in r}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["model"], r["setting"], r["images"], r["variant"]), []).append(r)
    table: dict[str, Any] = {}
    for (model, setting, images, variant), recs in sorted(groups.items()):
        row: dict[str, Any] = {
            "model": model,
            "setting": setting,
            "images": images,
            "variant": variant,
            "seeds": sorted(r["seed"] for r in recs),
        }
        adaptive = "baseline" not in recs[0]
        for mode in MODES if adaptive else ("headline",):
            stats: dict[str, Any] = {}
            for scope in ("all", "heldout"):
                for m in SCALARS:
                    vals = [outcome(r, mode)[scope][m] for r in recs]
                    bases = [base[(model, r["split"], r["seed"])][scope][m] for r in recs]
                    stats[f"{scope}.{m}"] = mean_std(vals)
                    stats[f"{scope}.{m}.delta"] = mean_std(
                        v - b for v, b in zip(vals, bases, strict=True)
                    )
            if adaptive:
                flags = [
                    collapse_flags(outcome(r, mode), base[(model, r["split"], r["seed"])])
                    for r in recs
                ]
                stats["collapsed"] = sum(bool(f) for f in flags)
                stats["collapse_flags"] = [f for f in flags if f]
                stats["worst_delta"] = min(
                    outcome(r, mode)["all"]["greedy_acc"]
                    - base[(model, r["split"], r["seed"])]["all"]["greedy_acc"]
                    for r in recs
                )
                stats["trips"] = sum(status(r, mode) == "guard_stopped" for r in recs)
                stats["reasons"] = sorted(
                    {r[mode]["reason"] for r in recs if mode == "guarded" and r[mode]["reason"]}
                )
                # collapses of the unguarded run that this mode's guard tripped on
                stats["caught"] = sum(
                    bool(
                        collapse_flags(
                            outcome(r, "unguarded"), base[(model, r["split"], r["seed"])]
                        )
                    )
                    and status(r, mode) == "guard_stopped"
                    for r in recs
                )
            row[mode] = stats
        if adaptive:
            row["seconds_adapt"] = statistics.fmean(r["seconds_adapt"] for r in recs)
            row["leak_max"] = max(outcome(r)["leak"] for r in recs)
            row["fallback_max"] = max(outcome(r)["fallback"] for r in recs)
        table["|".join(map(str, (model, setting, images, variant)))] = row
    return table


def paired_vs(
    records: list[dict[str, Any]],
    a: str,
    b: str,
    model: str,
    setting: str,
    images: int,
    metric: str = "greedy_acc",
) -> tuple[float, float, int]:
    """mean +- std over seeds of (variant a - variant b), headline outcomes, all images."""
    by = {
        (r["variant"], r["seed"]): r
        for r in records
        if r["model"] == model and r["setting"] == setting and r["images"] == images
    }
    seeds = sorted({s for (v, s) in by if v == a} & {s for (v, s) in by if v == b})
    return mean_std(
        outcome(by[(a, s)])["all"][metric] - outcome(by[(b, s)])["all"][metric] for s in seeds
    )
