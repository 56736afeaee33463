"""Running benchmark jobs: a `Worker` per process caches models, items, evaluators and
baselines and runs one job (adapt with the guard off, recording each round through a
`RoundRecorder`, then evaluate the final weights and wherever the replayed guard ends);
`run_jobs` runs many, in-process or on spawned worker processes.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from typing import Any

from bench.grid import VARIANTS, Job, adapt_positions, job_config, watch_positions
from bench.replay import play_reviews, replay_guard
from bench.summary import summarize


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
            cfg.task, unlabeled, recorder.before, recorder.rounds, asdict(cfg.guard),
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
