"""Where a GPU step of this engine goes: rollouts vs the GRPO update, keyed sampling on and
off, and the top operators (torch.profiler, CPU + CUDA).

    python -m bench.gpu_profile --model xl --steps 4      # on a CUDA machine, ~1-2 min

`--model xl` builds the ~0.46 B LLaVA of scripts/gpu_check.sh; `large` and `bundled` are
bench.speed's. Phases are timed around `rollout_groups` and `grpo_update` inside
`ttrv.adapt.run_step`, with a device synchronise on each side. "keyed off" calls
`rollout_groups` without its `stream`, i.e. generate's own sampling from the global
generator (what the engine did before keyed sampling).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

XL = dict(text_hidden=1536, text_layers=16, text_heads=12, text_kv_heads=4, text_mlp=4096,
          vocab=32000)  # fmt: skip


def spec_for(model: str, steps: int, device: str) -> Any:
    from bench import speed

    if model == "xl":
        folder = speed.build_llava(
            speed.bundled_model_dir()[0], speed.MODEL_DIR / "llava-xl", **{**speed.LARGE, **XL}
        )
        return speed.Spec(model_dir=str(folder), label="xl", restrict_answers=True,
                          steps=steps, device=device, dtype="bfloat16")  # fmt: skip
    (label, folder, restrict), *_ = speed.resolve_models(model)
    return speed.Spec(model_dir=str(folder), label=label, restrict_answers=restrict,
                      steps=steps, device=device, dtype="bfloat16")  # fmt: skip


def timed_phases(keyed: bool) -> tuple[dict[str, list[float]], Any]:
    """Patch ttrv.adapt's rollout and update calls with synchronised timers."""
    import torch

    import ttrv.adapt as A

    times: dict[str, list[float]] = {"rollouts": [], "update": []}
    real_roll, real_update = A.rollout_groups, A.grpo_update

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def roll(*args: Any, **kwargs: Any) -> Any:
        if not keyed:
            kwargs.pop("stream", None)
        sync()
        t0 = time.perf_counter()
        out = real_roll(*args, **kwargs)
        sync()
        times["rollouts"].append(time.perf_counter() - t0)
        return out

    def update(*args: Any, **kwargs: Any) -> Any:
        sync()
        t0 = time.perf_counter()
        out = real_update(*args, **kwargs)
        sync()
        times["update"].append(time.perf_counter() - t0)
        return out

    A.rollout_groups, A.grpo_update = roll, update

    def restore() -> None:
        A.rollout_groups, A.grpo_update = real_roll, real_update

    return times, restore


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--model", default="xl", help="xl | large | bundled")
    ap.add_argument("--steps", type=int, default=4, help="steps per run (the first is warm-up)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)

    import torch

    from bench import speed

    spec = spec_for(args.model, args.steps, args.device)
    for keyed in (True, False):
        times, restore = timed_phases(keyed)
        t0 = time.perf_counter()
        out = speed.run_ours(spec)
        restore()
        steps = out["step_wall"][1:]
        print(
            f"{spec.label} keyed {'on ' if keyed else 'off'}: step "
            f"{statistics.median(steps):.3f} s, rollouts "
            f"{statistics.median(times['rollouts'][1:]):.3f} s, update "
            f"{statistics.median(times['update'][1:]):.3f} s (medians of {len(steps)} steps; "
            f"run {time.perf_counter() - t0:.0f} s)",
            flush=True,
        )

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    prof_box: dict[str, Any] = {}

    def hook(done: int) -> None:  # profile the second step (the first warms up)
        if done == 1:
            prof_box["p"] = profile(activities=activities)
            prof_box["p"].__enter__()
        elif done == 2:
            prof_box["p"].__exit__(None, None, None)

    speed.run_ours(speed.dataclasses.replace(spec, steps=2), step_hook=hook)
    table = prof_box["p"].key_averages()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(table.table(sort_by=key, row_limit=args.top))
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
