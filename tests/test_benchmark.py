"""The benchmark's measuring instruments: metrics by hand, the fast path against `generate`,
the guard replay against a real guarded run, and a dry end-to-end run."""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ttrv import metrics as M
from ttrv.answers import INVALID

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "models" / "ttrv-digits-llava"
OFFFORMAT = ROOT / "models" / "ttrv-digits-llava-offformat"
needs_models = pytest.mark.skipif(
    not (BASE.is_dir() and OFFFORMAT.is_dir()),
    reason="bundled models not built (python scripts/make_demo_model.py)",
)


# ---------------------------------------------------------------------------------------
# Metrics, hand-computed
# ---------------------------------------------------------------------------------------


def test_expected_and_greedy_accuracy_by_hand():
    dists = [{"7": 0.6, "1": 0.4}, {INVALID: 0.5, "3": 0.5}, {"2": 1.0}]
    labels = ["7", "3", "9"]
    assert M.expected_accuracy(dists, labels) == pytest.approx((0.6 + 0.5 + 0.0) / 3)
    assert M.greedy_accuracy(["7", INVALID, "2"], labels) == pytest.approx(1 / 3)
    assert M.invalid_mass(dists) == pytest.approx(0.5 / 3)
    assert M.entropy({"7": 0.5, "1": 0.5}) == pytest.approx(math.log(2))


@pytest.mark.parametrize(
    ("dist", "n", "expected"),
    [
        ({"7": 0.6, "1": 0.4}, 3, 3 * 0.6**2 * 0.4 + 0.6**3),  # 7 needs 2 or 3 of 3 votes
        ({"7": 0.5, INVALID: 0.5}, 2, 0.75),  # any valid 7 wins; invalid never does
        ({"7": 0.5, "1": 0.5}, 2, 0.25 + 0.5 * 0.5),  # a 1-1 tie earns half
        ({"7": 0.2, "1": 0.3, INVALID: 0.5}, 1, 0.2),  # one vote: p(label)
        ({INVALID: 1.0}, 4, 0.0),
    ],
)
def test_majority_vote_by_hand(dist, n, expected):
    """Guards maj@N: invalid never wins, ties are shared, one vote = expected accuracy."""
    assert M.majority_vote_accuracy([dist], ["7"], n) == pytest.approx(expected)


def _brute_majority(dist: dict[str, float], label: str, n: int) -> float:
    total = 0.0
    for seq in itertools.product(list(dist), repeat=n):
        p = math.prod(dist[a] for a in seq)
        counts = Counter(a for a in seq if a != INVALID)
        if counts:
            top = max(counts.values())
            winners = [a for a, c in counts.items() if c == top]
            total += p * (label in winners) / len(winners)
    return total


def test_majority_vote_matches_enumeration():
    """The dynamic programme equals summing over every sequence of votes."""
    rng = random.Random(0)
    dists, labels, want = [], [], []
    for _ in range(6):
        keys = ["1", "2", "3", INVALID][: rng.randint(2, 4)]
        w = [rng.random() for _ in keys]
        dists.append({k: x / sum(w) for k, x in zip(keys, w, strict=True)})
        labels.append(rng.choice(["1", "2"]))
    for n in (1, 2, 5):
        want = [_brute_majority(d, y, n) for d, y in zip(dists, labels, strict=True)]
        got = M.majority_vote_probs(dists, labels, n)
        assert got.tolist() == pytest.approx(want, abs=1e-12)


def test_per_answer_accuracy_and_marginals():
    """Guards the vanishing-answer view: a gold answer the model never gives scores 0."""
    answers = ["A", "A", "C", "A", INVALID]
    gold = ["A", "B", "C", "B", "A"]
    per = M.per_answer_accuracy(answers, gold)
    assert per["A"] == {"n": 2, "accuracy": 0.5, "given": 0.6}
    assert per["B"] == {"n": 2, "accuracy": 0.0, "given": 0.0}
    assert per["C"] == {"n": 1, "accuracy": 1.0, "given": 0.2}
    assert M.marginal(answers) == {"A": 0.6, "C": 0.2, INVALID: 0.2}
    assert M.mean_distribution([{"7": 1.0}, {"7": 0.5, "1": 0.5}]) == {"7": 0.75, "1": 0.25}


# ---------------------------------------------------------------------------------------
# Guard replay
# ---------------------------------------------------------------------------------------


def _answers(xs):
    return [{"image_id": str(i), "response": a, "answer": a} for i, a in enumerate(xs)]


def test_replay_rolls_back_to_the_last_clearly_healthy_round_on_trip():
    """A trip at round 3 ends on the last clearly healthy round (round 1 was within bounds
    but near them, round 2 back at the base), as the engine's `decide` says."""
    from types import SimpleNamespace

    from bench.benchmark import replay_guard
    from ttrv.config import TaskConfig

    items = [SimpleNamespace(image_id=str(i)) for i in range(4)]

    task = TaskConfig()  # open question: no option positions
    before = _answers(["1", "2", "3", "4"])
    rounds = [
        {"answers": _answers(["1", "2", "3", "3"])},  # diversity down a little: score < 1
        {"answers": _answers(["1", "2", "3", "4"])},  # back to the base: score 1, best
        {"answers": _answers(["4", "4", "4", "4"])},  # collapse: trips
    ]
    # round 1's 25% entropy drop and 1 of 4 changed answers are tolerated here
    loose = {"max_marginal_entropy_drop": 0.35, "max_changed_answers": 0.3}
    out = replay_guard(task, items, before, rounds, {"guard": False, **loose})
    assert (out["round"], out["status"], out["tripped_at"]) == (2, "guard_stopped", 3)
    assert "single answer" in out["reason"]
    calm = replay_guard(task, items, before, rounds[:2], loose)
    assert (calm["round"], calm["status"]) == (2, "done")
    # the engine default (max_changed_answers 0.05) trips on round 1's changed answer
    strict = replay_guard(task, items, before, rounds, {"max_marginal_entropy_drop": 0.35})
    assert (strict["round"], strict["tripped_at"]) == (0, 1)
    assert "25% of the images" in strict["reason"]


def test_report_replays_the_current_engine_guard_on_stored_runs():
    """Guards `--report`: a stored run's engine-guard outcome is re-decided from its stored
    per-round answers with the current guard, fields the run predates taking the current
    defaults (here max_changed_answers), the run's own settings kept."""
    from bench.benchmark import replay_engine_guard
    from ttrv.config import AdaptConfig, TaskConfig
    from ttrv.digits import MC_QUESTION

    task = TaskConfig(kind="multiple_choice", question=MC_QUESTION)
    cfg = AdaptConfig(task=task).to_dict()
    old_guard = {k: v for k, v in cfg["guard"].items() if k != "max_changed_answers"}
    old_guard["max_marginal_entropy_drop"] = 0.5  # the run's own setting: replaced
    swapped = ["4", "3", "2", "1"]  # every answer moves, the answer marginal does not
    record = {
        "model": "base", "variant": "default", "seed": 0, "images": 4, "split": "val",
        "setting": "main", "config": {**cfg, "guard": old_guard},
        "adapted_positions": [0, 1, 2, 3], "before": ["1", "2", "3", "4"],
        "rounds": [{"answers": swapped}],
        "unguarded": {"round": 1, "metrics": {"final": True}},
        "guarded": {"round": 1, "status": "done", "reason": "", "tripped_at": None},
        "trajectory": {"0": {"round0": True}, "1": {"final": True}},
    }  # fmt: skip
    (new,) = replay_engine_guard([record])
    assert new["guarded"]["status"] == "guard_stopped" and new["guarded"]["round"] == 0
    assert "100% of the images" in new["guarded"]["reason"]
    assert new["config"]["guard"]["max_changed_answers"] == pytest.approx(0.05)
    assert new["config"]["guard"]["max_marginal_entropy_drop"] == pytest.approx(0.05)
    assert record["guarded"]["status"] == "done"  # the input is not modified


# ---------------------------------------------------------------------------------------
# Fast path against the generate path (bundled models)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled():
    from ttrv.config import ModelConfig
    from ttrv.loading import load_model

    return {
        k: load_model(ModelConfig(model=str(p), device="cpu"))
        for k, p in (("base", BASE), ("offformat", OFFFORMAT))
    }


def _mc():
    from ttrv.config import RolloutConfig, TaskConfig
    from ttrv.digits import MC_QUESTION

    return TaskConfig(kind="multiple_choice", question=MC_QUESTION), RolloutConfig()


@needs_models
@pytest.mark.parametrize("which", ["base", "offformat"])
def test_fastpath_greedy_and_sampling_agree_with_generate(bundled, which):
    """Guards the benchmark's evaluator: its greedy answers are those of `greedy_answers`
    and its answer distribution matches the frequencies of `rollout_group` samples."""
    from bench.fastpath import FirstTokenEvaluator
    from ttrv.adapt import make_policy
    from ttrv.digits import digit_items
    from ttrv.rollout import greedy_answers, rollout_group

    task, rollout = _mc()
    items = digit_items("val", "multiple_choice", seed=3, limit=12)
    policy = make_policy(bundled[which])
    ev = FirstTokenEvaluator(policy, items, task, rollout).evaluate()
    assert ev.greedy == [a["answer"] for a in greedy_answers(policy, items, task, rollout)]
    assert ev.leak < 0.02
    n = 96
    torch.manual_seed(0)
    sampled = [
        rollout_group(policy, it, task, replace(rollout, n_rollouts=n, n_train=1), [None])
        for it in items
    ]
    for dist, group in zip(ev.dists, sampled, strict=True):
        freq = Counter(group.answers)
        for answer in set(dist) | set(freq):
            p = dist.get(answer, 0.0)
            sd = math.sqrt(max(p * (1 - p), 1e-4) / n)
            assert abs(freq[answer] / n - p) < 4.5 * sd + 1e-9, (answer, p, freq)
    labels = [it.label for it in items]
    emp = [{a: c / n for a, c in Counter(g.answers).items()} for g in sampled]
    assert M.expected_accuracy(ev.dists, labels) == pytest.approx(
        M.expected_accuracy(emp, labels), abs=0.05
    )


@needs_models
def test_guard_replay_matches_real_guarded_adapt(bundled):
    """Guards the replay the benchmark relies on: a guard-off run replayed with the guard
    ends on the same status and adapter weights as `adapt` with the guard on."""
    from bench.benchmark import RoundRecorder, replay_guard
    from ttrv.adapt import adapt
    from ttrv.config import AdaptConfig, GuardConfig, OptimConfig, RolloutConfig
    from ttrv.digits import digit_items
    from ttrv.lora import adapter_state, attach_lora

    task, _ = _mc()
    items = [
        replace(it, label=None) for it in digit_items("val", "multiple_choice", seed=1, limit=8)
    ]
    guard = GuardConfig(max_marginal_entropy_drop=0.05)  # tight: trips on this run
    cfg = AdaptConfig(
        task=task,
        rollout=RolloutConfig(n_rollouts=4, n_train=4),
        optim=OptimConfig(learning_rate=0.02, rounds=3, images_per_step=4, seed=0),
        guard=guard,
    )
    runs = {}
    for on in (True, False):
        model = attach_lora(copy.deepcopy(bundled["base"].model), cfg.lora, seed=0)
        init = adapter_state(model)
        rec = RoundRecorder(model)
        c = replace(cfg, guard=replace(guard, guard=on))
        result = adapt(replace(bundled["base"], model=model), items, c, sink=rec)
        runs[on] = (result, rec, adapter_state(model))
    real, _, real_weights = runs[True]
    _, rec, _ = runs[False]
    replayed = replay_guard(task, items, rec.before, rec.rounds, vars(guard), votes=rec.votes)
    assert real.status == replayed["status"] == "guard_stopped"
    assert real.reason.startswith(replayed["reason"])
    r = replayed["round"]
    want = rec.rounds[r - 1]["weights"] if r else init
    assert real_weights.keys() == want.keys()
    assert all(torch.equal(real_weights[k], want[k]) for k in want)


# ---------------------------------------------------------------------------------------
# Dry end-to-end run on a tiny model
# ---------------------------------------------------------------------------------------


def test_dry_run_writes_tables(tiny_model_dir, tmp_path):
    """The CLI runs end to end (baseline, adapted variants, guard replay, JSON + markdown)."""
    from bench.benchmark import main

    folder = tiny_model_dir("llava")
    out = tmp_path / "dry"
    rc = main(
        [
            "--dry",
            "--model",
            f"base={folder}",
            "--models",
            "base",
            "--workers",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads(out.with_suffix(".json").read_text())
    variants = {r["variant"] for r in data["runs"]}
    assert variants == {"none", "default", "ttrv_paper"}
    run = next(r for r in data["runs"] if r["variant"] == "default")
    assert run["unguarded"]["metrics"]["all"]["n"] == 16
    assert run["unguarded"]["metrics"]["heldout"]["n"] == 12
    # the baseline's held-out images are the run's: a paired held-out delta
    base = next(r for r in data["runs"] if r["variant"] == "none")["baseline"]
    assert base["heldout"]["n"] == 12 and base["adapted"]["n"] == 4
    assert "| default |" in out.with_suffix(".md").read_text()


def test_variant_subset_always_includes_the_baseline():
    """Guards: a --variants list without `none` ran, then failed at report time (no paired
    baseline for any delta)."""
    from bench.benchmark import parse_args

    assert parse_args(["--variants", "default,majority"]).variants == [
        "none",
        "default",
        "majority",
    ]
    assert parse_args(["--variants", "none,default"]).variants == ["none", "default"]
