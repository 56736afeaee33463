"""What each engine asks of the host per step: operators, host-device syncs, time outside them.

    python -m bench.host_ops                                  # bundled model, 4 images x N = 8
    python -m bench.host_ops --images-per-step 1 --n 8        # the one-image setting
    python -m bench.host_ops --model large --engine ours trl --json bench/results/x.json

On a GPU a small or medium model is bound by the host: every operator is a kernel launch
the CPU must issue, and every host-device sync (`.item()`, `.cpu()`, `.tolist()`, a
tensor's truth value...) stalls that issuing until the GPU catches up. Both counts are
properties of the code, not of the machine, so they can be measured on this CPU: the same
work as `bench.speed` (same Spec, the same model, images, settings and TRL configuration),
each engine in its own subprocess, `--steps` steps of which the first `--warmup` are not
counted. Over the counted steps:

- **operators**: `torch.profiler.profile(activities=[CPU])` events named `aten::*`, all of
  them ("aten events", nested ones included) and the leaves that would launch a kernel on a
  GPU ("compute ops": every event outside `NO_KERNEL` (views, allocation, metadata) that
  calls no other such event, so aten::linear counts once, as its aten::addmm). Per step.
- **syncs**: Python calls of `Tensor.item/.tolist/.cpu/.numpy` and of `bool/float/int()` on
  a tensor (the methods are wrapped with counters for the counted steps), and the profiler's
  `aten::_local_scalar_dense` (the scalar read behind item/float/bool) and data-dependent
  shapes (`aten::nonzero`, `aten::masked_select`), which also wait for the device on a GPU.
  On this CPU none of these waits; `.cpu()` of a tensor that would already live on the host
  on a GPU (processor output) is counted as well, so the count is an upper bound.
- **time**: step CPU seconds without the profiler (a separate pass over the same steps),
  the seconds inside top-level `aten` events under the profiler, and the rest ("outside
  operators": Python, the dispatcher above aten, data handling), which is what a GPU would
  not speed up. Under the profiler every event costs extra, so the profiled times are
  larger than the unprofiled step.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.speed import ROOT, Spec, specs_from_args

# Leaf aten events that launch no kernel on a GPU (views, allocation, metadata).
NO_KERNEL = frozenset(
    "aten::" + n
    for n in [
        "empty",
        "empty_strided",
        "empty_like",
        "view",
        "_unsafe_view",
        "as_strided",
        "reshape",
        "_reshape_alias",
        "expand",
        "expand_as",
        "slice",
        "select",
        "transpose",
        "t",
        "permute",
        "unsqueeze",
        "squeeze",
        "detach",
        "alias",
        "lift_fresh",
        "lift_fresh_copy",
        "resolve_conj",
        "resolve_neg",
        "unbind",
        "split",
        "split_with_sizes",
        "chunk",
        "narrow",
        "flatten",
        "unflatten",
        "view_as",
        "contiguous",
        "to",
        "_to_copy_noop",
        "size",
        "stride",
        "numel",
        "dim",
        "is_nonzero",
        "result_type",
        "set_",
        "_has_compatible_shallow_copy_type",
        "requires_grad_",
        "retain_grad",
        "_local_scalar_dense",
        "item",
        "is_same_size",
        "output_nr",
        "_version",
        "broadcast_tensors",
        "movedim",
        "diagonal",
        "unfold",
        "resize_",
        "as_strided_",
        "_nested_tensor_from_mask",
    ]
)
SYNC_EVENTS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select")
COUNTED_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


class SyncCounter:
    """Counts calls of the tensor methods that read device memory on the host."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self._saved: dict[str, Any] = {}

    def start(self) -> None:
        import torch

        for name in COUNTED_METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def wrapper(self_, *args: Any, _n: str = name, _f: Any = original, **kw: Any) -> Any:
                self.calls[_n] += 1
                return _f(self_, *args, **kw)

            setattr(torch.Tensor, name, wrapper)

    def stop(self) -> None:
        import torch

        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()


def count_events(events: Any) -> dict[str, Any]:
    """Operator counts and the seconds inside top-level operators, from profiler events."""
    aten = [e for e in events if e.name.startswith("aten::")]
    compute = [e for e in aten if e.name not in NO_KERNEL and not _kernel_below(e)]
    top = [e for e in aten if not _has_aten_parent(e)]
    by_name = collections.Counter(e.name for e in compute)
    return {
        "aten_events": len(aten),
        "compute_ops": len(compute),
        "sync_events": {n: sum(1 for e in aten if e.name == n) for n in SYNC_EVENTS},
        "op_seconds": sum(e.cpu_time_total for e in top) / 1e6,  # microseconds
        "top_compute_ops": by_name.most_common(15),
    }


def _kernel_below(event: Any) -> bool:
    """Does an operator called inside `event` launch a kernel? (Then `event` is a wrapper,
    e.g. aten::linear over aten::addmm, and is not counted itself.)"""
    return any(
        c.name.startswith("aten::") and (c.name not in NO_KERNEL or _kernel_below(c))
        for c in event.cpu_children
    )


def _has_aten_parent(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


class Recorder:
    """The step hook: profiles (and counts syncs over) steps warmup..steps."""

    def __init__(self, warmup: int, steps: int, profile: bool) -> None:
        self.warmup, self.steps, self.profile = warmup, steps, profile
        self.syncs = SyncCounter()
        self.prof: Any = None
        self.t0 = (0.0, 0.0)
        self.result: dict[str, Any] = {}

    def __call__(self, done: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        if done == self.warmup:
            if self.profile:
                self.prof = profile(activities=[ProfilerActivity.CPU])
                self.prof.start()
                self.syncs.start()
            self.t0 = (time.perf_counter(), time.process_time())
        elif done == self.steps:
            wall, cpu = time.perf_counter() - self.t0[0], time.process_time() - self.t0[1]
            counted = self.steps - self.warmup
            self.result = {"steps": counted, "wall_s": wall / counted, "cpu_s": cpu / counted}
            if self.profile:
                self.syncs.stop()
                self.prof.stop()
                ev = count_events(self.prof.events())
                per_step = {
                    "aten_events": ev["aten_events"] / counted,
                    "compute_ops": ev["compute_ops"] / counted,
                    "sync_calls": {k: v / counted for k, v in sorted(self.syncs.calls.items())},
                    "sync_calls_total": sum(self.syncs.calls.values()) / counted,
                    "sync_events": {k: v / counted for k, v in ev["sync_events"].items()},
                    "op_s": ev["op_seconds"] / counted,
                    "outside_ops_s": (wall - ev["op_seconds"]) / counted,
                    "top_compute_ops": [(n, c / counted) for n, c in ev["top_compute_ops"]],
                }
                self.result = {**self.result, "profiled": per_step}


def worker(engine: str, spec: Spec, profile: bool) -> dict[str, Any]:
    """One engine's counts (`profile`) or plain timing (not profile) over the same steps."""
    rec = Recorder(spec.warmup, spec.steps, profile)
    if engine in ("ours", "ours-all"):
        from bench.speed import keep_zero_advantage_rows, run_ours

        if engine == "ours-all":
            from unittest.mock import patch

            with patch("ttrv.grpo._trained_rows", keep_zero_advantage_rows):
                out = run_ours(spec, step_hook=rec)
        else:
            out = run_ours(spec, step_hook=rec)
    else:
        from bench.trl_compare import run_trl

        out = run_trl(spec, step_hook=rec)
    counted = out["tokens"][spec.warmup :]
    return {
        "engine": engine,
        "params": out["params"],
        "tokens_per_step": sum(counted) / max(1, len(counted)),
        "groups_skipped": sum(out["groups_skipped"][spec.warmup :]),
        **rec.result,
    }


def run_worker(engine: str, spec: Spec, profile: bool, timeout: float = 1800) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(spec.to_json())
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        cmd = [sys.executable, "-m", "bench.host_ops", "--worker", engine, "--spec", str(spec_path)]
        cmd += ["--result", str(out_path)] + (["--profile"] if profile else [])
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{engine} worker failed:\n{proc.stderr[-4000:]}")
        return json.loads(out_path.read_text())


def print_rows(label: str, spec: Spec, rows: list[dict[str, Any]]) -> None:
    print(
        f"\n== {label}: {rows[0]['params'] / 1e6:.2f} M params, {spec.images_per_step} image(s) "
        f"x N={spec.n} per step, max {spec.max_new_tokens} new tokens, "
        f"{spec.steps - spec.warmup} counted steps after {spec.warmup} warm-up; per step:"
    )
    head = (
        f"{'engine':<9}{'aten events':>12}{'compute ops':>12}{'sync calls':>11}"
        f"{'scalar reads':>13}{'nonzero':>8}{'cpu s':>8}{'op s*':>8}{'outside s*':>11}"
        f"{'tok':>6}{'skipped':>8}"
    )
    print(head)
    for r in rows:
        p = r["profiled"]
        print(
            f"{r['engine']:<9}{p['aten_events']:>12.0f}{p['compute_ops']:>12.0f}"
            f"{p['sync_calls_total']:>11.1f}{p['sync_events']['aten::_local_scalar_dense']:>13.1f}"
            f"{p['sync_events']['aten::nonzero'] + p['sync_events']['aten::masked_select']:>8.1f}"
            f"{r['plain']['cpu_s']:>8.3f}{p['op_s']:>8.3f}{p['outside_ops_s']:>11.3f}"
            f"{r['tokens_per_step']:>6.1f}{r['groups_skipped']:>8}"
        )
    for r in rows:
        p = r["profiled"]
        calls = ", ".join(f"{k} {v:.1f}" for k, v in p["sync_calls"].items())
        print(f"  {r['engine']} sync calls: {calls or 'none'}")
        ops = ", ".join(f"{n[6:]} {c:.0f}" for n, c in p["top_compute_ops"][:8])
        print(f"  {r['engine']} most frequent compute ops: {ops}")
    trl = next((r for r in rows if r["engine"] == "trl"), None)
    for r in rows:
        if trl is not None and r is not trl:
            a, b = r["profiled"], trl["profiled"]
            print(
                f"{r['engine']} / TRL: compute ops {a['compute_ops'] / b['compute_ops']:.2f}, "
                f"aten events {a['aten_events'] / b['aten_events']:.2f}, sync calls "
                f"{a['sync_calls_total'] / max(b['sync_calls_total'], 1e-9):.2f}; "
                f"TRL / {r['engine']} CPU s per step {trl['plain']['cpu_s'] / r['plain']['cpu_s']:.2f}x"
            )
    print("* under the profiler (adds per-event overhead); cpu s: an unprofiled run")


# ---- real architectures at real sizes (bench/configs/*.json) ------------------------------

CONFIGS = ROOT / "bench" / "configs"


def real_config(path: Path, layers: int | None = None) -> Any:
    """The config in `path` (transcribed from a published checkpoint), optionally cut to
    `layers` text and vision layers (widths, heads and vocabulary as published)."""
    from transformers import AutoConfig

    d = json.loads(path.read_text())
    d.pop("_source", None)
    if layers is not None:
        d["text_config"]["num_hidden_layers"] = layers
        vision = d["vision_config"]
        if "depth" in vision:  # Qwen2.5-VL
            vision["depth"] = layers
            vision["fullatt_block_indexes"] = [layers - 1]
        else:
            vision["num_hidden_layers"] = layers
    return AutoConfig.for_model(d.pop("model_type"), **d)


def parameter_counts(config: Any) -> dict[str, int]:
    """Total, language-model and vision-side parameters, built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    text = sum(
        p.numel()
        for n, p in model.named_parameters()
        if any(k in n for k in ("language_model", "text_model", "lm_head"))
    )
    return {"total": total, "language_model": text, "vision_and_projector": total - text}


def text_forward_ops(config: Any, prompt: int = 32, repeats: int = 3) -> dict[str, float]:
    """Operators and CPU seconds of one text-only forward of `prompt` tokens (random weights,
    float32, one torch thread): the same per-layer operators a rollout or training forward
    issues for every generated token or micro-batch."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (1, prompt))
    with torch.no_grad():
        model(input_ids=ids, logits_to_keep=1)  # warm-up
        t0 = time.process_time()
        for _ in range(repeats):
            model(input_ids=ids, logits_to_keep=1)
        cpu = (time.process_time() - t0) / repeats
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(input_ids=ids, logits_to_keep=1)
    ev = count_events(prof.events())
    return {"aten_events": ev["aten_events"], "compute_ops": ev["compute_ops"], "cpu_s": cpu}


def real_sizes(layers: int = 2) -> list[dict[str, Any]]:
    """Per config: parameters at the published size, and the operators of a text forward at
    1 and `layers` layers, extrapolated to the published depth (operators grow linearly
    with layers: every layer issues the same ones)."""
    import torch

    torch.set_num_threads(1)
    out = []
    for path in sorted(CONFIGS.glob("*.json")):
        full = real_config(path)
        depth = full.text_config.num_hidden_layers
        one = text_forward_ops(real_config(path, 1))
        cut = text_forward_ops(real_config(path, layers))
        per_layer = (cut["compute_ops"] - one["compute_ops"]) / (layers - 1)
        out.append(
            {
                "config": path.name,
                "source": json.loads(path.read_text())["_source"],
                "class": full.architectures[0],
                "params": parameter_counts(full),
                "text_layers": depth,
                "reduced_layers": layers,
                "reduced_params": parameter_counts(real_config(path, layers))["total"],
                "forward_1_layer": one,
                f"forward_{layers}_layers": cut,
                "compute_ops_per_layer": per_layer,
                "compute_ops_full_depth": one["compute_ops"] + per_layer * (depth - 1),
            }
        )
        r = out[-1]
        print(
            f"{path.name:<20} {r['class']:<36} {r['params']['total'] / 1e9:6.3f} B "
            f"(LM {r['params']['language_model'] / 1e9:.3f}, vision+proj "
            f"{r['params']['vision_and_projector'] / 1e9:.3f}); {layers}-layer cut "
            f"{r['reduced_params'] / 1e6:.0f} M: text forward (32 tokens) "
            f"{cut['compute_ops']} ops, {cut['cpu_s']:.3f} CPU s; {per_layer:.0f} ops/layer, "
            f"~{r['compute_ops_full_depth']:.0f} ops at {depth} layers"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.host_ops", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="bundled", help="as bench.speed --model")
    p.add_argument(
        "--engine", nargs="+", default=["ours", "trl"], choices=["ours", "ours-all", "trl"]
    )
    p.add_argument("--steps", type=int, default=4, help="steps per run, warm-up included")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--images-per-step", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument(
        "--real-sizes",
        action="store_true",
        help="parameters of bench/configs/*.json and operators of a cut-down text forward",
    )
    p.add_argument("--trl-optim", default="adamw_torch_fused", help="TRL's optim setting")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", choices=["ours", "ours-all", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        spec = Spec(**json.loads(args.spec.read_text()))
        args.result.write_text(json.dumps(worker(args.worker, spec, args.profile)))
        return 0
    if args.real_sizes:
        results = real_sizes()
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))
        return 0
    results = []
    for spec in specs_from_args(args, steps=args.steps, trl_optim=args.trl_optim):
        label = spec.label
        rows = []
        for engine in args.engine:
            plain = run_worker(engine, spec, profile=False)
            counted = run_worker(engine, spec, profile=True)
            rows.append({**counted, "plain": {k: plain[k] for k in ("wall_s", "cpu_s")}})
        print_rows(label, spec, rows)
        results.append({"spec": dataclasses.asdict(spec), "rows": rows})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
