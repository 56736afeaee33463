"""The TTRV benchmark on the bundled digits models: the paper's protocol, paired over seeds.

    python -m bench.benchmark --quick            # 2 seeds: none, default, ttrv_paper (target < 3 min)
    python -m bench.benchmark                    # full table (5 seeds, every variant)
    python -m bench.benchmark --images 200       # adapt on 200 unlabeled images
    python -m bench.benchmark --stress           # pushed settings, with and without guard
    python -m bench.benchmark --tune             # hyperparameters on the val split only

Protocol (per model, variant and seed): pick K random images of the held-out test split
(797; multiple-choice options drawn with the seed), hide their labels, adapt a fresh LoRA
on them through the engine (`ttrv.adapt.adapt`: real `generate` rollouts, GRPO, rounds),
then evaluate on the whole test split with `bench.fastpath` (exact for one-token answers):
greedy accuracy, expected sampled accuracy at the rollout temperature, maj@N, answer
entropy, invalid rates, per-answer accuracy and answer marginals (`ttrv.metrics`), on all
797 images and separately on the 797 - K images not used for adaptation. Each number is
paired with the same seed's unadapted baseline (same options): delta per seed, then
mean +- std over seeds.

The guard is *replayed*: every run trains with the guard off and records, at each round's
end, the greedy answers on the adaptation images and the adapter weights. The engine's own
guard functions (`ttrv.adapt.greedy_signals`, `ttrv.guard.decide`) then
decide, exactly as `adapt` does, where a guarded run would have stopped and which weights
it would have rolled back to (training up to a trip is identical with and without guard:
rollouts are seeded per step). So every run reports both outcomes, and any number of guard
settings can be compared on the same runs. tests/test_benchmark.py checks the replay
against a real guarded `adapt`.

Hyperparameters come from `--tune` (val split: adapt on 20 of its 100 images, score on
all 100); test labels are used for reporting only.

Code: this module is the CLI (`build_jobs`, `parse_args`, `main`); `bench.grid` says what
runs (models, variants, settings, `Job`), `bench.runner` runs it, `bench.replay` replays the
guard and the flip review, `bench.summary` computes and aggregates the numbers,
`bench.report` builds the markdown tables and `bench.results_file` writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.grid import (
    MAIN_VARIANTS,
    MODELS,
    QUICK_VARIANTS,
    RESULTS,
    STRESS_SETTINGS,
    STRESS_VARIANTS,
    TUNE_GRID,
    VARIANTS,
    Job,
    watch_positions,
)
from bench.replay import REVIEW_SIZES, play_reviews, replay_engine_guard, replay_guard
from bench.report import report
from bench.results_file import small_table, write_json
from bench.runner import RoundRecorder, run_jobs

# Names other code imports from here (tests, bench.signals, docs/benchmark.md).
__all__ = [
    "REVIEW_SIZES",
    "RoundRecorder",
    "main",
    "parse_args",
    "play_reviews",
    "replay_engine_guard",
    "replay_guard",
    "watch_positions",
]


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def build_jobs(args: argparse.Namespace, models: list[str]) -> list[Job]:
    seeds = list(range(args.seeds))
    jobs: list[Job] = []
    if args.tune:
        for m in models:
            for s in seeds:
                jobs.append(
                    Job(m, "none", s, args.images, split="val", setting="tune", watch=args.watch)
                )
                for name, (variant, over) in TUNE_GRID.items():
                    jobs.append(
                        Job(
                            m,
                            variant,
                            s,
                            args.images,
                            split="val",
                            setting=name,
                            overrides=over,
                            trajectory=True,
                            watch=args.watch,
                        )
                    )
        return jobs
    variants = args.variants or (QUICK_VARIANTS if args.quick else MAIN_VARIANTS)
    settings: dict[str, dict[str, Any]] = {"main": {}}
    if args.stress:
        settings = dict(STRESS_SETTINGS)
        variants = args.variants or STRESS_VARIANTS
    for m in models:
        for s in seeds:
            for v in variants:
                if VARIANTS[v] is None:
                    jobs.append(Job(m, v, s, args.images, watch=args.watch))
                    continue
                for name, over in settings.items():
                    jobs.append(
                        Job(m, v, s, args.images, setting=name, overrides=over, watch=args.watch)
                    )
    return jobs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="2 seeds: none, default, ttrv_paper")
    ap.add_argument(
        "--dry",
        action="store_true",
        help="plumbing only: 1 seed, 16 test images, N=4 (use with --model)",
    )
    ap.add_argument("--stress", action="store_true", help="the stress grid (STRESS_SETTINGS)")
    ap.add_argument("--tune", action="store_true", help="the val-split grid (TUNE_GRID)")
    ap.add_argument("--images", type=int, default=20, help="K unlabeled images to adapt on")
    ap.add_argument(
        "--watch",
        type=int,
        default=200,
        help="unlabeled images of the split, not adapted on, handed to the product as its "
        "watch pool (0 = none: only the K images, as a person with a small folder has)",
    )
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..S-1 (default 5; quick 2)")
    ap.add_argument("--models", default="base,offformat", help="comma-separated model keys")
    ap.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="KEY=PATH",
        help="use another model folder for a key (e.g. a tiny test model)",
    )
    ap.add_argument("--variants", default=None, help="comma-separated subset of variants")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (1 thread each)")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md (default: by mode)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument(
        "--report",
        default=None,
        metavar="JSON",
        help="rebuild the tables of a saved run file (runs nothing)",
    )
    args = ap.parse_args(argv)
    if args.variants:
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = set(args.variants) - set(VARIANTS)
        if unknown:
            ap.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
        if "none" not in args.variants:  # every delta is paired with its seed's baseline
            args.variants.insert(0, "none")
    if args.seeds is None:
        args.seeds = 1 if args.dry else 2 if args.quick else 3 if args.stress or args.tune else 5
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models = {k: str(v) for k, v in MODELS.items()}
    for spec in args.model:
        key, _, path = spec.partition("=")
        models[key] = path
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    missing = [m for m in chosen if not Path(models.get(m, "")).is_dir()]
    if missing and not args.report:
        print(
            f"Model folders missing for {missing}: build them with "
            "`python scripts/make_demo_model.py` or pass --model KEY=PATH.",
            file=sys.stderr,
        )
        return 2
    limits: dict[str, int | None] = {"test": None, "val": None}
    rollout: dict[str, Any] = {}
    if args.dry:
        limits = {"test": 16, "val": 16}
        args.images = min(args.images, 4)
        rollout = {"n_rollouts": 4, "n_train": 4, "max_new_tokens": 2}
        if not args.variants:
            args.variants = ["none", "default", "ttrv_paper"]
    command = " ".join(["python -m bench.benchmark", *(sys.argv[1:] if argv is None else argv)])
    name = args.out or (
        "dry"
        if args.dry
        else "quick"
        if args.quick
        else "stress"
        if args.stress
        else "tune"
        if args.tune
        else f"main-k{args.images}"
    )
    path = Path(name) if os.sep in name else RESULTS / name
    if args.report:  # one file, or several merged (e.g. stress + the K=200 runs)
        files = [Path(f) for f in args.report.split(",")]
        saved = [json.loads(f.read_text()) for f in files]
        records = [
            {**r, "config": s_["configs"][f"{r['model']}|{r['variant']}|{r['setting']}"]}
            if "config" not in r and "configs" in s_
            else r
            for s_ in saved
            for r in s_["runs"]
        ]
        elapsed = sum(s_["seconds"] for s_ in saved)
        command = " ; ".join(s_["command"] for s_ in saved)
        path = files[0].with_suffix("") if len(files) == 1 else path
        args.tune = args.tune or "--tune" in command.split()
        args.stress = args.stress or "--stress" in command.split()
        records = replay_engine_guard(records)
    else:
        t0 = time.perf_counter()
        records = run_jobs(build_jobs(args, chosen), models, limits, rollout, args.workers)
        elapsed = time.perf_counter() - t0
        if not args.no_write:  # the runs first: a failing report must not lose them
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, {"command": command, "seconds": elapsed}, records)
    md, table = report(records, command, args.tune, elapsed, args.workers, args.stress)
    if args.report:
        md += (
            f"\nTables rebuilt by `python -m bench.benchmark --report {args.report}` (no "
            "adaptation rerun): each run's engine-guard outcome re-decided from its stored "
            "per-round greedy answers with the guard settings of the current code "
            "(`ttrv.config.GuardConfig`).\n"
        )
    print(md)
    if not args.no_write:
        write_json(
            path, {"command": command, "seconds": elapsed, "table": small_table(table)}, records
        )
        path.with_suffix(".md").write_text(md)
        print(f"wrote {path.with_suffix('.json')} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
