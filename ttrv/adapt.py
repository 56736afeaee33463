"""The adaptation loop: greedy answers before, rounds of GRPO steps, greedy answers after.

Everything observable goes to the caller's sink (see `ttrv.events`); `stop()` is polled
between steps. A checkpoint (adapter + optimiser state, safetensors, plus a JSON state) is
written after every round and on stop, so a run can resume where it left off.

Data parallel (`accelerate launch`, see `ttrv.distributed`): each process samples, scores
and trains on its share of a step's images and answers its share of each greedy pass;
rewards, advantages, the stop flag and guard decisions are the whole step's, the same on
every process; only the main process calls the sink and writes checkpoints. A checkpoint
holds nothing per process, so it resumes with any process count.
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

from . import distributed
from . import guard as guard_mod
from .answers import INVALID, canonical_label
from .config import AdaptConfig
from .events import RolloutRecord, Sink, StepRecord, null_sink
from .forecast import Forecast, favoured
from .forecast import forecast as make_forecast
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
    train_mode_matters,
    wants_token_type_ids,
)
from .screening import screen_items
from .tasks import Item, item_options, option_orders
from .watch import Split, seeded_sample, split_images, split_sizes

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
ROLLBACK_FILE = "rollback.safetensors"  # the guard's rollback target at this checkpoint


@dataclass
class AdaptResult:
    status: str  # done | stopped | guard_stopped
    steps: int
    reason: str
    before: list[dict[str, str]]
    after: list[dict[str, str]]
    checkpoint: Path | None = None
    history: list[StepRecord] = field(default_factory=list)
    split: Split | None = None
    target_step: int = 0  # the guard's rollback target when the run ended (0 = unadapted)


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
        switch_train_mode=train_mode_matters(loaded.model),
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
    votes: dict[str, list[str]] | None = None,
) -> Any:
    """Guard signals of one set of greedy answers (option positions for multiple choice);
    `before`: the same images' greedy answers before adaptation (for the changed share);
    `votes`: image id -> the answers its samples favoured before adaptation, for the
    sampled images (for the unexplained flips)."""
    positions, letters = None, None
    if task.kind == "multiple_choice":
        positions, letters = [], 0
        for item, a in zip(items, answers, strict=True):
            options = [canonical_label(o, task) for o in item_options(task, item)]
            letters = max(letters, len(options))
            if a["answer"] in options:
                positions.append(options.index(a["answer"]))
    previous = vote_list = None
    if before is not None:  # matched by image, not by position (a resumed run reorders)
        by_image = {b["image_id"]: b["answer"] for b in before}
        previous = [by_image.get(a["image_id"], INVALID) for a in answers]
        if votes is not None:
            vote_list = [votes.get(a["image_id"]) for a in answers]
    return guard_mod.signals(
        [a["answer"] for a in answers],
        positions=positions,
        before=previous,
        favoured=vote_list,
        letters=letters,
    )


def set_signals(
    task: Any,
    sets: dict[str, list[Item]],
    answers: list[dict[str, str]],
    before: list[dict[str, str]] | None = None,
    votes: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """`greedy_signals` of each watched set (name -> items), from answers of any images
    matched by image id (`before`/`votes` as there; None for the signals before)."""
    by_id = {a["image_id"]: a for a in answers}
    return {
        name: greedy_signals(task, its, [by_id[it.image_id] for it in its], before, votes)
        for name, its in sets.items()
    }


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
    folder: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """A peft adapter folder (safetensors) plus optimiser moments (safetensors), `extra`
    tensor files (file name -> tensors, e.g. the guard's rollback target) and the loop
    state (JSON). The folder loads anywhere a peft adapter does."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STATE_FILE).unlink(missing_ok=True)
    save_adapter(model, folder)
    for name, tensors in (extra or {}).items():
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, folder / name)
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
    dist: distributed.Single | None = None,
) -> tuple[StepRecord, list[RolloutRecord], list[Group]]:
    """Rollouts, rewards, advantages and one GRPO update for the images of one step.

    With `dist` (several processes) this process samples and trains its share of `batch`;
    the rewards, advantages, record and rollout records are the whole step's. The groups
    returned are this process's."""
    t0 = time.perf_counter()
    dist = dist or distributed.Single()
    seed = cfg.optim.seed
    # Sampling is keyed per rollout (`stream`); the global generator is seeded for anything
    # else that draws from it (LoRA dropout), so that a resumed run matches.
    torch.manual_seed(seed * 1_000_003 + step)
    rng = random.Random(f"{seed}:train:{step}")
    # Drawn for the whole step on every process, in order: the same K rollouts are trained
    # whichever process samples an image.
    masks = [select_trained(cfg.rollout.n_rollouts, cfg.rollout.n_train, rng) for _ in batch]
    mine = dist.shard(len(batch))
    local = [batch[i] for i in mine]
    orders = [option_orders(cfg.task, it, cfg.rollout.n_rollouts, seed, step) for it in local]
    groups = (
        rollout_groups(policy, local, cfg.task, cfg.rollout, orders, stream=f"{seed}:{step}")
        if local
        else []
    )
    for g, i in zip(groups, mine, strict=True):
        g.train_mask = masks[i]
    # Every process needs every image's answers: rewards (the random control reward draws
    # in image order) and batch-scope advantages are over the whole step.
    shared = dist.gather(
        [
            (
                g.item.image_id,
                g.responses,
                g.answers,
                [list(g.encoded[p].prompt.options) or None for p in g.prompt_index],
            )
            for g in groups
        ]
    )
    answers = [s[2] for s in shared]
    # Seeded per step (the random control reward draws numbers), so a resumed run matches.
    reward_fn = make_reward(cfg.reward, seed=seed * 1_000_003 + step)
    components = [reward_fn(a) for a in answers]
    rewards = [[c["total"] for c in comp] for comp in components]
    advantages = group_advantages(rewards, cfg.reward.scope())

    lr = optimizer.param_groups[0]["lr"]
    stats: UpdateStats = grpo_update(
        policy,
        groups,
        [advantages[i] for i in mine],
        optimizer,
        params,
        temperature=cfg.rollout.temperature,
        clip_eps=cfg.optim.clip_eps,
        beta=cfg.optim.beta,
        grad_clip=cfg.optim.grad_clip,
        micro_batch_tokens=cfg.optim.micro_batch_tokens,
        dist=dist if dist.size > 1 else None,
    )
    flat = [r for rs in rewards for r in rs]
    per_group = [answer_stats(a) for a in answers]
    record = StepRecord(
        step=step,
        round=rnd,
        reward_mean=sum(flat) / len(flat),
        reward_std=float(torch.tensor(flat).std(unbiased=False)),
        consensus=sum(s[0] for s in per_group) / len(per_group),
        entropy=sum(s[1] for s in per_group) / len(per_group),
        invalid_rate=sum(s[2] for s in per_group) / len(per_group),
        kl=stats.kl if stats.kl is not None else float("nan"),
        loss=stats.loss,
        grad_norm=stats.grad_norm,
        lr=lr,
        tokens=stats.tokens,
        seconds=time.perf_counter() - t0,
        groups=len(batch),
        groups_skipped=stats.groups_skipped,
    )
    rollouts = [
        RolloutRecord(
            step=step,
            image_id=image_id,
            index=i,
            response=responses[i],
            answer=group_answers[i],
            reward=comp[i]["total"],
            components={k: v for k, v in comp[i].items() if k != "total"},
            advantage=adv[i],
            trained=mask[i],
            option_order=option_order[i],
        )
        for (image_id, responses, group_answers, option_order), comp, adv, mask in zip(
            shared, components, advantages, masks, strict=True
        )
        for i in range(len(group_answers))
    ]
    return record, rollouts, groups


def steps_per_run(cfg: AdaptConfig, n_images: int) -> int:
    """Steps of a run over a session of `n_images` (the watch pool is never trained on);
    fewer when images converge and are skipped in later rounds."""
    n_adapt, _ = split_sizes(n_images, cfg)
    return cfg.optim.rounds * math.ceil(n_adapt / cfg.optim.images_per_step)


def check_due(step: int, cfg: AdaptConfig) -> bool:
    """A guard check after `step` steps, besides round ends (the same steps on resume)."""
    return bool(cfg.guard.guard and cfg.guard.check_every and step % cfg.guard.check_every == 0)


def unadapted_state(model: Any) -> dict[str, torch.Tensor]:
    """LoRA weights equivalent to no adapter (every B zero: the update B @ A is zero), for
    checkpoints that predate the stored rollback target."""
    return {n: torch.zeros_like(t) if "lora_B" in n else t for n, t in adapter_state(model).items()}


def sample_votes(
    policy: Policy,
    items: list[Item],
    greedy: dict[str, str],
    cfg: AdaptConfig,
    dist: distributed.Single | None = None,
) -> tuple[Forecast, dict[str, list[str]]]:
    """The forecast on `items` (N samples each from the unadapted model; `greedy`: image id
    -> greedy answer) and the answers each image's samples favoured (each process samples
    its share of the images)."""
    dist = dist or distributed.Single()
    seed = cfg.optim.seed
    local = [items[i] for i in dist.shard(len(items))]
    orders = [option_orders(cfg.task, it, cfg.rollout.n_rollouts, seed, -1) for it in local]
    groups = (  # its own stream (step -1): training steps are unchanged
        rollout_groups(policy, local, cfg.task, cfg.rollout, orders, stream=f"{seed}:-1")
        if local
        else []
    )
    answers = dist.gather([g.answers for g in groups])
    fc = make_forecast([greedy[it.image_id] for it in items], answers)
    return fc, {it.image_id: favoured(a) for it, a in zip(items, answers, strict=True)}


def answer_share(
    policy: Policy, items: list[Item], cfg: AdaptConfig, dist: distributed.Single
) -> list[dict[str, str]]:
    """`greedy_answers` of `items`, each process answering its share, all answers on every
    process (in the items' order)."""
    local = [items[i] for i in dist.shard(len(items))]
    return dist.gather(greedy_answers(policy, local, cfg.task, cfg.rollout))


def adapt(
    loaded: Any,
    items: list[Item],
    cfg: AdaptConfig,
    sink: Sink = null_sink,
    stop: Callable[[], bool] = lambda: False,
    output_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    split: Split | None = None,
    dist: distributed.Single | None = None,
) -> AdaptResult:
    """Adapt `loaded.model` (a LoRA-wrapped model) to `items` without labels.

    The items are split (`ttrv.watch`) into the images adapted on and a watch pool the guard
    checks but never trains on; every item is answered before and after. `split`: a
    caller's own split of the items' ids (the benchmark hands its pool this way).
    `dist`: this process's place among several (default: `ttrv.distributed.current()`,
    one process unless started by `accelerate launch`); only the main process's `sink`
    and `stop` are used.
    """
    dist = dist or distributed.current()
    if not dist.is_main:
        sink = null_sink  # events are written once, by the main process
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
    model.eval()
    # An image the model's processor refuses is skipped by name, never sinks the run.
    items, rejected = screen_items(policy, items, cfg.task)
    for r in rejected:
        sink("warning", {"message": f"skipped {r.message}", "image_id": r.image_id})
    if not items:
        raise ValueError("The model's processor refuses every image: nothing to adapt on.")
    by_id = {it.image_id: it for it in items}

    state: dict[str, Any]
    if resume_from:
        state = load_checkpoint(Path(resume_from), model, optimizer)
        before = state["before"]
        split = Split(state["adapt_ids"], state["watch_ids"], state.get("split_note", ""))
        rollback_file = Path(resume_from) / ROLLBACK_FILE
        # The rollback target travels with the checkpoint: a resumed run decides exactly as
        # an uninterrupted one (not "roll back to the weights at resume time").
        target_weights = (
            load_file(rollback_file) if rollback_file.is_file() else unadapted_state(model)
        )
        target_step = int(state.get("target_step", 0))
        votes = state.get("votes") or {}
        missing = (set(split.adapt) | set(split.watch)) - by_id.keys()
        if missing:
            raise ValueError(
                f"{len(missing)} of the run's images are not among the images given to "
                "resume it: resume with the same images."
            )
    else:
        if split is None:
            split = split_images([it.image_id for it in items], cfg)
        unknown = (set(split.adapt) | set(split.watch)) - by_id.keys()
        if unknown or set(split.adapt) & set(split.watch) or not split.adapt:
            raise ValueError("A split must name disjoint ids of the given images, some to adapt.")
        sink(
            "run_start",
            {
                "config": cfg.to_dict(),
                "images": [{"image_id": it.image_id, "name": it.name} for it in items],
                "model": dict(getattr(loaded, "info", {}) or {}),
                "processes": dist.size,
                "split": {
                    "adapt": len(split.adapt),
                    "watch": len(split.watch),
                    "watch_ids": split.watch,
                    "note": split.note,
                },
            },
        )
        before = answer_share(policy, items, cfg, dist)
        sink("answers", {"phase": "before", "answers": before})
        votes: dict[str, list[str]] = {}
        if cfg.guard.forecast_images:
            pool = [by_id[i] for i in (split.watch or split.adapt)]
            sampled = seeded_sample(pool, cfg.guard.forecast_images, cfg.optim.seed, "forecast")
            greedy = {b["image_id"]: b["answer"] for b in before}
            fc, votes = sample_votes(policy, sampled, greedy, cfg, dist)
            sink(
                "forecast",
                {**fc.to_dict(), "set": "watch" if split.watch else "adapted", "votes": votes},
            )
        target_weights = adapter_state(model)  # a fresh LoRA: the unadapted model
        target_step = 0
        state = {
            "step": 0,
            "round": 0,
            "position": 0,
            "order": None,
            "converged": [],
            "before": before,
            "adapt_ids": split.adapt,
            "watch_ids": split.watch,
            "split_note": split.note,
            "votes": votes,
            "target_step": 0,
        }

    adapt_items = [by_id[i] for i in split.adapt]
    total = steps_per_run(cfg, len(items))
    warmup = int(cfg.optim.warmup_ratio * total)

    def set_lr(step: int) -> None:
        # Set from the step index, not stepped: a resumed run needs no fast-forward, and a
        # step whose groups were all skipped (no optimiser step) leaves nothing to warn about.
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.learning_rate * lr_factor(
                step, total, warmup, cfg.optim.schedule
            )

    # What the guard watches: the watch pool, and (a seeded sample of) the adapted images.
    watched = {
        "adapted": seeded_sample(
            adapt_items, cfg.guard.max_watch_images, cfg.optim.seed, "guard-adapted"
        ),
        "watch": [by_id[i] for i in split.watch],
    }
    watched = {k: v for k, v in watched.items() if v}
    base_signals = set_signals(cfg.task, watched, before)
    history: list[StepRecord] = []
    status, reason = "done", "all rounds finished"
    checkpoint: Path | None = Path(resume_from) if resume_from else None

    def save(tag: str) -> None:
        nonlocal checkpoint
        if out is None:
            return
        state["target_step"] = target_step
        checkpoint = out / "checkpoints" / tag
        if not dist.is_main:  # the weights and state are the same on every process
            return
        save_checkpoint(checkpoint, model, optimizer, state, {ROLLBACK_FILE: target_weights})
        sink(
            "checkpoint", {"round": state["round"], "step": state["step"], "path": str(checkpoint)}
        )

    def guard_check(phase: str) -> bool:
        """Answer the watched images, decide; True when the run must stop (rolled back)."""
        nonlocal target_weights, target_step, status, reason
        check_items = [it for its in watched.values() for it in its]
        answers = answer_share(policy, check_items, cfg, dist)
        if phase.startswith("round-"):  # mid-round checks keep only their signals
            sink("answers", {"phase": phase, "answers": answers})
        if not cfg.guard.guard:
            return False
        now = set_signals(cfg.task, watched, answers, before, votes)
        # Decided once, on the main process, and applied on every process (rollback).
        d = dist.broadcast(guard_mod.decide(base_signals, now, cfg.guard) if dist.is_main else None)
        step = state["step"]
        record = {
            "step": step,
            "phase": phase,
            "tripped": d.tripped,
            "healthy": d.healthy,
            "near": d.near,
            "signals": {k: v.to_dict() for k, v in now.items()},
            "base_signals": {k: v.to_dict() for k, v in base_signals.items()},
        }
        if d.tripped:
            load_adapter_state(model, target_weights)
            label = guard_mod.target_label(target_step)
            status, reason = "guard_stopped", f"{d.reason}. Rolled back to {label}."
            sink(
                "guard",
                {
                    **record,
                    "action": "rollback",
                    "reason": reason,
                    "rolled_back_to": label,
                    "target_step": target_step,
                    "checkpoint": str(checkpoint) if checkpoint else None,
                },
            )
            return True
        if d.healthy:
            target_weights, target_step = adapter_state(model), step
        sink(
            "guard",
            {
                **record,
                "action": "keep",
                "reason": (
                    "clearly healthy: these weights are the rollback target"
                    if d.healthy
                    else f"within the guard's bounds but near one, past "
                    f"{cfg.guard.healthy_margin:.0%} of it ({d.near}; the number after > is that "
                    f"{cfg.guard.healthy_margin:.0%} line); the rollback target stays "
                    f"{guard_mod.target_label(target_step)}"
                ),
                "rolled_back_to": None,
                "target_step": target_step,
                "checkpoint": None,
            },
        )
        return False

    while state["round"] < cfg.optim.rounds and status == "done":
        rnd = state["round"]
        converged = set(state["converged"]) if cfg.optim.skip_converged else set()
        if state["order"] is None:
            active = set(split.adapt) - converged
            state["order"] = round_order(adapt_items, active, cfg.optim.seed, rnd)
            state["position"] = 0
        order = state["order"]
        if not order:
            reason = "every image converged: all rollouts agree"
            break
        while state["position"] < len(order):
            # The main process's stop request, on every process before this step starts.
            if dist.broadcast(bool(stop()) if dist.is_main else False):
                status, reason = "stopped", "stop requested"
                break
            ids = order[state["position"] : state["position"] + cfg.optim.images_per_step]
            batch = [by_id[i] for i in ids]
            set_lr(state["step"])
            record, rollouts, groups = run_step(
                policy, batch, cfg, state["step"], rnd, optimizer, params, dist
            )
            sink("rollouts", {"step": record.step, "rollouts": [r.to_dict() for r in rollouts]})
            sink("step", record.to_dict())
            history.append(record)
            state["step"] += 1
            state["position"] += len(ids)
            # each process knows its own groups; every process needs the step's converged set
            done = dist.gather([g.item.image_id for g in groups if is_converged(g)])
            state["converged"] = sorted(set(state["converged"]) | set(done))
            end_of_round = state["position"] >= len(order)
            if (
                not end_of_round
                and check_due(state["step"], cfg)
                and guard_check(f"step-{state['step']}")
            ):
                break
        if status == "stopped":
            save(f"step-{state['step']}")
            break
        if status == "guard_stopped":
            save(f"step-{state['step']}-rolled-back")
            break
        state["round"] += 1
        state["order"] = None
        if guard_check(f"round-{rnd + 1}"):
            save(f"round-{rnd + 1}-rolled-back")
            break
        save(f"round-{rnd + 1}")

    after = answer_share(policy, items, cfg, dist)
    sink("answers", {"phase": "after", "answers": after})
    sink("run_end", {"status": status, "steps": state["step"], "reason": reason})
    return AdaptResult(
        status, state["step"], reason, before, after, checkpoint, history, split, target_step
    )
