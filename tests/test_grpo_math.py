"""The GRPO maths against hand-computed values (no model needed)."""

import math
import random

import pytest
import torch

from ttrv.grpo import clipped_surrogate, kl_k3, lr_factor, select_trained


def test_surrogate_at_ratio_one_is_minus_advantage_weighted_tokens():
    """Guards the sign: a positive advantage must lower the loss when logp rises."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    loss = clipped_surrogate(logp, logp.detach(), adv, mask, clip_eps=0.2)
    # ratio = 1 everywhere: loss = -(2*1 + 2*1 + (-1)*1) = -3 (masked token excluded)
    assert loss.item() == pytest.approx(-3.0)
    loss.backward()
    # d loss / d logp = -A * ratio on unmasked tokens
    assert torch.allclose(logp.grad, torch.tensor([[-2.0, -2.0], [1.0, 0.0]]))


def test_surrogate_clips_large_ratios():
    """Guards PPO clipping: beyond 1+eps a positive advantage earns no more."""
    old = torch.zeros(1, 1)
    new = torch.full((1, 1), math.log(2.0))  # ratio 2
    loss = clipped_surrogate(new, old, torch.tensor([1.0]), torch.ones(1, 1), clip_eps=0.2)
    assert loss.item() == pytest.approx(-1.2)
    # negative advantage: min(2*-1, 1.2*-1) = -2 -> loss 2 (pessimistic bound)
    loss = clipped_surrogate(new, old, torch.tensor([-1.0]), torch.ones(1, 1), clip_eps=0.2)
    assert loss.item() == pytest.approx(2.0)


def test_kl_k3_values():
    """k3 = exp(d) - d - 1 with d = ref - logp: zero when equal, positive otherwise."""
    logp = torch.tensor([-1.0, -1.0, -2.0])
    ref = torch.tensor([-1.0, -2.0, -1.0])
    expected = [0.0, math.exp(-1) + 1 - 1, math.exp(1) - 1 - 1]
    assert torch.allclose(kl_k3(logp, ref), torch.tensor(expected), atol=1e-6)


def test_select_trained_picks_k_of_n_reproducibly():
    a = select_trained(16, 5, random.Random(3))
    b = select_trained(16, 5, random.Random(3))
    assert a == b and sum(a) == 5 and len(a) == 16
    assert select_trained(4, 4, random.Random(0)) == [True] * 4


@pytest.mark.parametrize(
    ("step", "schedule", "expected"),
    [
        (0, "cosine", 0.5),  # warm-up 2 steps: (0+1)/2
        (1, "cosine", 1.0),
        (2, "cosine", 1.0),  # start of cosine
        (7, "cosine", 0.5 * (1 + math.cos(math.pi * 5 / 10))),
        (12, "cosine", 0.0),
        (7, "linear", 0.5),
        (7, "constant", 1.0),
    ],
)
def test_lr_factor(step, schedule, expected):
    assert lr_factor(step, total=12, warmup=2, schedule=schedule) == pytest.approx(expected)
