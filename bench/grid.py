"""What the benchmark runs: the models, the variants (AdaptConfig overrides), the stress and
tune settings, the guard candidates replayed on tune runs, and a `Job` with the AdaptConfig it
runs (`job_config`) and the images it adapts on and watches (seeded positions, label-free).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
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


def setting_overrides(setting: str) -> dict[str, Any]:
    """The overrides a job of this setting ran with (main, a stress setting or a tune one)."""
    if setting in STRESS_SETTINGS:
        return STRESS_SETTINGS[setting]
    if setting in TUNE_GRID:
        return TUNE_GRID[setting][1]
    return {}
