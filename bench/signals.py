"""How well does each label-free signal detect harm? Catch and false-alarm rates.

    python -m bench.signals bench/results/tune-watch.json            # choose on validation
    python -m bench.signals VAL.json --apply TEST.json [TEST2.json]  # report on test

Every stored run of `bench.benchmark` (trained with the guard off, per-round greedy answers
kept for the adapted images and the watch pool) gives one *check* per round. A check is
*harmful* when the weights at that round score more than 1 point below the unadapted model
on the held-out images (labels used here only, to judge the signals). Each signal is a
number computed without labels at that check (`ttrv.guard.signals`, both watched sets);
a detector fires when it exceeds a threshold. The threshold of each signal is chosen on the
validation file alone (best catch rate minus false-alarm rate, false alarms at most 25%),
then applied unchanged to the test files.

KL is not among the signals: every benchmark variant trains with beta = 0, so no run
measures it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench.replay import split_items

HARM = -0.01  # more than 1 point down on held-out greedy accuracy
MAX_FALSE_ALARM = 0.25


def _drop(base: float | None, now: float | None) -> float | None:
    if base is None or now is None or not base:
        return None
    return 1 - now / base


def checks_of(run: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per round of a `precompute`d run: `delta` (held-out greedy accuracy
    change), `harm`, and the signal values (None where a signal does not apply)."""
    out = []
    for k, now in enumerate(run["rounds"], start=1):
        delta = run["deltas"][k]
        row: dict[str, Any] = {"model": run["model"], "round": k, "delta": delta,
                               "harm": delta < HARM}  # fmt: skip
        for name, n in now.items():
            b = run["base"][name]
            row[f"changed:{name}"] = n.changed_answers
            row[f"unexplained:{name}"] = n.unexplained_flips
            row[f"entropy_drop:{name}"] = _drop(b.marginal_entropy, n.marginal_entropy)
            row[f"letter_drop:{name}"] = _drop(b.position_entropy, n.position_entropy)
            # without a reference: how concentrated the letters are now (1 = one letter)
            row[f"letter_concentration:{name}"] = (
                None if n.position_entropy is None else 1 - n.position_entropy / math.log(4)
            )
            row[f"invalid_rise:{name}"] = n.invalid_rate - b.invalid_rate
        out.append(row)
    return out


def collect(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every check of every `precompute`d run."""
    return [check for run in runs for check in checks_of(run)]


def rates(rows: list[dict[str, Any]], key: str, threshold: float) -> tuple[float, float, int, int]:
    """(catch rate, false-alarm rate, harmful checks, harmless checks) of `key > threshold`
    over the checks where the signal applies."""
    have = [r for r in rows if r.get(key) is not None]
    harm = [r for r in have if r["harm"]]
    fine = [r for r in have if not r["harm"]]
    catch = sum(r[key] > threshold for r in harm) / len(harm) if harm else math.nan
    alarm = sum(r[key] > threshold for r in fine) / len(fine) if fine else math.nan
    return catch, alarm, len(harm), len(fine)


GRID = [i / 100 for i in range(0, 100)]


def choose(rows: list[dict[str, Any]], key: str) -> float | None:
    best, best_t = -math.inf, None
    for t in GRID:
        catch, alarm, n_harm, n_fine = rates(rows, key, t)
        if not n_harm or math.isnan(catch) or (n_fine and alarm > MAX_FALSE_ALARM):
            continue
        score = catch - (alarm if n_fine else 0.0)
        if score > best:
            best, best_t = score, t
    return best_t


def keys(rows: Iterable[dict[str, Any]]) -> list[str]:
    return sorted({k for r in rows for k in r if ":" in k})


def table(
    val: list[dict[str, Any]],
    tests: dict[str, list[dict[str, Any]]],
    fmt: Callable = "{:.0%}".format,
) -> str:
    lines = [
        "| signal (set) | threshold (val) | val: catch / false alarm | "
        + " | ".join(f"{name}: catch / false alarm" for name in tests)
        + " |",
        "|" + "---|" * (3 + len(tests)),
    ]
    for key in keys(val):
        t = choose(val, key)
        if t is None:
            cells = [key, "-", _cell(rates(val, key, 1.0), fmt, na=True)]
            cells += ["-" for _ in tests]
        else:
            cells = [key, f"> {t:.2f}", _cell(rates(val, key, t), fmt)]
            cells += [_cell(rates(rows, key, t), fmt) for rows in tests.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(r: tuple[float, float, int, int], fmt: Callable, na: bool = False) -> str:
    catch, alarm, n_harm, n_fine = r
    if na:
        return f"no threshold with <= {MAX_FALSE_ALARM:.0%} false alarms ({n_harm} / {n_fine})"
    c = "-" if math.isnan(catch) else fmt(catch)
    a = "-" if math.isnan(alarm) else fmt(alarm)
    return f"{c} / {a} ({n_harm} / {n_fine})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.signals", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("val", type=Path, help="benchmark JSON on the validation split (--tune)")
    ap.add_argument("--apply", type=Path, nargs="*", default=[], help="test-split JSON files")
    ap.add_argument(
        "--guards", action="store_true", help="also replay GUARD_GRID and choose a guard on val"
    )
    ap.add_argument(
        "--review-unguarded",
        action="store_true",
        help="also play the flip review on every test run's unguarded end",
    )
    args = ap.parse_args(argv)
    val_runs = precompute(args.val)
    test_runs = {p.stem: precompute(p) for p in args.apply}
    val = collect(val_runs)
    tests = {k: collect(v) for k, v in test_runs.items()}
    print(
        f"Checks (one per run and round): validation {len(val)} "
        f"({sum(r['harm'] for r in val)} harmful); "
        + "; ".join(f"{k} {len(v)} ({sum(r['harm'] for r in v)} harmful)" for k, v in tests.items())
    )
    print("Cells: catch rate / false-alarm rate (harmful checks / harmless checks).\n")
    print(table(val, tests))
    if args.guards:
        md, chosen = guard_table(val_runs)
        print(f"\nWhole guards replayed on {args.val.name} (best first by the rule):\n")
        print(md)
        print(f"\nChosen on validation: {chosen}")
        for p in args.apply:
            runs = test_runs[p.stem]
            ends = guard_outcomes(runs, chosen)
            for m in sorted({r["model"] for r in runs}):
                e = [x for x, r in zip(ends, runs, strict=True) if r["model"] == m]
                print(
                    f"{p.stem} {m}: mean {100 * statistics.fmean(e):+.1f}, "
                    f"{sum(x < -0.01 for x in e)}/{len(e)} runs < -1, "
                    f"{sum(x < -0.02 for x in e)}/{len(e)} < -2, worst {100 * min(e):+.1f}"
                )
    if args.review_unguarded:
        for p in args.apply:
            print(f"\nFlip review on the unguarded ends of {p.name} (all variants):\n")
            print(review_without_guard(p))
    return 0


# -- whole guards, replayed -----------------------------------------------------------------


def precompute(path: Path) -> list[dict[str, Any]]:
    """Per run: the signals of each watched set before and at each round, and the held-out
    greedy delta at each round (round 0 = unadapted), for replaying many guards cheaply."""
    from ttrv.adapt import set_signals
    from ttrv.config import TaskConfig

    payload = json.loads(path.read_text())
    out = []
    for r in payload["runs"]:
        if "baseline" in r or "rounds" not in r or "trajectory" not in r:
            continue
        cfg = payload["configs"][f"{r['model']}|{r['variant']}|{r['setting']}"]
        task = TaskConfig(**cfg["task"])
        items = split_items(r["split"], r["seed"])
        adapted = [items[p] for p in r["adapted_positions"]]
        watch = [items[p] for p in r.get("watch_positions", [])]
        sets = {k: v for k, v in {"adapted": adapted, "watch": watch}.items() if v}

        def answers(its: list[Any], xs: list[str]) -> list[dict[str, str]]:
            return [{"image_id": it.image_id, "answer": x} for it, x in zip(its, xs, strict=True)]

        before = answers(adapted, r["before"]) + answers(watch, r.get("before_watch", []))
        base = set_signals(task, sets, before)
        rounds = [
            set_signals(
                task,
                sets,
                answers(adapted, rd["answers"]) + answers(watch, rd.get("answers_watch", [])),
                before,
                r.get("votes"),
            )
            for rd in r["rounds"]
        ]
        traj = r["trajectory"]
        deltas = [
            traj[str(k)]["heldout"]["greedy_acc"] - traj["0"]["heldout"]["greedy_acc"]
            for k in range(len(rounds) + 1)
        ]
        out.append({"model": r["model"], "setting": r["setting"], "base": base,
                    "rounds": rounds, "deltas": deltas})  # fmt: skip
    return out


def guard_outcomes(runs: list[dict[str, Any]], guard: dict[str, Any]) -> list[float]:
    """The held-out greedy delta each run ends with under `guard` (GuardConfig fields)."""
    return [end for end, _ in guard_replays(runs, guard)]


def guard_replays(runs: list[dict[str, Any]], guard: dict[str, Any]) -> list[tuple[float, bool]]:
    """(the held-out greedy delta a run ends with, whether the guard tripped) per run."""
    from ttrv.config import GuardConfig
    from ttrv.guard import replay

    cfg = GuardConfig(**guard)
    out = []
    for run in runs:
        rep = replay(run["base"], list(enumerate(run["rounds"], start=1)), cfg)
        out.append((run["deltas"][rep["step"]], rep["status"] != "done"))
    return out


GUARD_GRID = [
    {
        "max_marginal_entropy_drop": d,
        "max_invalid_rise": i,
        "max_changed_answers": c,
        "max_unexplained_flips": u,
        "healthy_margin": m,
    }
    for d in (0.02, 0.05, 0.1)
    for i in (0.05, 0.1)
    for c in (0.05, 0.1, 0.15)
    for u in (0.02, 0.05, 0.1, 1.0)
    for m in (0.5, 0.75)
]


def guard_table(runs: list[dict[str, Any]], top: int = 12) -> tuple[str, dict[str, Any]]:
    """Every guard of GUARD_GRID replayed on the runs; rule: fewest runs ending more than 1
    point down, among guards keeping at least 90% of the off-format model's mean unguarded
    gain; among those within 0.5 points of the best mean over models, the one that trips on
    the fewest runs (a guard that trips on any single flip is fragile where the set of
    watched images differs from the validation split's). Returns (markdown, chosen)."""
    models = sorted({r["model"] for r in runs})
    unguarded = {
        m: statistics.fmean(r["deltas"][-1] for r in runs if r["model"] == m) for m in models
    }
    rows = []
    for g in GUARD_GRID:
        replays = guard_replays(runs, g)
        ends = [e for e, _ in replays]
        per = {m: statistics.fmean(e for e, r in zip(ends, runs, strict=True) if r["model"] == m)
               for m in models}  # fmt: skip
        keeps = all(per[m] >= 0.9 * unguarded[m] for m in models if unguarded[m] > 0.01)
        trips = sum(t for _, t in replays)
        rows.append((g, sum(e < -0.01 for e in ends), sum(e < -0.02 for e in ends), per, keeps,
                     trips))  # fmt: skip
    ok = [row for row in rows if row[4]] or rows
    fewest = min(row[1] for row in ok)
    best = max(statistics.fmean(row[3].values()) for row in ok if row[1] == fewest)
    ok.sort(
        key=lambda row: (
            row[1],
            statistics.fmean(row[3].values()) < best - 0.005,
            row[5],
            -statistics.fmean(row[3].values()),
        )
    )
    lines = [
        "| entropy drop | invalid rise | changed | unexplained | healthy margin | "
        "runs < -1 | runs < -2 | trips | " + " | ".join(f"{m}: mean Δ" for m in models) + " |",
        "|" + "---|" * (8 + len(models)),
    ]
    for g, n1, n2, per, _, trips in ok[:top]:
        lines.append(
            f"| {g['max_marginal_entropy_drop']} | {g['max_invalid_rise']} | "
            f"{g['max_changed_answers']} | {g['max_unexplained_flips']} | {g['healthy_margin']} | "
            f"{n1}/{len(runs)} | {n2}/{len(runs)} | {trips} | "
            + " | ".join(f"{100 * per[m]:+.1f}" for m in models)
            + " |"
        )
    return "\n".join(lines), ok[0][0]


def review_without_guard(path: Path) -> str:
    """The flip review played on every run's unguarded end (the guard switched off): how
    far a handful of labelled flips alone keep a run from harm and keep its gains."""
    from bench.replay import REVIEW_SIZES, play_reviews
    from ttrv.config import TaskConfig

    payload = json.loads(path.read_text())
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in payload["runs"]:
        if "greedy" not in r or "rounds" not in r:
            continue
        cfg = payload["configs"][f"{r['model']}|{r['variant']}|{r['setting']}"]
        end = r["greedy"].get(str(len(r["rounds"])))
        if end is None:
            continue
        items = split_items(r["split"], r["seed"])
        rev = play_reviews(r["greedy"]["0"], end, items, TaskConfig(**cfg["task"]), r["seed"])
        rows.setdefault((r["model"], r["setting"]), []).append(rev)
    lines = [
        "| model | setting | runs | unguarded Δ | > 1 down | "
        + " | ".join(f"review {n}: Δ | > 1 down | gains kept" for n in REVIEW_SIZES)
        + " |",
        "|" + "---|" * (5 + 3 * len(REVIEW_SIZES)),
    ]
    for (model, setting), revs in sorted(rows.items()):
        d = [100 * x["delta"] for x in revs]
        cells = [model, setting, str(len(revs)), f"{statistics.fmean(d):+.1f}",
                 str(sum(v < -1 for v in d))]  # fmt: skip
        for n in REVIEW_SIZES:
            after = [100 * x[str(n)]["delta"] for x in revs]
            gains = [x for x in revs if 100 * x["delta"] >= 1]
            kept = sum(x[str(n)]["recommendation"] != "revert" for x in gains)
            cells += [f"{statistics.fmean(after):+.1f}", str(sum(v < -1 for v in after)),
                      f"{kept}/{len(gains)}" if gains else "-"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
