"""This engine vs TRL's GRPOTrainer on the same test-time adaptation, seconds per step.

    python -m bench.speed                     # bundled model and the larger config (~4-6 min)
    python -m bench.speed --quick             # bundled model only, 3 steps (~20 s)
    python -m bench.speed --model large --steps 8 --repeats 2
    python -m bench.speed --engine ours ours-all trl   # + ours training every group, like TRL
    python -m bench.speed --device cuda --dtype bfloat16 --quantization 4bit --model large

Needs `pip install -r requirements-bench.txt` (TRL); `--engine ours` runs without it.

The same work on both sides: the same model folder, images, prompt (the model's chat
template with the image, the paper's multiple-choice protocol on scikit-learn digits), N,
max new tokens, temperature, top-p, beta, learning rate (constant, AdamW, no weight decay),
gradient clip, PPO clip, LoRA (same regex targets, rank, alpha, dropout), steps and images
per step, with the same TTRV reward (`ttrv.rewards.make_reward`) and the same suppressed
tokens. Every TRL setting is written out in `bench.trl_compare.grpo_args`. Both sides train
on all N rollouts (K = N) with per-image ("group") advantage scope: TRL always centres
rewards per group, so our default batch scope cannot be reproduced there.

Not the same work in one respect: this engine skips the forward and backward pass of a
group whose advantages are all zero (every rollout agreed; it would add exactly zero
gradient), TRL computes them. The "skipped" column counts those groups; `--engine ours-all`
runs this engine with the skip off, the same work as TRL.

Each engine runs in a subprocess of its own (clean peak memory; TRL patches the model's
forward), one torch thread by default (`--threads`), the engines alternating when
`--repeats` > 1. Reported per engine: median wall seconds per step after `--warmup` steps
(median over repeats of each run's median), median process CPU seconds per step (less
sensitive to other load on a shared machine), peak RSS (`resource.getrusage`) and its rise
over the RSS after loading, or `torch.cuda.max_memory_allocated` on CUDA.

Models: `bundled` is models/ttrv-digits-llava (a tiny LLaVA built from config when that
folder does not exist yet); `large` is a LLaVA built here from config (text hidden 512,
8 layers; ~27 M parameters) with the bundled tokenizer and processor. Randomly initialised
models answer with random text, every rollout invalid, every advantage zero, and our engine
would skip every update; so for them both engines sample only the option letters and EOS
(the same suppress list on both sides), like an uncertain model that answers in format.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench" / "out"
MODEL_DIR = OUT_DIR / "models"

# The larger configuration: LLaVA, Llama text model + CLIP vision tower, bundled tokenizer.
LARGE = {
    "text_hidden": 512,
    "text_layers": 8,
    "text_heads": 8,
    "text_kv_heads": 4,
    "text_mlp": 1408,
    "vision_hidden": 256,
    "vision_layers": 4,
    "vision_heads": 4,
    "vision_mlp": 1024,
}
ANSWER_TOKENS = ("A", "B", "C", "D")


@dataclass
class Spec:
    """One benchmark run: everything both engines are configured from (JSON-able)."""

    model_dir: str
    label: str
    restrict_answers: bool = False  # sample only option letters + EOS (untrained models)
    n: int = 8  # N: rollouts per image, all trained (K = N)
    max_new_tokens: int = 8
    images_per_step: int = 4
    pool: int = 8  # distinct images, cycled through (pool / images_per_step steps a round)
    steps: int = 6
    warmup: int = 1
    learning_rate: float = 2e-4
    beta: float = 0.0
    temperature: float = 1.0
    top_p: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"
    quantization: str = "none"
    threads: int = 1
    trl_optim: str = "adamw_torch_fused"  # TRL's default with torch >= 2.8; ours is fused too

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


# ---- models ------------------------------------------------------------------------------


def tiny_llava_dir() -> Path:
    """A tiny LLaVA from tests/tiny_models.py (stand-in while the bundled model is absent)."""
    from tests.tiny_models import build_tiny_model

    folder = MODEL_DIR / "tiny-llava"
    if not (folder / "config.json").is_file():
        build_tiny_model("llava", folder)
    return folder


def bundled_model_dir() -> tuple[Path, bool]:
    """(folder, trained): the bundled model, or the tiny test LLaVA while it does not exist."""
    from ttrv.config import BUNDLED_MODEL

    bundled = Path(BUNDLED_MODEL)
    if (bundled / "config.json").is_file():
        return bundled, True
    return tiny_llava_dir(), False


def build_llava(base: Path, out: Path, seed: int = 0, **sizes: int) -> Path:
    """A randomly initialised LLaVA of `sizes` (see LARGE) with `base`'s tokenizer/processor.

    Deterministic; rebuilt only when the sizes or the base change (a marker file).
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    marker = json.dumps({"base": str(base), "seed": seed, **sizes}, sort_keys=True)
    if (out / "bench-built.json").is_file() and (out / "bench-built.json").read_text() == marker:
        return out
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.md"))
    config = AutoConfig.from_pretrained(base)
    text, vision = config.text_config, config.vision_config
    text.hidden_size = sizes["text_hidden"]
    text.num_hidden_layers = sizes["text_layers"]
    text.num_attention_heads = sizes["text_heads"]
    text.num_key_value_heads = sizes["text_kv_heads"]
    text.head_dim = sizes["text_hidden"] // sizes["text_heads"]
    text.intermediate_size = sizes["text_mlp"]
    vision.hidden_size = sizes["vision_hidden"]
    vision.num_hidden_layers = sizes["vision_layers"]
    vision.num_attention_heads = sizes["vision_heads"]
    vision.intermediate_size = sizes["vision_mlp"]
    if "vocab" in sizes:  # rows past the tokenizer are never sampled (see suppress_ids)
        text.vocab_size = sizes["vocab"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig.from_pretrained(base)
    model.save_pretrained(out)
    (out / "bench-built.json").write_text(marker)
    return out


def resolve_models(choice: str) -> list[tuple[str, Path, bool]]:
    """[(label, folder, restrict_answers)] for --model: bundled | large | both | large-32k (the
    large config with a 32,000-row vocabulary) | a model folder."""
    base, trained = bundled_model_dir()
    bundled = ("bundled" if trained else "tiny-llava", base, not trained)
    if choice == "bundled":
        return [bundled]
    large = ("large", build_llava(base, MODEL_DIR / "llava-large", **LARGE), True)
    if choice == "large":
        return [large]
    if choice == "large-32k":  # a real-sized vocabulary: what logits_to_keep is for
        sizes = dict(LARGE, vocab=32000)
        return [("large-32k", build_llava(base, MODEL_DIR / "llava-large-32k", **sizes), True)]
    if choice == "both":
        return [bundled, large]
    folder = Path(choice)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"--model {choice!r}: not bundled/large/both/large-32k nor a folder.")
    return [(folder.name, folder, False)]


# ---- the shared setup ----------------------------------------------------------------------


def task_config() -> Any:
    """The paper's multiple-choice protocol on digits (each image carries its 4 options).

    One option order per image: TRL's GRPOTrainer samples all N rollouts of a prompt from
    that one prompt, so the engine's default of several orders would be different work.
    """
    from ttrv.config import TaskConfig

    try:
        from ttrv.digits import MC_QUESTION
    except ImportError:  # digits module absent: random images with fixed options
        return TaskConfig(
            kind="multiple_choice", question="What is shown?", options="A,B,C,D", option_orders=1
        )
    return TaskConfig(kind="multiple_choice", question=MC_QUESTION, options="", option_orders=1)


def bench_items(n: int, seed: int = 0) -> list[Any]:
    """`n` test images: scikit-learn digits (multiple choice), or random noise without them."""
    try:
        from ttrv.digits import digit_items

        return digit_items("test", "multiple_choice", seed=seed, limit=n)
    except ImportError:
        import numpy as np
        from PIL import Image

        from ttrv.tasks import Item, image_sha256

        rng = np.random.default_rng(seed)
        items = []
        for i in range(n):
            image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
            items.append(Item(image_sha256(image), f"noise-{i}", image))
        return items


def adapt_config(spec: Spec) -> Any:
    """The AdaptConfig both engines are set up from (TRL through `grpo_args`)."""
    from ttrv.config import (
        AdaptConfig,
        GuardConfig,
        LoraConfig,
        ModelConfig,
        OptimConfig,
        RewardConfig,
        RolloutConfig,
    )

    return AdaptConfig(
        model=ModelConfig(
            model=spec.model_dir,
            quantization=spec.quantization,
            dtype=spec.dtype,
            device=spec.device,
        ),
        lora=LoraConfig(rank=spec.lora_rank, alpha=spec.lora_alpha, dropout=0.0),
        task=task_config(),
        rollout=RolloutConfig(
            n_rollouts=spec.n,
            n_train=spec.n,
            temperature=spec.temperature,
            top_p=spec.top_p,
            max_new_tokens=spec.max_new_tokens,
        ),
        reward=RewardConfig(reward="ttrv", advantage_scope="group"),
        optim=OptimConfig(
            learning_rate=spec.learning_rate,
            weight_decay=0.0,
            schedule="constant",
            warmup_ratio=0.0,
            grad_clip=1.0,
            clip_eps=0.2,
            beta=spec.beta,
            images_per_step=spec.images_per_step,
            rounds=1,
            seed=spec.seed,
        ),
        guard=GuardConfig(guard=False),
    )


def suppress_ids(spec: Spec, tokenizer: Any, model: Any) -> list[int]:
    """Token ids neither engine may sample: the engine's own list, or, for untrained models,
    everything but the option letters and EOS."""
    from ttrv.loading import eos_token_ids, suppressed_token_ids

    if not spec.restrict_answers:
        return suppressed_token_ids(tokenizer, model)
    vocab = model.get_output_embeddings().weight.shape[0]
    keep = set(eos_token_ids(tokenizer, model))
    for i in range(min(vocab, len(tokenizer))):
        if tokenizer.decode([i]).strip() in ANSWER_TOKENS:
            keep.add(i)
    return [i for i in range(vocab) if i not in keep]


def batch_for_step(items: list[Any], spec: Spec, step: int) -> list[Any]:
    """The images of `step`: consecutive slices of the pool, cycling (one pass = a round)."""
    start = (step * spec.images_per_step) % len(items)
    return [items[(start + i) % len(items)] for i in range(spec.images_per_step)]


# ---- measuring -------------------------------------------------------------------------------


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class StepClock:
    """Wall and process-CPU time of each step (CUDA synchronised)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._t = (0.0, 0.0)

    def _now(self) -> tuple[float, float]:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    def start(self) -> None:
        self._t = self._now()

    def stop(self) -> None:
        wall, cpu = self._now()
        self.wall.append(wall - self._t[0])
        self.cpu.append(cpu - self._t[1])
        self._t = (wall, cpu)  # a following step starts here (TRL: consecutive step ends)


def memory_report(device: str, rss_loaded: float) -> dict[str, float]:
    out = {"rss_loaded_mib": rss_loaded, "peak_rss_mib": peak_rss_mib()}
    if device.startswith("cuda"):
        import torch

        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def setup_torch(spec: Spec) -> None:
    import torch

    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)


def resolved_device(spec: Spec) -> str:
    import torch

    if spec.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec.device


# ---- this engine -----------------------------------------------------------------------------


def load_ours(spec: Spec, cfg: Any) -> tuple[Any, Any, list[Any], Any]:
    """(loaded, policy, params, optimizer) exactly as `ttrv.adapt.adapt` sets them up."""
    from ttrv.adapt import make_policy, trainable_params
    from ttrv.grpo import make_optimizer
    from ttrv.loading import load_model
    from ttrv.lora import attach_lora

    loaded = load_model(cfg.model)
    loaded.model = attach_lora(loaded.model, cfg.lora, seed=cfg.optim.seed)
    policy = make_policy(loaded)
    policy.suppress = suppress_ids(spec, loaded.tokenizer, loaded.model)
    params = list(trainable_params(loaded.model).values())
    optimizer = make_optimizer(params, cfg.optim.learning_rate, cfg.optim.weight_decay)
    return loaded, policy, params, optimizer


def run_ours(spec: Spec, policy_hook: Any = None, step_hook: Any = None) -> dict[str, Any]:
    """`spec.steps` steps of `ttrv.adapt.run_step` (rollouts, rewards, one GRPO update each).

    `policy_hook(policy)` may change the policy before the first step (bench.scaling);
    `step_hook(steps_done)` runs before the first step (0) and after each step
    (bench.host_ops starts and stops its profiler there).
    """
    from ttrv.adapt import run_step

    setup_torch(spec)
    device = resolved_device(spec)
    cfg = adapt_config(spec)
    items = bench_items(spec.pool, spec.seed)
    loaded, policy, params, optimizer = load_ours(spec, cfg)
    if policy_hook is not None:
        policy = policy_hook(policy, loaded)
    rss_loaded = rss_mib()
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
    clock = StepClock(device)
    tokens, skipped, reward = [], [], []
    steps_per_round = max(1, len(items) // spec.images_per_step)
    if step_hook is not None:
        step_hook(0)
    for step in range(spec.steps):
        batch = batch_for_step(items, spec, step)
        clock.start()
        record, _, _ = run_step(
            policy, batch, cfg, step, step // steps_per_round, optimizer, params
        )
        clock.stop()
        if step_hook is not None:
            step_hook(step + 1)
        tokens.append(record.tokens)
        skipped.append(record.groups_skipped)
        reward.append(record.reward_mean)
    return {
        "engine": "ours",
        "label": spec.label,
        "params": loaded.info["total_params"],
        "step_wall": clock.wall,
        "step_cpu": clock.cpu,
        "tokens": tokens,
        "groups_skipped": skipped,
        "reward_mean": reward,
        **memory_report(device, rss_loaded),
    }


# ---- driver ----------------------------------------------------------------------------------


def keep_zero_advantage_rows(group: Any, advantages: Any) -> dict[int, list[int]]:
    """`ttrv.grpo._trained_rows` without the zero-advantage filter: every trained rollout."""
    rows: dict[int, list[int]] = {}
    for i, trained in enumerate(group.train_mask):
        if trained:
            rows.setdefault(group.prompt_index[i], []).append(i)
    return rows


def worker(engine: str, spec: Spec) -> dict[str, Any]:
    if engine == "ours":
        return run_ours(spec)
    if engine == "ours-all":  # every group trained, as TRL does: the zero-advantage skip off
        from unittest.mock import patch

        with patch("ttrv.grpo._trained_rows", keep_zero_advantage_rows):
            return dict(run_ours(spec), engine="ours-all")
    from bench.trl_compare import run_trl

    return run_trl(spec)


def run_worker(engine: str, spec: Spec, timeout: float = 900) -> dict[str, Any]:
    """One engine run in a fresh interpreter; its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(spec.to_json())
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        cmd = [sys.executable, "-m", "bench.speed", "--worker", engine, "--spec", str(spec_path)]
        cmd += ["--result", str(out_path)]
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{engine} worker failed:\n{proc.stderr[-4000:]}")
        return json.loads(out_path.read_text())


def summarise(runs: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Median over runs of each run's median post-warm-up step time; max peak memory."""
    walls = [statistics.median(r["step_wall"][warmup:]) for r in runs]
    cpus = [statistics.median(r["step_cpu"][warmup:]) for r in runs]
    out = {
        "engine": runs[0]["engine"],
        "params": runs[0]["params"],
        "runs": len(runs),
        "wall_s": statistics.median(walls),
        "wall_s_runs": walls,
        "cpu_s": statistics.median(cpus),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "rss_loaded_mib": statistics.median(r["rss_loaded_mib"] for r in runs),
        "tokens_per_step": statistics.mean(t for r in runs for t in r["tokens"][warmup:]),
        "groups_skipped": sum(s for r in runs for s in r["groups_skipped"][warmup:]),
    }
    if "cuda_peak_mib" in runs[0]:
        out["cuda_peak_mib"] = max(r["cuda_peak_mib"] for r in runs)
    return out


def specs_from_args(args: argparse.Namespace, **extra: Any) -> list[Spec]:
    """One Spec per model of `--model`, from the workload flags bench.speed and
    bench.host_ops share (`extra`: the fields only one of them sets)."""
    return [
        Spec(
            model_dir=str(folder),
            label=label,
            restrict_answers=restrict,
            n=args.n,
            max_new_tokens=args.max_new_tokens,
            images_per_step=args.images_per_step,
            pool=2 * args.images_per_step,
            warmup=args.warmup,
            beta=args.beta,
            **extra,
        )
        for label, folder, restrict in resolve_models(args.model)
    ]


def print_table(label: str, spec: Spec, rows: list[dict[str, Any]]) -> None:
    print(
        f"\n== {label}: {rows[0]['params'] / 1e6:.2f} M params, {spec.images_per_step} images x "
        f"N={spec.n} per step, max {spec.max_new_tokens} new tokens, {spec.steps} steps "
        f"({spec.warmup} warm-up), device {spec.device}, dtype {spec.dtype}, "
        f"quantization {spec.quantization}, {spec.threads} thread(s)"
    )
    mem = "cuda peak MiB" if "cuda_peak_mib" in rows[0] else "peak RSS MiB (rise)"
    print(
        f"{'engine':<8} {'s/step wall':>12} {'s/step cpu':>11} {mem:>22} {'tok/step':>9} {'skipped':>8}"
    )
    for r in rows:
        if "cuda_peak_mib" in r:
            m = f"{r['cuda_peak_mib']:.0f}"
        else:
            m = f"{r['peak_rss_mib']:.0f} (+{r['peak_rss_mib'] - r['rss_loaded_mib']:.0f})"
        print(
            f"{r['engine']:<8} {r['wall_s']:>12.3f} {r['cpu_s']:>11.3f} {m:>22} "
            f"{r['tokens_per_step']:>9.1f} {r['groups_skipped']:>8}"
        )
    trl = next((r for r in rows if r["engine"] == "trl"), None)
    for r in rows:
        if trl is not None and r is not trl:
            print(
                f"TRL / {r['engine']}: {trl['wall_s'] / r['wall_s']:.2f}x wall, "
                f"{trl['cpu_s'] / r['cpu_s']:.2f}x CPU time per step"
            )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="both", help="bundled | large | both | large-32k | a folder")
    p.add_argument(
        "--engine",
        nargs="+",
        default=["ours", "trl"],
        choices=["ours", "ours-all", "trl"],
        help="engines to run, in this order (ours-all: ours training zero-advantage groups "
        "too, as TRL does)",
    )
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 6; quick 3)")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the median")
    p.add_argument("--repeats", type=int, default=1, help="runs per engine, alternating")
    p.add_argument("--quick", action="store_true", help="bundled model only, 3 steps")
    p.add_argument("--n", type=int, default=8, help="N rollouts per image (all trained)")
    p.add_argument("--images-per-step", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quantization", default="none", choices=["none", "8bit", "4bit"])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per engine")
    p.add_argument("--json", type=Path, default=None, help="also write all results here")
    p.add_argument("--worker", choices=["ours", "ours-all", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:  # inside a subprocess started by run_worker
        spec = Spec(**json.loads(args.spec.read_text()))
        args.result.write_text(json.dumps(worker(args.worker, spec)))
        return 0
    if args.quick:
        args.model = "bundled" if args.model == "both" else args.model
    steps = args.steps or (3 if args.quick else 6)
    engines = args.engine
    results = []
    failed = False
    for spec in specs_from_args(
        args, steps=steps, device=args.device, dtype=args.dtype,
        quantization=args.quantization, threads=args.threads,
    ):  # fmt: skip
        label = spec.label
        runs: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
        errors: dict[str, str] = {}
        for _ in range(args.repeats):
            for engine in engines:
                if engine in errors:
                    continue
                try:
                    runs[engine].append(run_worker(engine, spec))
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    # One engine failing (a missing extra, an OOM) must not lose the others.
                    errors[engine] = str(exc)
                    print(f"!! {label}: {exc}", file=sys.stderr)
        rows = [summarise(runs[e], spec.warmup) for e in engines if runs[e]]
        if rows:
            print_table(label, spec, rows)
        results.append({"spec": dataclasses.asdict(spec), "summary": rows, "runs": runs,
                        "errors": errors})  # fmt: skip
        failed = failed or bool(errors)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
