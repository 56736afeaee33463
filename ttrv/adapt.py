"""The adaptation loop: greedy answers before, rounds of GRPO steps, greedy answers after.

Everything observable goes to the caller's sink (see `ttrv.events`); `stop()` is polled
between steps. A checkpoint (adapter + optimiser state, safetensors, plus a JSON state) is
written after every round and on stop, so a run can resume where it left off.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import guard as guard_mod
from .answers import INVALID, canonical_label
from .config import AdaptConfig
from .events import RolloutRecord, Sink, StepRecord, null_sink
from .grpo import UpdateStats, grpo_update, lr_factor, make_optimizer, select_trained
from .lora import ADAPTER_FILE, adapter_state, load_adapter_state, save_adapter
from .rewards import group_advantages, make_reward
from .rollout import (
    Group,
    ImageCache,
    Policy,
    greedy_answers,
    hf_model,
    rollout_groups,
    supports_shared_prefix,
    wants_token_type_ids,
)
from .tasks import Item, item_options, option_orders

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


@dataclass
class AdaptResult:
    status: str  # done | stopped | guard_stopped
    steps: int
    reason: str
    before: list[dict[str, str]]
    after: list[dict[str, str]]
    checkpoint: Path | None = None
    history: list[StepRecord] = field(default_factory=list)


def make_policy(loaded: Any, cache_images: bool = True, shared_prefix: bool = True) -> Policy:
    from .loading import eos_token_ids, suppressed_token_ids

    tok = loaded.tokenizer
    eos = eos_token_ids(tok, loaded.model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    return Policy(
        model=loaded.model,
        processor=loaded.processor,
        tokenizer=tok,
        device=loaded.device,
        dtype=loaded.dtype,
        eos=eos,
        pad=pad,
        suppress=suppressed_token_ids(tok, loaded.model),
        cache=ImageCache(loaded.model, enabled=cache_images),
        keep_token_type_ids=wants_token_type_ids(loaded.model),
        shared_prefix=shared_prefix and cache_images and supports_shared_prefix(loaded.model),
    )


def answer_stats(answers: list[str]) -> tuple[float, float, float]:
    """(consensus, entropy in nats, invalid rate) of one group's answers."""
    counts = Counter(a for a in answers if a != INVALID)
    n = len(answers)
    consensus = max(counts.values()) / n if counts else 0.0
    entropy = -sum(c / n * math.log(c / n) for c in Counter(answers).values())
    invalid = sum(a == INVALID for a in answers) / n
    return consensus, entropy, invalid


def greedy_signals(
    task: Any,
    items: list[Item],
    answers: list[dict[str, str]],
    before: list[dict[str, str]] | None = None,
) -> Any:
    """Guard signals of one set of greedy answers (option positions for multiple choice);
    `before`: the same images' greedy answers before adaptation (for the changed share)."""
    positions = None
    if task.kind == "multiple_choice":
        positions = []
        for item, a in zip(items, answers, strict=True):
            options = [canonical_label(o, task) for o in item_options(task, item)]
            if a["answer"] in options:
                positions.append(options.index(a["answer"]))
    previous = None
    if before is not None:  # matched by image, not by position (a resumed run reorders)
        by_image = {b["image_id"]: b["answer"] for b in before}
        previous = [by_image.get(a["image_id"], INVALID) for a in answers]
    return guard_mod.signals([a["answer"] for a in answers], positions=positions, before=previous)


def is_converged(group: Group) -> bool:
    """Every rollout gave the same valid answer: nothing left to learn from this image."""
    return len(set(group.answers)) == 1 and group.answers[0] != INVALID


# -- checkpoints ---------------------------------------------------------------------------


def trainable_params(model: Any) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def load_adapter_weights(model: Any, folder: str | Path) -> None:
    """Load a saved adapter's weights into the model's existing LoRA layers, in place."""
    from peft import set_peft_model_state_dict

    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No adapter in {folder} (missing {ADAPTER_FILE}).")
    result = set_peft_model_state_dict(model, load_file(path))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"The adapter in {folder} does not fit this model's LoRA settings "
            f"({len(missing)} tensors missing, {len(result.unexpected_keys)} unexpected)."
        )


def save_checkpoint(
    folder: Path, model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> Path:
    """A peft adapter folder (safetensors) plus optimiser moments (safetensors) and the loop
    state (JSON). The folder loads anywhere a peft adapter does."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STATE_FILE).unlink(missing_ok=True)
    save_adapter(model, folder)
    moments: dict[str, torch.Tensor] = {}
    for name, p in trainable_params(model).items():
        st = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                moments[f"{name}::{key}"] = st[key].detach().cpu().contiguous()
        if "step" in st:
            moments[f"{name}::step"] = torch.as_tensor(st["step"]).reshape(1).float().cpu()
    save_file(moments, folder / OPTIMIZER_FILE)
    tmp = folder / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(folder / STATE_FILE)  # the state file appears last: its presence = complete
    return folder


def load_checkpoint(folder: Path, model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    folder = Path(folder)
    if not (folder / STATE_FILE).exists():
        raise FileNotFoundError(f"No complete checkpoint in {folder} (missing {STATE_FILE}).")
    load_adapter_weights(model, folder)
    moments = load_file(folder / OPTIMIZER_FILE) if (folder / OPTIMIZER_FILE).exists() else {}
    for name, p in trainable_params(model).items():
        if f"{name}::exp_avg" in moments:
            optimizer.state[p] = {
                "exp_avg": moments[f"{name}::exp_avg"].to(p.device),
                "exp_avg_sq": moments[f"{name}::exp_avg_sq"].to(p.device),
                "step": moments[f"{name}::step"].reshape(()).to(torch.float32),
            }
    return json.loads((folder / STATE_FILE).read_text())


# -- the loop ------------------------------------------------------------------------------


def round_order(items: list[Item], active: set[str], seed: int, rnd: int) -> list[str]:
    ids = [it.image_id for it in items if it.image_id in active]
    random.Random(f"{seed}:order:{rnd}").shuffle(ids)
    return ids


def run_step(
    policy: Policy,
    batch: list[Item],
    cfg: AdaptConfig,
    step: int,
    rnd: int,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
) -> tuple[StepRecord, list[RolloutRecord], list[Group]]:
    """Rollouts, rewards, advantages and one GRPO update for the images of one step."""
    t0 = time.perf_counter()
    seed = cfg.optim.seed
    torch.manual_seed(seed * 1_000_003 + step)
    rng = random.Random(f"{seed}:train:{step}")
    orders = [option_orders(cfg.task, it, cfg.rollout.n_rollouts, seed, step) for it in batch]
    groups = rollout_groups(policy, batch, cfg.task, cfg.rollout, orders)
    for g in groups:
        g.train_mask = select_trained(cfg.rollout.n_rollouts, cfg.rollout.n_train, rng)
    # Seeded per step (the random control reward draws numbers), so a resumed run matches.
    reward_fn = make_reward(cfg.reward, seed=seed * 1_000_003 + step)
    components = [reward_fn(g.answers) for g in groups]
    rewards = [[c["total"] for c in comp] for comp in components]
    advantages = group_advantages(rewards, cfg.reward.scope())

    lr = optimizer.param_groups[0]["lr"]
    stats: UpdateStats = grpo_update(
        policy,
        groups,
        advantages,
        optimizer,
        params,
        temperature=cfg.rollout.temperature,
        clip_eps=cfg.optim.clip_eps,
        beta=cfg.optim.beta,
        grad_clip=cfg.optim.grad_clip,
        micro_batch_tokens=cfg.optim.micro_batch_tokens,
    )
    flat = [r for rs in rewards for r in rs]
    per_group = [answer_stats(g.answers) for g in groups]
    record = StepRecord(
        step=step,
        round=rnd,
        reward_mean=sum(flat) / len(flat),
        reward_std=float(torch.tensor(flat).std(unbiased=False)),
        consensus=sum(s[0] for s in per_group) / len(groups),
        entropy=sum(s[1] for s in per_group) / len(groups),
        invalid_rate=sum(s[2] for s in per_group) / len(groups),
        kl=stats.kl if stats.kl is not None else float("nan"),
        loss=stats.loss,
        grad_norm=stats.grad_norm,
        lr=lr,
        tokens=stats.tokens,
        seconds=time.perf_counter() - t0,
        groups=len(groups),
        groups_skipped=stats.groups_skipped,
    )
    rollouts = [
        RolloutRecord(
            step=step,
            image_id=g.item.image_id,
            index=i,
            response=g.responses[i],
            answer=g.answers[i],
            reward=comp[i]["total"],
            components={k: v for k, v in comp[i].items() if k != "total"},
            advantage=adv[i],
            trained=g.train_mask[i],
            option_order=list(g.encoded[g.prompt_index[i]].prompt.options) or None,
        )
        for g, comp, adv in zip(groups, components, advantages, strict=True)
        for i in range(len(g.answers))
    ]
    return record, rollouts, groups


def steps_per_run(cfg: AdaptConfig, n_images: int) -> int:
    return cfg.optim.rounds * math.ceil(n_images / cfg.optim.images_per_step)


def adapt(
    loaded: Any,
    items: list[Item],
    cfg: AdaptConfig,
    sink: Sink = null_sink,
    stop: Callable[[], bool] = lambda: False,
    output_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
) -> AdaptResult:
    """Adapt `loaded.model` (a LoRA-wrapped model) to `items` without labels."""
    if not items:
        raise ValueError("No images to adapt on: add at least one image.")
    out = Path(output_dir) if output_dir else None
    model = loaded.model
    if cfg.model.gradient_checkpointing:
        # Only active in train mode, so rollouts (eval mode) keep their KV cache.
        base = hf_model(model)
        enable = getattr(base, "activation_checkpointing_enable", None)
        if enable is not None:  # the transformers >= 5.2x name
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    policy = make_policy(loaded)
    params = list(trainable_params(model).values())
    if not params:
        raise ValueError("The model has no trainable LoRA parameters: attach an adapter first.")
    optimizer = make_optimizer(params, cfg.optim.learning_rate, cfg.optim.weight_decay)
    total = steps_per_run(cfg, len(items))
    warmup = int(cfg.optim.warmup_ratio * total)

    def set_lr(step: int) -> None:
        # Set from the step index, not stepped: a resumed run needs no fast-forward, and a
        # step whose groups were all skipped (no optimiser step) leaves nothing to warn about.
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.learning_rate * lr_factor(
                step, total, warmup, cfg.optim.schedule
            )

    by_id = {it.image_id: it for it in items}
    model.eval()

    state: dict[str, Any]
    if resume_from:
        state = load_checkpoint(Path(resume_from), model, optimizer)
        before = state["before"]
    else:
        sink(
            "run_start",
            {
                "config": cfg.to_dict(),
                "images": [{"image_id": it.image_id, "name": it.name} for it in items],
                "model": dict(getattr(loaded, "info", {}) or {}),
            },
        )
        before = greedy_answers(policy, items, cfg.task, cfg.rollout)
        sink("answers", {"phase": "before", "answers": before})
        state = {
            "step": 0,
            "round": 0,
            "position": 0,
            "order": None,
            "converged": [],
            "before": before,
        }

    base_signals = greedy_signals(cfg.task, items, before)
    # Rollback target: the adapter as it stands at the start of this run (a fresh LoRA is a
    # no-op), replaced by any later round whose signals are at least as healthy.
    best_weights = adapter_state(model)
    best_score = guard_mod.score(base_signals, base_signals)
    history: list[StepRecord] = []
    status, reason = "done", "all rounds finished"
    checkpoint: Path | None = Path(resume_from) if resume_from else None

    def save(tag: str) -> None:
        nonlocal checkpoint
        if out is None:
            return
        checkpoint = save_checkpoint(out / "checkpoints" / tag, model, optimizer, state)
        sink(
            "checkpoint", {"round": state["round"], "step": state["step"], "path": str(checkpoint)}
        )

    while state["round"] < cfg.optim.rounds and status == "done":
        rnd = state["round"]
        converged = set(state["converged"]) if cfg.optim.skip_converged else set()
        if state["order"] is None:
            active = {it.image_id for it in items} - converged
            state["order"] = round_order(items, active, cfg.optim.seed, rnd)
            state["position"] = 0
        order = state["order"]
        if not order:
            reason = "every image converged: all rollouts agree"
            break
        while state["position"] < len(order):
            if stop():
                status, reason = "stopped", "stop requested"
                break
            ids = order[state["position"] : state["position"] + cfg.optim.images_per_step]
            batch = [by_id[i] for i in ids]
            set_lr(state["step"])
            record, rollouts, groups = run_step(
                policy, batch, cfg, state["step"], rnd, optimizer, params
            )
            sink("rollouts", {"step": record.step, "rollouts": [r.to_dict() for r in rollouts]})
            sink("step", record.to_dict())
            history.append(record)
            state["step"] += 1
            state["position"] += len(ids)
            state["converged"] = sorted(
                set(state["converged"]) | {g.item.image_id for g in groups if is_converged(g)}
            )
        if status != "done":
            save(f"step-{state['step']}")
            break
        state["round"] += 1
        state["order"] = None
        answers = greedy_answers(policy, items, cfg.task, cfg.rollout)
        sink("answers", {"phase": f"round-{rnd + 1}", "answers": answers})
        now = greedy_signals(cfg.task, items, answers, before)
        if cfg.guard.guard:
            verdict = guard_mod.check(base_signals, now, cfg.guard)
            if verdict.tripped:
                load_adapter_state(model, best_weights)
                status, reason = "guard_stopped", verdict.reason
                sink(
                    "guard",
                    {
                        "step": state["step"],
                        "action": "rollback",
                        "reason": verdict.reason,
                        "signals": now.to_dict(),
                        "base_signals": base_signals.to_dict(),
                        "checkpoint": str(checkpoint) if checkpoint else None,
                    },
                )
                save(f"round-{rnd + 1}-rolled-back")
                break
            s = guard_mod.score(base_signals, now)
            if s >= best_score:
                best_score, best_weights = s, adapter_state(model)
        save(f"round-{rnd + 1}")

    after = greedy_answers(policy, items, cfg.task, cfg.rollout)
    sink("answers", {"phase": "after", "answers": after})
    sink("run_end", {"status": status, "steps": state["step"], "reason": reason})
    return AdaptResult(status, state["step"], reason, before, after, checkpoint, history)
