"""The fast paths compute the loss they claim: batched vs naive, and ours vs TRL's.

The engine scores all K completions of an image in one batch, on cached image features,
with logits only for completion positions (`logits_to_keep`), and accumulates the token-mean
loss group by group. `test_batched_update_matches_naive_reference` checks that against a
deliberately naive implementation written here: one completion at a time, pixels
re-encoded, full-sequence logits, a Python loop over tokens. `test_loss_matches_trl`
(needs `trl`, from requirements-bench.txt) checks the same rollouts through TRL's
`GRPOTrainer._compute_loss`, so the speed comparison in `bench.speed` compares equal work.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ttrv.adapt import make_policy, trainable_params
from ttrv.config import (
    AdaptConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RolloutConfig,
    TaskConfig,
)
from ttrv.grpo import grpo_update
from ttrv.loading import load_model
from ttrv.lora import attach_lora
from ttrv.rollout import rollout_group
from ttrv.tasks import Item, image_sha256

# float32 on CPU: measured differences are ~1e-7 relative (docs/performance.md).
GRAD_RTOL = 1e-4
LOSS_ATOL = 1e-6

TASK = TaskConfig(kind="multiple_choice", options="cat,dog,bird,fish")


def _items(n: int) -> list[Item]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
        out.append(Item(image_sha256(image), f"img{i}", image))
    return out


class _CaptureOptimizer:
    """Stands in for AdamW: keeps the gradients `grpo_update` hands to `step()`."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.grads: list[torch.Tensor] = []
        self.param_groups = [{"lr": 0.0}]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        self.grads = [p.grad.detach().clone() for p in self.params]


def _naive_loss(
    model, processor, groups, advantages, temperature: float, clip_eps: float, beta: float
) -> torch.Tensor:
    """Token-mean clipped surrogate (+ beta * k3 KL), one sequence and one token at a time."""
    total_tokens = sum(len(c) for g in groups for c in g.completions)
    loss = torch.zeros(())
    for g, adv in zip(groups, advantages, strict=True):
        enc = g.encoded[0]
        batch = processor(text=[enc.text], images=[g.item.image], return_tensors="pt")
        for completion, a in zip(g.completions, adv, strict=True):
            ids = torch.cat([batch["input_ids"][0], completion]).unsqueeze(0)
            pixels = batch["pixel_values"]
            logits = model(input_ids=ids, pixel_values=pixels).logits[0]  # [P+T, V]
            with torch.no_grad(), model.disable_adapter():
                ref_logits = model(input_ids=ids, pixel_values=pixels).logits[0]
            p = batch["input_ids"].shape[1]
            for j, token in enumerate(completion.tolist()):
                logp = torch.log_softmax(logits[p + j - 1] / temperature, -1)[token]
                ratio = torch.exp(logp - logp.detach())
                clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
                loss = loss - torch.minimum(ratio * a, clipped * a)
                if beta > 0:
                    ref = torch.log_softmax(ref_logits[p + j - 1] / temperature, -1)[token]
                    d = ref - logp
                    loss = loss + beta * (torch.exp(d) - d - 1)
    return loss / total_tokens


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_batched_update_matches_naive_reference(tiny_model_dir, beta):
    """Guards the batched GRPO step (cached image features, `logits_to_keep`, per-group
    accumulation of a token-mean loss, KL against the disabled adapter): any slip in
    padding, position alignment, temperature or normalisation changes the gradient."""
    cfg = AdaptConfig(
        model=ModelConfig(model=str(tiny_model_dir("llava"))),
        lora=LoraConfig(rank=4, alpha=8),
        task=TASK,
        rollout=RolloutConfig(n_rollouts=4, n_train=4, max_new_tokens=5, temperature=0.7),
        optim=OptimConfig(beta=beta),
    )
    loaded = load_model(cfg.model)
    loaded.model = attach_lora(loaded.model, cfg.lora, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-zero adapter: KL and lora_A gradients are then non-trivial
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    policy = make_policy(loaded)
    params = list(trainable_params(loaded.model).values())
    torch.manual_seed(0)
    groups = [rollout_group(policy, it, TASK, cfg.rollout, [None]) for it in _items(2)]
    for g in groups:
        g.train_mask = [True] * len(g.completions)
    advantages = [torch.randn(len(g.completions), generator=gen).tolist() for g in groups]

    optimizer = _CaptureOptimizer(params)
    stats = grpo_update(
        policy, groups, advantages, optimizer, params, 0.7, 0.2, beta, grad_clip=0.0
    )
    batched = optimizer.grads

    loaded.model.train()
    for p in params:
        p.grad = None
    naive = _naive_loss(loaded.model, loaded.processor, groups, advantages, 0.7, 0.2, beta)
    naive.backward()
    reference = [p.grad for p in params]

    assert stats.tokens == sum(len(c) for g in groups for c in g.completions)
    assert stats.groups_skipped == 0
    assert math.isclose(stats.loss, float(naive.detach()), abs_tol=LOSS_ATOL)
    scale = max(float(g.abs().max()) for g in reference)
    assert scale > 0
    worst = max(float((a - b).abs().max()) for a, b in zip(batched, reference, strict=True))
    assert worst / scale < GRAD_RTOL


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("trl") is None,
    reason="trl is not installed (benchmark-only: pip install -r requirements-bench.txt)",
)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_matches_trl(tiny_model_dir, beta):
    """Guards the claim that bench.speed times equal work: the same rollouts, advantages and
    (perturbed, so PPO clipping acts) old log-probs give the same per-token log-probs, loss
    and LoRA gradients in our path and in TRL's `GRPOTrainer._compute_loss`."""
    from bench.trl_compare import GRAD_RTOL as TRL_GRAD_RTOL
    from bench.trl_compare import LOGP_ATOL, loss_equivalence

    r = loss_equivalence(str(tiny_model_dir("llava")), beta=beta)
    assert r["prompts_identical"], "TRL tokenised a different prompt"
    assert r["tokens_outside_clip_range"] > 0, "the check should exercise clipping"
    assert r["logp_max_abs_diff"] <= LOGP_ATOL
    assert r["loss_abs_diff"] <= LOSS_ATOL
    assert r["grad_max_rel_diff"] <= TRL_GRAD_RTOL
