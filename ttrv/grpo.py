"""The GRPO update on LoRA adapters, and where it departs from the TTRV paper.

TTRV (CVPR 2026) samples N responses per unlabeled image, rewards each by the frequency of
its answer plus alpha times the negative entropy of the answer distribution, and trains
with GRPO (full fine-tuning, per-prompt advantage normalisation, KL 0.001). This module
departs from it knowingly:

- LoRA on the language model only; the vision tower stays frozen and its output is cached.
- Advantage scope. Per-image normalisation (the paper's code) cancels the entropy term,
  which is constant within an image's group. Our default `ttrv` normalises across the
  images of a step instead, so images with concentrated answer distributions are pushed up
  as a whole and the entropy term reaches the gradient. `ttrv_paper` keeps the paper's form.
- Invalid (empty / unparseable) answers earn no reward and never win a vote (the
  reference lets empty output win, and its own logs collapse to it).
- One policy-gradient epoch per batch of rollouts, so the importance ratio is 1 at the
  sampled point; the clipped surrogate is kept so that a caller who reuses rollouts gets
  PPO clipping. Token-mean loss over every trained token of the step (DAPO / verl
  "token-mean"), logits divided by the sampling temperature as in TRL and verl.
- The KL reference is the same model with its adapter disabled (no second copy), with the
  low-variance k3 estimator; when beta is 0 no reference pass runs at all.
- Groups whose trained advantages are all zero (every rollout agreed) skip the forward
  and backward pass: they would contribute exactly zero gradient.
- The images of a step are sampled in one generate call and trained in one forward per
  micro-batch of at most `micro_batch_tokens` tokens (prompts left-padded; see
  `ttrv.batching`), not image by image.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .batching import pack
from .rollout import Group, Policy
from .scoring import batch_logprobs


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> torch.Tensor:
    """Sum over tokens of the PPO clipped objective, negated (a loss).

    logp, old_logp, mask: [K, T]; advantages: [K]. Divide by the step's token count for a
    token-mean loss.
    """
    ratio = torch.exp(logp - old_logp)  # [K, T]
    adv = advantages.unsqueeze(1)  # [K, 1]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    return -(torch.minimum(unclipped, clipped) * mask).sum()


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(d) - d - 1, d = ref - logp.

    Non-negative, zero where the two agree (Schulman's low-variance estimator, as in verl).
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def select_trained(n: int, k: int, rng: random.Random) -> list[bool]:
    """Which K of the N voting rollouts are trained on (a seeded random subset)."""
    chosen = set(rng.sample(range(n), k))
    return [i in chosen for i in range(n)]


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class UpdateStats:
    loss: float
    kl: float | None
    grad_norm: float
    tokens: int
    groups_skipped: int


def _trained_rows(group: Group, advantages: Sequence[float]) -> dict[int, list[int]]:
    """Trained rollouts with a non-zero advantage, grouped by the prompt they were sampled from."""
    rows: dict[int, list[int]] = {}
    for i, (trained, adv) in enumerate(zip(group.train_mask, advantages, strict=True)):
        if trained and adv != 0.0:
            rows.setdefault(group.prompt_index[i], []).append(i)
    return rows


def _unit_tokens(group: Group, prompt: int, rows: list[int], shared_prefix: bool) -> int:
    """Tokens one prompt's trained rows put through the training forward: the prompt once
    plus each completion with a shared prefix, else every row's full sequence."""
    p = group.encoded[prompt].length
    t = max(len(group.completions[i]) for i in rows)
    return p + len(rows) * t if shared_prefix else len(rows) * (p + t)


def grpo_update(
    policy: Policy,
    groups: list[Group],
    advantages: list[list[float]],
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    temperature: float,
    clip_eps: float,
    beta: float,
    grad_clip: float,
    micro_batch_tokens: int = 16384,
    dist: Any = None,
) -> UpdateStats:
    """One optimiser step on the trained rollouts of `groups`.

    The trained rows of all images run through the model together, in micro-batches of at
    most `micro_batch_tokens` tokens per forward/backward (the rows of one prompt stay
    together; activation memory grows with these tokens), with gradients accumulated; the
    loss is a token mean over the whole step.

    `dist` (`ttrv.distributed`, several processes): `groups` are this process's share of
    the step. The loss divides by the step's token count over every process (a mean of
    per-process means weighs a process's tokens by its share, not one each), and the
    gradients are summed over processes before clipping, so every process takes the step
    one process would take on all the groups.
    """
    model = policy.model
    # units: (group, its advantages, prompt, row indices with a non-zero advantage)
    units = [
        (g, a, prompt, idx)
        for g, a in zip(groups, advantages, strict=True)
        for prompt, idx in _trained_rows(g, a).items()
    ]
    total_tokens = sum(len(g.completions[i]) for g, _, _, idx in units for i in idx)
    skipped = len({id(g) for g in groups} - {id(u[0]) for u in units})
    if dist is not None:  # every process takes part, even one with nothing to train
        total_tokens, skipped = (int(x) for x in dist.sum([total_tokens, skipped]))
    optimizer.zero_grad(set_to_none=True)
    if total_tokens == 0:
        return UpdateStats(0.0, None, 0.0, 0, skipped)

    if policy.switch_train_mode:
        model.train()
    loss_total, kl_total = 0.0, 0.0
    costs = [_unit_tokens(g, p, idx, policy.shared_prefix) for g, _, p, idx in units]
    for chunk in pack(costs, micro_batch_tokens):
        part = [units[c] for c in chunk]
        encoded = [g.encoded[p] for g, _, p, _ in part]
        comps = [[g.completions[i] for i in idx] for g, _, _, idx in part]
        logp, mask = batch_logprobs(
            model, encoded, comps, policy.pad, temperature, policy.shared_prefix
        )
        adv = [a[i] for _, a, _, idx in part for i in idx]
        adv_t = torch.tensor(adv, dtype=logp.dtype, device=logp.device)
        loss = clipped_surrogate(logp, logp.detach(), adv_t, mask, clip_eps)
        if beta > 0:
            with torch.no_grad(), model.disable_adapter():
                ref_logp, _ = batch_logprobs(
                    model, encoded, comps, policy.pad, temperature, policy.shared_prefix
                )
            kl = (kl_k3(logp, ref_logp) * mask).sum()
            loss = loss + beta * kl
            kl_total += float(kl.detach())
        (loss / total_tokens).backward()
        loss_total += float(loss.detach())
    if policy.switch_train_mode:
        model.eval()
    if dist is not None:
        dist.reduce_grads(params)
        loss_total, kl_total = dist.sum([loss_total, kl_total])
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return UpdateStats(
        loss=loss_total / total_tokens,
        kl=kl_total / total_tokens if beta > 0 else None,
        grad_norm=float(grad_norm),
        tokens=total_tokens,
        groups_skipped=skipped,
    )


FUSED_DEVICES = ("cpu", "cuda")  # where torch has a fused AdamW kernel


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> Any:
    """AdamW, fused where torch has the kernel: one operator updates every LoRA tensor,
    where the per-tensor form launches about 14 per tensor and reads each step counter on
    the host (TRL's default optimiser, `adamw_torch_fused`, is the same). Its updates differ
    from the per-tensor form's only by float rounding (~1 ulp)."""
    fused = bool(params) and all(
        p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params
    )
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if fused:
        optimizer.register_step_pre_hook(_steps_on_param_device)
    return optimizer


def _steps_on_param_device(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    """The fused kernel keeps each step counter on its parameter's device; state restored
    by assignment (`ttrv.adapt.load_checkpoint`) puts it on the host."""
    for p, state in optimizer.state.items():
        step = state.get("step")
        if isinstance(step, torch.Tensor) and step.device != p.device:
            state["step"] = step.to(p.device)
