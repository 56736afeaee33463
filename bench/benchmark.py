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
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODELS = {
    "base": ROOT / "models" / "ttrv-digits-llava",
    "offformat": ROOT / "models" / "ttrv-digits-llava-offformat",
}


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


OFF = {"guard": {"guard": False}}
# The AdaptConfig defaults before this benchmark's tuning (ttrv/config.py until e5c5f3f).
PRE_TUNING = {
    "task": {"option_orders": 1},
    "optim": {"learning_rate": 2e-4},
    # max_changed_answers did not exist then: 1.0 never trips.
    "guard": {
        "max_marginal_entropy_drop": 0.35,
        "max_invalid_rise": 0.10,
        "max_changed_answers": 1.0,
    },
}
O1 = {"task": {"option_orders": 1}}

# Each variant: AdaptConfig overrides on top of the current defaults (with the
# multiple-choice task). `guard` in the overrides decides which outcome (guarded /
# unguarded) is the variant's headline; both are always reported.
VARIANTS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "default": {},  # AdaptConfig() as it stands, guard on
    "pre_tuning": PRE_TUNING,  # the defaults before tuning, guard on
    # The reference code's reward: p(a) - 0.75 * H / log M, INVALID an ordinary answer,
    # per-image normalisation (the entropy term cancels), letters voted as shown; no guard.
    "ttrv_paper": {"reward": {"reward": "ttrv_paper"}, **O1, **OFF},
    # Frequency with per-image advantages = our ttrv reward with group scope (the entropy
    # term cancels). Against ttrv_paper: only invalid answers differ (they never win here).
    "frequency_o1": {"reward": {"reward": "frequency"}, **O1, **OFF},
    # ... then content voting (the default's 4 option orders); against default: the scope.
    "frequency": {"reward": {"reward": "frequency"}, **OFF},
    "majority": {"reward": {"reward": "majority"}, **OFF},  # TTRL
    "entropy": {"reward": {"reward": "entropy"}, **OFF},
    "random": {"reward": {"reward": "random"}, **OFF},  # control
}
MAIN_VARIANTS = list(VARIANTS)
QUICK_VARIANTS = ["none", "default", "ttrv_paper"]

# --stress: pushed settings on top of each variant (the default: lr 3e-3, 2 rounds, K=20).
STRESS_SETTINGS: dict[str, dict[str, Any]] = {
    "lr1e-2": {"optim": {"learning_rate": 1e-2}},
    "lr3e-2": {"optim": {"learning_rate": 3e-2}},
    "8rounds": {"optim": {"rounds": 8}},
}
STRESS_VARIANTS = ["none", "default", "ttrv_paper", "frequency", "majority", "entropy", "random"]


# --tune: the val-split grid, name -> (variant, overrides). Adapt on 20 of the 100 val
# images, score on all 100; every round is evaluated so that guard settings can be replayed.
_TUNE_GRID: dict[str, tuple[str, dict[str, Any]]] = {
    **{
        f"ttrv-o{o}-lr{lr}": (
            "default",
            {"task": {"option_orders": o}, "optim": {"learning_rate": float(lr)}},
        )
        for o in (1, 4)
        for lr in ("2e-4", "1e-3", "3e-3")
    },
    "frequency-o1-lr1e-3": ("frequency", {"optim": {"learning_rate": 1e-3}}),
    "frequency-o4-lr1e-3": (
        "frequency",
        {"task": {"option_orders": 4}, "optim": {"learning_rate": 1e-3}},
    ),
    "ttrv-o4-lr1e-3-r4": (
        "default",
        {"task": {"option_orders": 4}, "optim": {"learning_rate": 1e-3, "rounds": 4}},
    ),
    "ttrv-o4-lr3e-3-r4": (
        "default",
        {"task": {"option_orders": 4}, "optim": {"learning_rate": 3e-3, "rounds": 4}},
    ),
    "ttrv-o4-lr1e-2": ("default", {"task": {"option_orders": 4}, "optim": {"learning_rate": 1e-2}}),
    "ttrv-o4-lr3e-3-n8": (
        "default",
        {
            "task": {"option_orders": 4},
            "optim": {"learning_rate": 3e-3},
            "rollout": {"n_rollouts": 8, "n_train": 8},
        },
    ),
    "frequency-o4-lr3e-3": (
        "frequency",
        {"task": {"option_orders": 4}, "optim": {"learning_rate": 3e-3}},
    ),
    # pushed runs of the other rewards, for choosing the guard's thresholds
    **{
        f"{v}-lr3e-3-r4": (v, {"optim": {"learning_rate": 3e-3, "rounds": 4}})
        for v in ("ttrv_paper", "majority", "entropy", "random")
    },
}
# Pinned to the pre-tuning defaults, so the grid means the same whatever the defaults are.
TUNE_GRID = {k: (v, deep_merge(PRE_TUNING, over)) for k, (v, over) in _TUNE_GRID.items()}
# Guard settings replayed on every tune run (GuardConfig fields; a candidate without
# "changed" in its name has max_changed_answers 1.0, which never trips).
GUARD_CANDIDATES: dict[str, dict[str, Any]] = (
    {
        f"drop{d}-inv{i}" + (f"-changed{c}" if c else ""): {
            "max_marginal_entropy_drop": d,
            "max_invalid_rise": i,
            "max_changed_answers": c or 1.0,
        }
        for d, i in ((0.35, 0.10), (0.1, 0.10), (0.1, 0.05), (0.05, 0.05))
        for c in (None, 0.1, 0.15, 0.25)
    }
    | {
        f"drop0.1-inv0.1-letters{p}": {
            "max_marginal_entropy_drop": 0.1,
            "max_invalid_rise": 0.1,
            "max_changed_answers": 1.0,
            "max_position_entropy_drop": p,
        }
        for p in (0.02, 0.03, 0.05, 0.08)
    }
    | {
        f"drop0.1-inv0.1{'-changed0.15' if c else ''}-to-start": {
            "max_marginal_entropy_drop": 0.1,
            "max_invalid_rise": 0.1,
            "rollback": "start",
            "max_changed_answers": 0.15 if c else 1.0,
        }
        for c in (False, True)
    }
)


# ---------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------


@dataclass
class Job:
    model: str  # key of MODELS (or of --model overrides)
    variant: str
    seed: int
    images: int  # K: unlabeled images adapted on
    split: str = "test"
    setting: str = "main"  # "main", a STRESS_SETTINGS key or a TUNE_GRID key
    overrides: dict[str, Any] = field(default_factory=dict)  # on top of the variant's
    trajectory: bool = True  # evaluate after every round (for offline guard replays)
    watch: int = 0  # unlabeled images of the split (not adapted on) handed over as watch pool

    @property
    def key(self) -> tuple[str, str, str, int, int, str]:
        return (self.model, self.setting, self.variant, self.images, self.seed, self.split)


def job_config(job: Job, model_path: str, rollout: dict[str, Any] | None = None) -> Any:
    """The AdaptConfig a job runs: defaults + MC task + variant + job overrides."""
    from ttrv.config import AdaptConfig
    from ttrv.digits import MC_QUESTION

    data: dict[str, Any] = {
        "model": {"model": model_path},
        "task": {"kind": "multiple_choice", "question": MC_QUESTION},
        "optim": {"seed": job.seed},
        "rollout": dict(rollout or {}),
        # Checks at round ends only, so that the per-round replay is the engine's sequence.
        "guard": {"check_every": 0},
    }
    data = deep_merge(data, VARIANTS[job.variant] or {})
    data = deep_merge(data, {k: v for k, v in job.overrides.items() if k != "images"})
    return AdaptConfig.from_dict(data)


def watch_positions(n_items: int, adapted: list[int], n: int, seed: int) -> list[int]:
    """`n` seeded positions among the images not adapted on: the unlabeled watch pool the
    benchmark hands the product (label-free: positions only)."""
    rest = sorted(set(range(n_items)) - set(adapted))
    return sorted(random.Random(f"ttrv-bench:watch:{seed}").sample(rest, min(n, len(rest))))


def adapt_positions(n_items: int, k: int, seed: int, split: str) -> list[int]:
    """Which K images of the split a seed adapts on (label-free: positions only)."""
    return sorted(random.Random(f"ttrv-bench:{split}:{seed}").sample(range(n_items), k))


# ---------------------------------------------------------------------------------------
# The worker: models, evaluators and runs, cached per process
# ---------------------------------------------------------------------------------------


class Worker:
    def __init__(
        self,
        models: dict[str, str],
        limits: dict[str, int | None],
        rollout: dict[str, Any] | None = None,
    ) -> None:
        self.models = models
        self.limits = limits
        self.rollout = rollout or {}
        self._loaded: dict[str, Any] = {}
        self._items: dict[tuple[str, int], list[Any]] = {}
        self._evaluators: dict[tuple[str, str, int], Any] = {}
        self._baselines: dict[tuple[str, str, int], Any] = {}

    def loaded(self, model: str) -> Any:
        if model not in self._loaded:
            from ttrv.config import ModelConfig
            from ttrv.loading import load_model

            self._loaded[model] = load_model(ModelConfig(model=self.models[model], device="cpu"))
        return self._loaded[model]

    def items(self, split: str, seed: int) -> list[Any]:
        if (split, seed) not in self._items:
            from ttrv.digits import digit_items

            self._items[(split, seed)] = digit_items(
                split, "multiple_choice", seed=seed, limit=self.limits.get(split)
            )
        return self._items[(split, seed)]

    def evaluator(self, model: str, split: str, seed: int, cfg: Any) -> Any:
        """The fast evaluator of a split's items; shared by models with the same tokenizer,
        special tokens and chat template (the bundled pair), since it only encodes prompts."""
        from ttrv.adapt import make_policy

        policy = make_policy(self.loaded(model), cache_images=False)
        tok = policy.tokenizer
        key = (
            split,
            seed,
            hash(
                (
                    tuple(sorted(tok.get_vocab().items())),
                    tuple(policy.eos),
                    tuple(policy.suppress),
                    str(tok.chat_template),
                )
            ),
        )
        if key not in self._evaluators:
            from bench.fastpath import FirstTokenEvaluator

            self._evaluators[key] = FirstTokenEvaluator(
                policy, self.items(split, seed), cfg.task, cfg.rollout
            )
        return self._evaluators[key]

    def baseline(self, job: Job, cfg: Any) -> Any:
        key = (job.model, job.split, job.seed)
        if key not in self._baselines:
            ev = self.evaluator(job.model, job.split, job.seed, cfg)
            self._baselines[key] = ev.evaluate(self.loaded(job.model).model)
        return self._baselines[key]

    def run(self, job: Job) -> dict[str, Any]:
        import torch

        from ttrv.adapt import adapt
        from ttrv.lora import adapter_state, attach_lora, load_adapter_state

        t0 = time.perf_counter()
        base_loaded = self.loaded(job.model)
        cfg = job_config(job, self.models[job.model], self.rollout)
        items = self.items(job.split, job.seed)
        k = int(job.overrides.get("images", job.images))
        n_votes = cfg.rollout.n_rollouts
        record: dict[str, Any] = {
            "model": job.model,
            "variant": job.variant,
            "seed": job.seed,
            "images": k,
            "split": job.split,
            "setting": job.setting,
            "config": cfg.to_dict(),
        }
        base_eval = self.baseline(job, cfg)
        positions = adapt_positions(len(items), k, job.seed, job.split)
        if VARIANTS[job.variant] is None:
            # The same seed's adapted positions, so that "held-out" means the same images in
            # the baseline as in every adapted run it is paired with.
            record["baseline"] = summarize(
                base_eval, items, cfg.task, set(positions), n_votes, full=True
            )
            record["seconds"] = time.perf_counter() - t0
            return record

        # Adapt with the guard off, recording each round (answers + weights) for the replay.
        unlabeled = [replace(items[p], label=None) for p in positions]
        pool_positions = watch_positions(len(items), positions, job.watch, job.seed)
        pool = [replace(items[p], label=None) for p in pool_positions]
        record["watch_positions"] = pool_positions
        model = attach_lora(copy.deepcopy(base_loaded.model), cfg.lora, seed=job.seed)
        recorder = RoundRecorder(model)
        run_cfg = replace(cfg, guard=replace(cfg.guard, guard=False))
        torch.manual_seed(job.seed)
        t1 = time.perf_counter()
        from ttrv.watch import Split

        split = Split(
            [it.image_id for it in unlabeled],
            [it.image_id for it in pool],
            f"benchmark: {len(pool)} unlabeled held-out images as the watch pool",
        )
        result = adapt(
            replace(base_loaded, model=model), unlabeled + pool, run_cfg, sink=recorder,
            split=split,
        )  # fmt: skip
        record.update(
            seconds_adapt=time.perf_counter() - t1,
            steps=result.steps,
            status=result.status,
            reason=result.reason,
            adapted_positions=positions,
            train=recorder.step_summary(),
            before=[a["answer"] for a in recorder.before[: len(unlabeled)]],
            before_watch=[a["answer"] for a in recorder.before[len(unlabeled) :]],
            votes=recorder.votes,
            forecast={k: v for k, v in recorder.forecast.items() if k != "votes"},
            rounds=[
                {
                    "round": i + 1,
                    "answers": [a["answer"] for a in r["answers"][: len(unlabeled)]],
                    "answers_watch": [a["answer"] for a in r["answers"][len(unlabeled) :]],
                }
                for i, r in enumerate(recorder.rounds)
            ],
        )

        # Evaluate the final weights (guard off) and wherever each replayed guard ends.
        t2 = time.perf_counter()
        ev = self.evaluator(job.model, job.split, job.seed, cfg)
        adapted = set(positions)
        n_rounds = len(recorder.rounds)
        evals: dict[int, Any] = {0: base_eval, n_rounds: ev.evaluate(model)}
        final_weights = adapter_state(model)

        def at_round(r: int, full: bool) -> dict[str, Any]:
            if r not in evals:
                load_adapter_state(model, recorder.rounds[r - 1]["weights"])
                evals[r] = ev.evaluate(model)
            return summarize(
                evals[r], items, cfg.task, adapted, n_votes, full=full, reference=base_eval
            )

        record["unguarded"] = {"round": n_rounds, "metrics": at_round(n_rounds, True)}
        rep = replay_guard(
            cfg.task, unlabeled, recorder.before, recorder.rounds, _asdict(cfg.guard),
            watch=pool, votes=recorder.votes,
        )  # fmt: skip
        record["guarded"] = {**rep, "metrics": at_round(rep["round"], True)}
        if job.trajectory:
            record["trajectory"] = {str(r): at_round(r, False) for r in range(n_rounds + 1)}
        # Every image's greedy answer at each evaluated round: reviews replay offline.
        record["greedy"] = {str(r): list(e.greedy) for r, e in evals.items()}
        record["review"] = play_reviews(
            base_eval.greedy, evals[rep["round"]].greedy, items, cfg.task, job.seed
        )
        load_adapter_state(model, final_weights)
        record["seconds_eval"] = time.perf_counter() - t2
        record["seconds"] = time.perf_counter() - t0
        return record


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
    from ttrv.review import flips, mark_from_label, review_order, verdict

    labels = [canonical_label(it.label, task) for it in items]
    ids = [str(i) for i in range(len(items))]
    before, after = (
        dict(zip(ids, base, strict=True)),
        dict(zip(ids, end, strict=True)),
    )
    flipped = flips(before, after)
    order = review_order(flipped, seed)
    delta = sum((after[i] == labels[int(i)]) - (before[i] == labels[int(i)]) for i in ids) / len(
        ids
    )
    out: dict[str, Any] = {"flips": len(flipped), "delta": delta}
    for n in REVIEW_SIZES:
        marks = {i: mark_from_label(labels[int(i)], before[i], after[i]) for i in order[:n]}
        v = verdict(marks, len(flipped), len(ids))
        out[str(n)] = {
            "recommendation": v.recommendation,
            "estimate": v.estimate,
            "reviewed": v.reviewed,
            "delta": 0.0 if v.recommendation == "revert" else delta,
        }
    return out


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


def _asdict(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj)


class RoundRecorder:
    """A sink keeping what the guard replay needs: greedy answers before and after each
    round and the adapter weights at each round's end; plus per-step training stats."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.before: list[dict[str, str]] = []
        self.rounds: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []
        self.forecast: dict[str, Any] = {}
        self.votes: dict[str, list[str]] = {}

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        from ttrv.lora import adapter_state

        if kind == "answers" and data["phase"] == "before":
            self.before = data["answers"]
        elif kind == "answers" and data["phase"].startswith("round-"):
            self.rounds.append({"answers": data["answers"], "weights": adapter_state(self.model)})
        elif kind == "step":
            self.steps.append(data)
        elif kind == "forecast":
            self.forecast, self.votes = data, data.get("votes") or {}

    def step_summary(self) -> dict[str, Any]:
        if not self.steps:
            return {}
        first, last = self.steps[0], self.steps[-1]
        keys = ("consensus", "entropy", "invalid_rate", "reward_mean")
        return {
            "first": {k: first[k] for k in keys},
            "last": {k: last[k] for k in keys},
            "seconds_per_step": statistics.fmean(s["seconds"] for s in self.steps),
            "groups_skipped": sum(s["groups_skipped"] for s in self.steps),
            "groups": sum(s["groups"] for s in self.steps),
        }


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
    matched by id) or, in older stored runs, plain strings in the order of `items`; `votes`
    are the forecast's favoured answers (image id -> answers), for unexplained flips."""
    from ttrv.adapt import greedy_signals

    def by_id(xs: list[Any]) -> dict[str, dict[str, str]]:
        if xs and isinstance(xs[0], dict):
            return {x["image_id"]: x for x in xs}
        return {
            it.image_id: {"image_id": it.image_id, "answer": x}
            for it, x in zip(items, xs, strict=True)
        }

    sets = {"adapted": items, "watch": watch or []}
    sets = {k: v for k, v in sets.items() if v}
    first = by_id(before)
    before_list = list(first.values())

    def sigs(answers: dict[str, dict[str, str]], reference: bool) -> dict[str, Any]:
        return {
            k: greedy_signals(
                task,
                its,
                [answers[it.image_id] for it in its],
                before_list if reference else None,
                votes if reference else None,
            )
            for k, its in sets.items()
        }

    base = sigs(first, reference=False)
    now = [sigs(by_id(r["answers"]), reference=True) for r in rounds]
    return replay_signals(base, now, guard)


def replay_record(
    record: dict[str, Any], guard: dict[str, Any], monitor: bool = False
) -> dict[str, Any]:
    """Replay a guard setting on a stored run (needs its `trajectory`): the round it ends
    on and that round's metrics. `monitor`: the guard watches the greedy answers of the
    images *not* adapted on (unlabeled, label-free signals) instead of the adapted ones, a
    possible engine change measured offline."""
    from ttrv.config import TaskConfig
    from ttrv.digits import digit_items
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
        items = digit_items(record["split"], "multiple_choice", seed=record["seed"])
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


# ---------------------------------------------------------------------------------------
# Metrics of one evaluation
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# Running many jobs
# ---------------------------------------------------------------------------------------

_WORKER: Worker | None = None


def _init_worker(
    models: dict[str, str],
    limits: dict[str, int | None],
    rollout: dict[str, Any] | None,
    threads: int,
) -> None:
    global _WORKER
    import warnings

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
    torch.set_num_threads(threads)
    _WORKER = Worker(models, limits, rollout)


def _run_job(job: Job) -> dict[str, Any]:
    assert _WORKER is not None
    return _WORKER.run(job)


def run_jobs(
    jobs: list[Job],
    models: dict[str, str],
    limits: dict[str, int | None],
    rollout: dict[str, Any] | None,
    workers: int,
    log: Any = print,
) -> list[dict[str, Any]]:
    """Run every job (baselines first), in-process or on up to `workers` processes."""
    jobs = sorted(jobs, key=lambda j: (VARIANTS[j.variant] is not None, j.model, j.seed))
    out: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def done(rec: dict[str, Any]) -> None:
        out.append(rec)
        log(
            f"[{len(out)}/{len(jobs)} {time.perf_counter() - t0:6.0f}s] {rec['model']} "
            f"{rec['setting']} {rec['variant']} K={rec['images']} seed {rec['seed']}: "
            f"{_brief(rec)} ({rec['seconds']:.1f}s)"
        )

    if workers <= 1:
        _init_worker(models, limits, rollout, 1)
        for job in jobs:
            done(_run_job(job))
        return out
    import multiprocessing as mp

    with ProcessPoolExecutor(
        workers,
        mp_context=mp.get_context("spawn"),
        initializer=_init_worker,
        initargs=(models, limits, rollout, 1),
    ) as pool:
        for rec in pool.map(_run_job, jobs):
            done(rec)
    return out


def _brief(rec: dict[str, Any]) -> str:
    if "baseline" in rec:
        a = rec["baseline"]["all"]
        return f"greedy {a['greedy_acc']:.3f} expected {a['expected_acc']:.3f} invalid {a['invalid_greedy']:.2f}"
    u, g = rec["unguarded"]["metrics"]["all"], rec["guarded"]
    return (
        f"greedy {u['greedy_acc']:.3f} (guarded {g['metrics']['all']['greedy_acc']:.3f}, "
        f"round {g['round']}/{rec['unguarded']['round']}) {rec['status']}"
    )


# ---------------------------------------------------------------------------------------
# Aggregation and tables
# ---------------------------------------------------------------------------------------

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
            path, {"command": command, "seconds": elapsed, "table": _small_table(table)}, records
        )
        path.with_suffix(".md").write_text(md)
        print(f"wrote {path.with_suffix('.json')} and {path.with_suffix('.md')}")
    return 0


def setting_overrides(setting: str) -> dict[str, Any]:
    """The overrides a job of this setting ran with (main, a stress setting or a tune one)."""
    if setting in STRESS_SETTINGS:
        return STRESS_SETTINGS[setting]
    if setting in TUNE_GRID:
        return TUNE_GRID[setting][1]
    return {}


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
        guard = _asdict(job_config(job, r["config"]["model"]["model"]).guard)
        decided = replay_record(r, guard)
        decided.pop("metrics")  # `outcome` finds them (final weights or a stored round)
        r = {**r, "config": {**r["config"], "guard": guard}, "guarded": decided}
        if "greedy" in r and str(decided["round"]) in r["greedy"]:
            from ttrv.config import TaskConfig
            from ttrv.digits import digit_items

            items = digit_items(r["split"], "multiple_choice", seed=r["seed"])
            g = r["greedy"]
            task = TaskConfig(**r["config"]["task"])
            r["review"] = play_reviews(g["0"], g[str(decided["round"])], items, task, r["seed"])
        r.pop("guarded_proposed", None)  # an older file's replayed candidate guard
        out.append(r)
    return out


def write_json(path: Path, head: dict[str, Any], records: list[dict[str, Any]]) -> None:
    runs, configs = compact(records)
    payload = {**head, "configs": configs, "runs": runs}
    path.with_suffix(".json").write_text(json.dumps(_jsonable(payload), separators=(",", ":")))


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


def compact(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Runs without what can be rebuilt: a guarded outcome's metrics when they are those of
    the unguarded end or of a stored round, and each run's full config (kept once per
    model, variant and setting). Returns (runs, configs)."""
    configs: dict[str, Any] = {}
    out = []
    for r in records:
        r = dict(r)
        cfg = r.pop("config", None)
        if cfg is not None:
            configs.setdefault(f"{r['model']}|{r['variant']}|{r['setting']}", cfg)
            r["guard_on"] = cfg["guard"]["guard"]
        if "guarded" in r and "metrics" in r["guarded"]:
            entry = dict(r["guarded"])
            if entry["round"] == r["unguarded"]["round"] or str(entry["round"]) in r.get(
                "trajectory", {}
            ):
                entry.pop("metrics")
            r["guarded"] = entry
        out.append(r)
    return out, configs


def _small_table(table: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "all.greedy_acc",
        "all.expected_acc",
        "all.maj_acc",
        "all.invalid_greedy",
        "all.entropy",
        "heldout.greedy_acc",
    )
    out = {}
    for k, row in table.items():
        if not isinstance(row, dict) or "variant" not in row:
            out[k] = row
            continue
        small = {x: row[x] for x in row if x not in MODES}
        for mode in MODES:
            if mode in row:
                st = row[mode]
                small[mode] = {
                    m: st[m]
                    for m in st
                    if m in keep
                    or m.removesuffix(".delta") in keep
                    or m
                    in ("collapsed", "worst_delta", "trips", "caught", "collapse_flags", "reasons")
                }
        out[k] = small
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return None if math.isnan(obj) else round(obj, 4)
    return obj


if __name__ == "__main__":
    raise SystemExit(main())
