"""Persistence overhead: time spent writing events to the SQLite store, as a share of step time.

    python -m bench.store_overhead [--model PATH] [--images 8] [--rounds 2]

Runs one adaptation with the store's sink wrapped in a timer and prints, per event kind,
the write time, and the share of all store writes in the total step time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: bundled)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n-rollouts", type=int, default=16)
    args = parser.parse_args(argv)

    import torch

    from sessions import Store
    from ttrv.adapt import adapt
    from ttrv.config import AdaptConfig, ModelConfig, OptimConfig, RolloutConfig
    from ttrv.digits import digit_items
    from ttrv.loading import load_model
    from ttrv.lora import attach_lora

    torch.set_num_threads(1)
    cfg = AdaptConfig(
        model=ModelConfig(**({"model": args.model} if args.model else {})),
        rollout=RolloutConfig(n_rollouts=args.n_rollouts, n_train=args.n_rollouts),
        optim=OptimConfig(rounds=args.rounds, skip_converged=False),
    )
    items = digit_items("test", cfg.task.kind, seed=0)[: args.images]
    loaded = load_model(cfg.model)
    loaded.model = attach_lora(loaded.model, cfg.lora, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "data")
        sid = store.create_session("overhead", cfg.to_dict(), cfg.model.model, cfg.task.kind)
        store.add_images(sid, items)
        inner = store.sink(sid)
        spent: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        step_seconds: list[float] = []

        def sink(kind: str, data: dict) -> None:
            t0 = time.perf_counter()
            inner(kind, data)
            spent[kind] += time.perf_counter() - t0
            counts[kind] += 1
            if kind == "step":
                step_seconds.append(data["seconds"])

        t0 = time.perf_counter()
        adapt(loaded, items, cfg, sink, output_dir=Path(tmp) / "out")
        total = time.perf_counter() - t0
    per_step_writes = spent["step"] + spent["rollouts"]
    print(
        f"model {cfg.model.model}: {len(step_seconds)} steps, {args.images} images, "
        f"N={args.n_rollouts}, total {total:.1f}s"
    )
    for kind in sorted(spent):
        print(
            f"  {kind:10s} {counts[kind]:4d} writes  {spent[kind] * 1000 / counts[kind]:7.2f} ms each"
        )
    share = per_step_writes / (sum(step_seconds) + per_step_writes)
    print(
        f"step + rollouts writes: {per_step_writes * 1000 / max(1, len(step_seconds)):.2f} ms "
        f"per step = {share:.1%} of step time "
        f"(mean step {sum(step_seconds) / max(1, len(step_seconds)) * 1000:.0f} ms)"
    )
    print(
        f"all store writes: {sum(spent.values()):.2f}s = {sum(spent.values()) / total:.1%} of "
        "the whole run"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
