"""What each engine optimisation buys, and how a round scales (this engine only, no TRL).

    python -m bench.scaling --figure optimisations            # on/off, bundled model
    python -m bench.scaling --figure optimisations --model large --steps 3
    python -m bench.scaling --figure converged                # converged vs fresh round
    python -m bench.scaling --figure images --figure n        # s/round vs images, vs N
    python -m bench.scaling --figure memory                   # peak RSS vs model size
    python -m bench.scaling --quick                           # every figure, small (< 3 min)

Setup as in `bench.speed` (same `Spec`, images, prompt, TTRV reward with group scope, one
torch thread). Each optimisation is switched off for a run by configuration or, where the
engine has no switch, by patching one function for that run only (`unittest.mock.patch`):

- batching across images vs one prompt per call: `sample_many` (rollouts) and
  `batch_logprobs` (training) called once per prompt, i.e. one `generate` call and one
  training forward per image (with one option order), as the engine did before it batched.
- shared prompt prefix vs full sequences: `Policy.shared_prefix` off (each rollout row
  prefills its own copy of the prompt; each trained row carries its prompt).
- image features cached vs re-encoded: the policy's `ImageCache` disabled, as
  `make_policy(loaded, cache_images=False)` does (raw pixels cannot be stacked, so this
  also turns batching and the shared prefix off, as in the engine).
- zero-advantage groups skipped vs trained: `ttrv.grpo._trained_rows` keeping zero rows.
- no reference pass at beta 0 vs beta 0.001 (one disabled-adapter forward per micro-batch).
- `logits_to_keep` vs full logits: the model called with `logits_to_keep=0`, then sliced.
- converged images dropped (`OptimConfig.skip_converged`): figure "converged", via `adapt`.

Medians over `--repeats` runs (configurations interleaved), each the median step time after
one warm-up step. Wall and process-CPU seconds are both reported: the machine is shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from unittest.mock import patch

import torch

from bench.speed import (
    LARGE,
    MODEL_DIR,
    Spec,
    adapt_config,
    bench_items,
    build_llava,
    bundled_model_dir,
    keep_zero_advantage_rows,
    resolve_models,
    run_ours,
    run_worker,
    setup_torch,
    suppress_ids,
)
from ttrv.rollout import sample_many as _sample_many
from ttrv.scoring import batch_logprobs as _batch_logprobs

MEDIUM = {
    "text_hidden": 256,
    "text_layers": 4,
    "text_heads": 4,
    "text_kv_heads": 2,
    "text_mlp": 704,
    "vision_hidden": 128,
    "vision_layers": 2,
    "vision_heads": 4,
    "vision_mlp": 512,
}


# ---- switching the engine's optimisations off -------------------------------------------------


class _FullLogits:
    """A model proxy that computes logits for every position, then keeps what was asked."""

    def __init__(self, model: Any) -> None:
        self._model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        keep = kwargs.pop("logits_to_keep", 0)
        out = self._model(*args, logits_to_keep=0, **kwargs)
        if keep:
            out.logits = out.logits[:, -keep:]
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def full_logits(policy: Any, loaded: Any) -> Any:
    """The policy with a model that computes logits at every position (`_FullLogits`)."""
    return dataclasses.replace(policy, model=_FullLogits(policy.model))


def no_image_cache(policy: Any, loaded: Any) -> Any:
    """As `make_policy(loaded, cache_images=False)`: pixels re-encoded on every call (raw
    pixels are not stacked across images, and the shared prefix needs cached features)."""
    from ttrv.rollout import ImageCache

    return dataclasses.replace(
        policy, cache=ImageCache(loaded.model, enabled=False), shared_prefix=False
    )


def no_shared_prefix(policy: Any, loaded: Any) -> Any:
    return dataclasses.replace(policy, shared_prefix=False)


def per_prompt_sample_many(
    policy: Any, encoded: list[Any], counts: list[int], gen_kwargs: dict[str, Any]
) -> list[Any]:
    """`ttrv.rollout.sample_many` called once per prompt (one generate call each)."""
    return [
        _sample_many(policy, [e], [c], gen_kwargs)[0] if c else None
        for e, c in zip(encoded, counts, strict=True)
    ]


def per_prompt_logprobs(
    model: Any, encoded: list[Any], completions: list[list[Any]], *args: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ttrv.scoring.batch_logprobs` called once per prompt (one forward each), padded to
    one [R, T] result; the backward stays one per micro-batch."""
    parts = [
        _batch_logprobs(model, [e], [c], *args)
        for e, c in zip(encoded, completions, strict=True)
        if c
    ]
    t = max(p[0].shape[1] for p in parts)
    pad = lambda x: torch.nn.functional.pad(x, (0, t - x.shape[1]))  # noqa: E731
    return torch.cat([pad(p[0]) for p in parts]), torch.cat([pad(p[1]) for p in parts])


@dataclasses.dataclass
class Variant:
    name: str
    spec_changes: dict[str, Any] = dataclasses.field(default_factory=dict)
    patches: list[tuple[str, str, Any]] = dataclasses.field(default_factory=list)  # module, attr
    policy_hook: Callable[[Any, Any], Any] | None = None

    @contextmanager
    def applied(self) -> Iterator[None]:
        import importlib

        with ExitStack() as stack:
            for module, attr, value in self.patches:
                stack.enter_context(patch.object(importlib.import_module(module), attr, value))
            yield


VARIANTS = [
    Variant("engine as is"),
    Variant(
        "one prompt per call (no batching across images)",
        patches=[
            ("ttrv.rollout", "sample_many", per_prompt_sample_many),
            ("ttrv.grpo", "batch_logprobs", per_prompt_logprobs),
        ],
    ),
    Variant(
        "one prompt per call, zero-advantage groups trained",
        patches=[
            ("ttrv.rollout", "sample_many", per_prompt_sample_many),
            ("ttrv.grpo", "batch_logprobs", per_prompt_logprobs),
            ("ttrv.grpo", "_trained_rows", keep_zero_advantage_rows),
        ],
    ),
    Variant("no shared prompt prefix", policy_hook=no_shared_prefix),
    Variant("image features re-encoded", policy_hook=no_image_cache),
    Variant("reference pass (beta 0.001)", spec_changes={"beta": 0.001}),
    Variant("full logits (no logits_to_keep)", policy_hook=full_logits),
    Variant(
        "zero-advantage groups trained",
        patches=[("ttrv.grpo", "_trained_rows", keep_zero_advantage_rows)],
    ),
]
# Nucleus sampling this narrow keeps only the top token (greedy-equivalent): every group
# agrees, the case the zero-advantage skip and skip_converged are for.
AGREE = {"top_p": 0.01}
SKIP_VARIANTS = [
    Variant("all groups agree (top_p 0.01), skipped", spec_changes=AGREE),
    Variant(
        "all groups agree (top_p 0.01), trained",
        spec_changes=AGREE,
        patches=[("ttrv.grpo", "_trained_rows", keep_zero_advantage_rows)],
    ),
]


def run_variant(spec: Spec, variant: Variant) -> dict[str, Any]:
    with variant.applied():
        return run_ours(dataclasses.replace(spec, **variant.spec_changes), variant.policy_hook)


def median_step(run: dict[str, Any], warmup: int) -> tuple[float, float]:
    return statistics.median(run["step_wall"][warmup:]), statistics.median(run["step_cpu"][warmup:])


def figure_optimisations(
    spec: Spec, repeats: int, only: list[str] | None = None
) -> list[dict[str, Any]]:
    """Seconds per step with each optimisation switched off.

    `only`: name substrings to keep (the "engine as is" baseline always runs)."""
    variants = [
        v for v in VARIANTS if not only or v is VARIANTS[0] or any(o in v.name for o in only)
    ]
    if not only or any(o in v.name for o in only for v in SKIP_VARIANTS):
        variants += SKIP_VARIANTS
    runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            runs[v.name].append(run_variant(spec, v))
    rows = []
    for v in variants:
        steps = [median_step(r, spec.warmup) for r in runs[v.name]]
        rows.append(
            {
                "variant": v.name,
                "wall_s": statistics.median(s[0] for s in steps),
                "cpu_s": statistics.median(s[1] for s in steps),
                "tokens": statistics.mean(t for r in runs[v.name] for t in r["tokens"]),
                "groups_skipped": sum(sum(r["groups_skipped"]) for r in runs[v.name]),
                "groups": len(runs[v.name]) * spec.steps * spec.images_per_step,
            }
        )
    base = {r["variant"]: r for r in rows}
    print(
        f"\n== optimisations: {spec.label}, {spec.images_per_step} images x N={spec.n} per step, "
        f"{spec.steps} steps ({spec.warmup} warm-up) x {repeats} repeats, {spec.threads} thread"
    )
    print(
        f"{'variant':<52} {'wall s/step':>11} {'cpu s/step':>10} {'vs as is (cpu)':>14} "
        f"{'tok/step':>8} {'skipped':>9}"
    )
    for r in rows:
        ref = base["engine as is"] if "agree" not in r["variant"] else base[SKIP_VARIANTS[0].name]
        print(
            f"{r['variant']:<52} {r['wall_s']:>11.3f} {r['cpu_s']:>10.3f} "
            f"{r['cpu_s'] / ref['cpu_s']:>13.2f}x {r['tokens']:>8.1f} "
            f"{r['groups_skipped']:>4}/{r['groups']:<4}"
        )
    return rows


# ---- converged vs fresh rounds (through adapt) -----------------------------------------------


def round_times(spec: Spec, rounds: int, skip_converged: bool) -> dict[str, Any]:
    """Run `ttrv.adapt.adapt` and time each round: its steps and its greedy evaluation pass."""
    from ttrv import adapt as adapt_mod
    from ttrv.loading import load_model
    from ttrv.lora import attach_lora

    setup_torch(spec)
    cfg = adapt_config(spec)
    cfg.optim.rounds = rounds
    cfg.optim.skip_converged = skip_converged
    loaded = load_model(cfg.model)
    loaded.model = attach_lora(loaded.model, cfg.lora, seed=cfg.optim.seed)
    items = bench_items(spec.pool, spec.seed)
    passes: list[tuple[float, float]] = []  # (start, end) of each greedy pass
    original_greedy, original_policy = adapt_mod.greedy_answers, adapt_mod.make_policy

    def timed_greedy(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = original_greedy(*args, **kwargs)
        passes.append((start, time.perf_counter()))
        return out

    def restricted_policy(loaded_: Any, *args: Any, **kwargs: Any) -> Any:
        policy = original_policy(loaded_, *args, **kwargs)
        policy.suppress = suppress_ids(spec, loaded_.tokenizer, loaded_.model)
        return policy

    with (
        patch.object(adapt_mod, "greedy_answers", timed_greedy),
        patch.object(adapt_mod, "make_policy", restricted_policy),
    ):
        result = adapt_mod.adapt(loaded, items, cfg)
    # passes: before, one per completed round, after. Round r's steps run between the end of
    # pass r and the start of pass r + 1; pass r + 1 is that round's evaluation unless it is
    # the final one (the run ended early: every image converged).
    rounds_out = []
    for r in range(min(rounds, len(passes) - 1)):
        start, end = passes[r + 1]
        final = r + 1 == len(passes) - 1
        rounds_out.append(
            {"steps_s": start - passes[r][1], "eval_s": 0.0 if final else end - start}
        )
    steps_per_round = [sum(1 for h in result.history if h.round == r) for r in range(rounds)]
    skipped = [sum(h.groups_skipped for h in result.history if h.round == r) for r in range(rounds)]
    return {
        "reason": result.reason,
        "rounds": rounds_out,
        "steps_per_round": steps_per_round,
        "groups_skipped": skipped,
    }


def figure_converged(spec: Spec, repeats: int) -> list[dict[str, Any]]:
    """Second round of `adapt` over images that are fresh vs converged (all rollouts agree).

    An untrained model's multi-token answers rarely parse, and an invalid answer never counts
    as converged, so for those models every case answers in one token (a letter)."""
    if spec.restrict_answers:
        spec = dataclasses.replace(spec, max_new_tokens=1)
    cases = [
        ("fresh images (top_p 1)", {}, False),
        ("converged, skip_converged off", AGREE, False),
        ("converged, skip_converged on", AGREE, True),
    ]
    rows = []
    for name, changes, skip in cases:
        reps = [round_times(dataclasses.replace(spec, **changes), 2, skip) for _ in range(repeats)]
        second = [
            r["rounds"][1] if len(r["rounds"]) > 1 else {"steps_s": 0.0, "eval_s": 0.0}
            for r in reps
        ]
        rows.append(
            {
                "case": name,
                "steps_s": statistics.median(s["steps_s"] for s in second),
                "eval_s": statistics.median(s["eval_s"] for s in second),
                "steps": reps[0]["steps_per_round"][1],
                "groups_skipped": reps[0]["groups_skipped"][1],
                "reason": reps[0]["reason"],
            }
        )
    fresh = rows[0]["steps_s"] + rows[0]["eval_s"]
    print(
        f"\n== converged vs fresh: 2nd round of adapt over {spec.pool} images "
        f"({spec.images_per_step}/step, N={spec.n}, max {spec.max_new_tokens} new tokens), "
        f"{spec.label}, median of {repeats}"
    )
    print(
        f"{'case':<32} {'steps s':>8} {'eval s':>7} {'total':>7} {'vs fresh':>8} {'steps':>5} "
        f"{'skipped':>7}  run ended because"
    )
    for r in rows:
        total = r["steps_s"] + r["eval_s"]
        print(
            f"{r['case']:<32} {r['steps_s']:>8.2f} {r['eval_s']:>7.2f} {total:>7.2f} "
            f"{100 * total / fresh:>7.1f}% {r['steps']:>5} {r['groups_skipped']:>7}  {r['reason']}"
        )
    return rows


# ---- scaling with images, N, model size ------------------------------------------------------


def round_seconds(spec: Spec) -> tuple[float, float]:
    """(wall, cpu) seconds of one round over `spec.pool` images, after one warm-up step."""
    per_round = -(-spec.pool // spec.images_per_step)
    run = run_ours(dataclasses.replace(spec, steps=1 + per_round))
    return sum(run["step_wall"][1:]), sum(run["step_cpu"][1:])


def figure_sweep(spec: Spec, key: str, values: list[int], repeats: int) -> list[dict[str, Any]]:
    rows = []
    for value in values:
        changes: dict[str, Any] = {key: value}
        if key == "pool":
            changes["images_per_step"] = min(spec.images_per_step, value)
        reps = [round_seconds(dataclasses.replace(spec, **changes)) for _ in range(repeats)]
        rows.append(
            {
                key: value,
                "wall_s": statistics.median(r[0] for r in reps),
                "cpu_s": statistics.median(r[1] for r in reps),
            }
        )
    what = "images (pool)" if key == "pool" else "N"
    print(
        f"\n== seconds per round vs {what}: {spec.label}, "
        f"{'N=' + str(spec.n) if key == 'pool' else str(spec.pool) + ' images'}, "
        f"{spec.images_per_step} images/step, median of {repeats}"
    )
    print(f"{what:>14} {'wall s/round':>13} {'cpu s/round':>12} {'cpu s/image':>12}")
    for r in rows:
        images = r[key] if key == "pool" else spec.pool
        print(f"{r[key]:>14} {r['wall_s']:>13.3f} {r['cpu_s']:>12.3f} {r['cpu_s'] / images:>12.4f}")
    slope = loglog_slope([r[key] for r in rows], [r["cpu_s"] for r in rows])
    print(f"CPU s/round ~ {what}^{slope:.2f} (least-squares log-log slope; 1 = linear)")
    return rows


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) on log(x): the exponent b of y ~ a * x^b."""
    import math

    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    num = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True))
    return num / sum((a - mx) ** 2 for a in lx)


def figure_memory(spec: Spec, steps: int, engines: list[str]) -> list[dict[str, Any]]:
    """Peak RSS (subprocess per run) for the bundled, a medium and the large model."""
    base, _ = bundled_model_dir()
    models = [
        resolve_models("bundled")[0],
        ("medium", build_llava(base, MODEL_DIR / "llava-medium", **MEDIUM), True),
        ("large", build_llava(base, MODEL_DIR / "llava-large", **LARGE), True),
    ]
    rows = []
    for label, folder, restrict in models:
        s = dataclasses.replace(
            spec, model_dir=str(folder), label=label, restrict_answers=restrict, steps=steps
        )
        for engine in engines:
            r = run_worker(engine, s)
            rows.append(
                {
                    "model": label,
                    "engine": engine,
                    "params": r["params"],
                    "rss_loaded_mib": r["rss_loaded_mib"],
                    "peak_rss_mib": r["peak_rss_mib"],
                }
            )
    print(
        f"\n== peak memory vs model size: {spec.images_per_step} images x N={spec.n} per step, "
        f"{steps} steps, float32 CPU"
    )
    print(
        f"{'model':<12} {'params M':>8} {'engine':<8} {'RSS loaded MiB':>14} {'peak RSS MiB':>12} "
        f"{'rise':>6}"
    )
    for r in rows:
        print(
            f"{r['model']:<12} {r['params'] / 1e6:>8.2f} {r['engine']:<8} "
            f"{r['rss_loaded_mib']:>14.0f} {r['peak_rss_mib']:>12.0f} "
            f"{r['peak_rss_mib'] - r['rss_loaded_mib']:>6.0f}"
        )
    return rows


FIGURES = ["optimisations", "converged", "images", "n", "memory"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n")[0])
    p.add_argument("--figure", action="append", choices=FIGURES, help="repeatable; default all")
    p.add_argument(
        "--model", default="bundled", help="bundled | large | large-32k | a folder (not memory)"
    )
    p.add_argument("--steps", type=int, default=5, help="steps per run (optimisations)")
    p.add_argument("--variant", action="append", help="optimisations: name substring to run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--images-per-step", type=int, default=4)
    p.add_argument("--pool", type=int, default=8, help="images per round")
    p.add_argument("--memory-engines", nargs="+", default=["ours", "trl"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="small sizes, 1 repeat")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    figures = args.figure or FIGURES
    if args.quick:
        args.repeats, args.steps = 1, 3
    ((label, folder, restrict),) = resolve_models(args.model)
    spec = Spec(
        model_dir=str(folder),
        label=label,
        restrict_answers=restrict,
        n=args.n,
        images_per_step=args.images_per_step,
        pool=args.pool,
        steps=args.steps,
        threads=args.threads,
    )
    out: dict[str, Any] = {"spec": dataclasses.asdict(spec)}
    if "optimisations" in figures:
        out["optimisations"] = figure_optimisations(spec, args.repeats, args.variant)
    if "converged" in figures:
        out["converged"] = figure_converged(spec, args.repeats)
    if "images" in figures:
        values = [2, 4, 8] if args.quick else [2, 4, 8, 16, 32]
        out["images"] = figure_sweep(spec, "pool", values, args.repeats)
        out["images_exponent"] = loglog_slope(values, [r["cpu_s"] for r in out["images"]])
    if "n" in figures:
        values = [4, 8, 16] if args.quick else [4, 8, 16, 32]
        out["n"] = figure_sweep(spec, "n", values, args.repeats)
        out["n_exponent"] = loglog_slope(values, [r["cpu_s"] for r in out["n"]])
    if "memory" in figures:
        engines = ["ours"] if args.quick else args.memory_engines
        out["memory"] = figure_memory(spec, 2, engines)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
