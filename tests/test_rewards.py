"""Rewards and advantages against hand-computed numbers (the arithmetic is in the comments)."""

from __future__ import annotations

import doctest
import itertools
import math
import random

import pytest

import ttrv.rewards
from ttrv.answers import INVALID
from ttrv.config import RewardConfig, field_choices
from ttrv.rewards import (
    REWARDS,
    answer_entropy,
    entropy_reward,
    frequency_reward,
    group_advantages,
    majority_reward,
    make_random_reward,
    make_reward,
    ttrv_paper_reward,
    ttrv_reward,
    zero_advantage_groups,
)

I = INVALID  # noqa: E741
# ["7", "7", "7", "1"]: p = .75 / .25, H = -(.75 ln .75 + .25 ln .25) = 0.21576 + 0.34657
H_7771 = 0.5623351446
HN_7771 = H_7771 / math.log(2)  # 0.8112781245
# ["7", "7", I, I] with each INVALID its own cluster: sizes 2, 1, 1 of 4
H_77II = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))  # 0.34657 + 0.69315 = 1.0397208
HN_77II = H_77II / math.log(3)  # 1.0397208 / 1.0986123 = 0.9463946


def totals(rows):
    return [r["total"] for r in rows]


def test_doctests():
    """The examples in the module's docstrings stay true."""
    result = doctest.testmod(ttrv.rewards, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_hand_computed_constants():
    assert pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))) == H_7771
    assert pytest.approx(0.8112781245) == HN_7771
    assert pytest.approx(0.9463946304) == HN_77II


def test_answer_entropy():
    assert answer_entropy(["7", "7", "7", "1"]) == pytest.approx(H_7771)
    assert answer_entropy(["7", "7", "7", "1"], normalize=True) == pytest.approx(HN_7771)
    assert answer_entropy(["7"] * 4, normalize=True) == 0.0  # M = 1
    assert answer_entropy(["7", "7", I, I], normalize=True) == pytest.approx(HN_77II)
    assert answer_entropy([I] * 4) == pytest.approx(math.log(4))  # four singletons


def test_ttrv_reward_hand_computed():
    rows = ttrv_reward(["7", "7", "7", "1"], alpha=0.75)
    # .75 - .75 * .81128 = .75 - .60846 = .14154 ; .25 - .60846 = -.35846
    assert totals(rows) == pytest.approx([0.1415414, 0.1415414, 0.1415414, -0.3584586])
    assert [r["frequency"] for r in rows] == [0.75, 0.75, 0.75, 0.25]
    assert [r["neg_entropy"] for r in rows] == pytest.approx([-HN_7771] * 4)
    raw = ttrv_reward(["7", "7", "7", "1"], alpha=0.75, normalize_entropy=False)
    # .75 - .75 * .56234 = .75 - .42175 = .32825 ; .25 - .42175 = -.17175
    assert totals(raw) == pytest.approx([0.3282486, 0.3282486, 0.3282486, -0.1717514])


def test_ttrv_reward_invalid_hand_computed():
    """Invalid: frequency 0, own cluster in H, and the group's entropy term like everyone."""
    rows = ttrv_reward(["7", "7", I, I], alpha=0.75)
    # valid: .5 - .75 * .94639 = .5 - .70980 = -.20980 ; invalid: 0 - .70980
    assert totals(rows) == pytest.approx([-0.2097960, -0.2097960, -0.7097960, -0.7097960])
    assert [r["frequency"] for r in rows] == [0.5, 0.5, 0.0, 0.0]
    assert [r["valid"] for r in rows] == [1.0, 1.0, 0.0, 0.0]
    # all invalid: four singletons, Hn = ln 4 / ln 4 = 1 -> -.75 each (not the top score)
    assert totals(ttrv_reward([I] * 4)) == pytest.approx([-0.75] * 4)


def test_ttrv_valid_always_beats_invalid_in_its_group():
    """Guards the collapse to empty output: with invalid = 0 total, ["1","2","3",I] would
    score valid .25 - .75 = -.5 below the invalid rollout and teach the model to say nothing."""
    assert totals(ttrv_reward(["1", "2", "3", I])) == pytest.approx([-0.5, -0.5, -0.5, -0.75])
    rng = random.Random(0)
    for _ in range(300):
        group = [rng.choice(["1", "2", "3", I]) for _ in range(rng.randint(2, 12))]
        for normalize in (True, False):
            rows = ttrv_reward(group, alpha=0.75, normalize_entropy=normalize)
            valid = [r["total"] for r in rows if r["valid"]]
            invalid = [r["total"] for r in rows if not r["valid"]]
            if valid and invalid:
                assert min(valid) > max(invalid)


def test_ttrv_paper_reward_hand_computed():
    """The released code: INVALID is an ordinary answer with its own frequency, no penalty."""
    rows = ttrv_paper_reward(["7", "7", "7", "1"], alpha=0.75)
    assert totals(rows) == pytest.approx(totals(ttrv_reward(["7", "7", "7", "1"])))
    # ["7","7",I,I]: two clusters of 2, H = ln 2, Hn = 1 -> .5 - .75 = -.25 for all four
    assert totals(ttrv_paper_reward(["7", "7", I, I])) == pytest.approx([-0.25] * 4)
    # all invalid: one cluster, p = 1, Hn = 0 -> 1.0 (why it suits group scope only)
    assert totals(ttrv_paper_reward([I] * 4)) == [1.0] * 4


def test_frequency_reward():
    # p over all N = 4: "7" 2/4, "1" 1/4, invalid 0
    assert totals(frequency_reward(["7", "7", "1", I])) == [0.5, 0.5, 0.25, 0.0]


def test_majority_reward_ties_and_invalid():
    """Ties: every top answer wins. Invalid never wins, even when it is the most common."""
    assert totals(majority_reward(["7", "7", "7", "1"])) == [1.0, 1.0, 1.0, 0.0]
    assert totals(majority_reward(["7", "1", "1", "7", "2"])) == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert totals(majority_reward([I, I, I, "7", "7", "1"])) == [0, 0, 0, 1.0, 1.0, 0]
    assert totals(majority_reward([I, I])) == [0.0, 0.0]


def test_entropy_reward():
    # ["7","7","1","1"]: H = ln 2 = .69315, Hn = 1
    assert totals(entropy_reward(["7", "7", "1", "1"])) == [-1.0] * 4
    raw = entropy_reward(["7", "7", "1", "1"], normalize_entropy=False)
    assert totals(raw) == pytest.approx([-0.6931472] * 4)
    assert totals(entropy_reward(["7"] * 3)) == [0.0] * 3
    # invalid rollouts take the group's -H too: ["7","7",I,I] -> -.94639 each
    assert totals(entropy_reward(["7", "7", I, I])) == pytest.approx([-HN_77II] * 4)


def test_random_reward_is_seeded_and_advances():
    a, b = make_random_reward(5), make_random_reward(5)
    first = totals(a(["7", "1", I]))
    assert first == totals(b(["7", "1", I]))
    assert all(0.0 <= u < 1.0 for u in first)
    assert totals(a(["7", "1", I])) != first  # the stream moves on
    assert totals(make_random_reward(6)(["7", "1", I])) != first


# Every registered reward's totals on ["7", "7", I, I] with the default RewardConfig (seed 0).
# A new reward in ttrv.rewards.REWARDS needs its line here: the test below fails without it.
EXPECTED_77II = {
    "ttrv": [-0.2097960, -0.2097960, -0.7097960, -0.7097960],
    "ttrv_paper": [-0.25] * 4,
    "frequency": [0.5, 0.5, 0.0, 0.0],
    "majority": [1.0, 1.0, 0.0, 0.0],
    "entropy": [-HN_77II] * 4,
    "random": totals(make_random_reward(0)(["7", "7", I, I])),
}


def test_every_registered_reward_has_expected_totals():
    assert set(EXPECTED_77II) == set(REWARDS)


@pytest.mark.parametrize("kind", list(REWARDS))
def test_make_reward(kind):
    fn = make_reward(RewardConfig(reward=kind))
    assert totals(fn(["7", "7", I, I])) == pytest.approx(EXPECTED_77II[kind])


def test_config_choices_and_scope_come_from_the_registry():
    """RewardConfig offers exactly the registered rewards, and `auto` picks each one's own
    scope; an explicit scope still wins."""
    assert field_choices(RewardConfig, "reward") == tuple(REWARDS)
    for name, entry in REWARDS.items():
        assert RewardConfig(reward=name).scope() == entry.scope
        assert RewardConfig(reward=name, advantage_scope="group").scope() == "group"
    assert {n for n, r in REWARDS.items() if r.scope == "batch"} == {"ttrv", "entropy"}


@pytest.mark.parametrize("kind", list(REWARDS))
def test_registered_parameters_exist_and_are_bound(kind):
    """Each declared parameter is a RewardConfig field (or the step's seed) and changes the
    reward: a parameter declared but never passed on would be silently ignored."""
    fields = set(RewardConfig.__dataclass_fields__) | {"seed"}
    group = ["7", "7", "7", "1", I]
    for param in REWARDS[kind].params:
        assert param in fields
        if param == "seed":
            a, b = (
                make_reward(RewardConfig(reward=kind), seed=1),
                make_reward(RewardConfig(reward=kind), seed=2),
            )
        else:
            other = {"alpha": 0.1, "normalize_entropy": False}[param]
            a = make_reward(RewardConfig(reward=kind))
            b = make_reward(RewardConfig(reward=kind, **{param: other}))
        assert totals(a(group)) != pytest.approx(totals(b(group))), param


@pytest.mark.parametrize("kind", list(REWARDS))
def test_default_scope_lets_the_reward_act(kind):
    """A reward whose total is the same for every rollout of an image (entropy) gives only
    zero advantages per image: its registered scope must be batch."""
    step = [["7", "7", "7", "1"], ["3", "1", "2", I], ["4", "4", "4", "4"]]
    fn = make_reward(RewardConfig(reward=kind))
    rewards = [totals(fn(g)) for g in step]
    advantages = group_advantages(rewards, scope=REWARDS[kind].scope)
    assert not all(zero_advantage_groups(advantages))
    if all(len(set(g)) == 1 for g in rewards):
        assert REWARDS[kind].scope == "batch"


def test_make_reward_binds_alpha_and_normalisation():
    fn = make_reward(RewardConfig(reward="ttrv_paper", alpha=0.5, normalize_entropy=False))
    # .75 - .5 * .56234 = .46883 ; .25 - .28117 = -.03117
    assert totals(fn(["7", "7", "7", "1"])) == pytest.approx([0.4688324] * 3 + [-0.0311676])
    rnd = make_reward(RewardConfig(reward="random"), seed=3)
    assert totals(rnd(["7"])) == totals(make_random_reward(3)(["7"]))


def test_every_reward_logs_components_and_total():
    for kind in REWARDS:
        rows = make_reward(RewardConfig(reward=kind))(["7", "1", I])
        assert len(rows) == 3
        for row in rows:
            assert {"total", "valid"} <= set(row) and len(row) >= 3
            assert all(isinstance(v, float) for v in row.values())


# --------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------


def test_group_advantages_hand_computed():
    # [.75,.75,.75,.25]: mean .625, deviations .125 x3 and -.375,
    # unbiased var = (3 * .015625 + .140625) / 3 = .0625, std = .25
    assert group_advantages([[0.75, 0.75, 0.75, 0.25]], eps=0.0) == [[0.5, 0.5, 0.5, -1.5]]
    with_eps = group_advantages([[0.75, 0.75, 0.75, 0.25]])[0]
    assert with_eps == pytest.approx([0.125 / (0.25 + 1e-6)] * 3 + [-0.375 / (0.25 + 1e-6)])


def test_batch_advantages_hand_computed():
    # all 8 rewards: mean 4/8 = .5; deviations .25 x4 (incl. the .75s) and -.25 / 0 ;
    # unbiased var = 6 * .0625 / 7 = .053571, std = .231455, .25 / .231455 = 1.080123
    rewards = [[0.75, 0.75, 0.75, 0.25], [0.5, 0.5, 0.25, 0.25]]
    adv = group_advantages(rewards, scope="batch", eps=0.0)
    k = 1.0801234497
    assert adv[0] == pytest.approx([k, k, k, -k])
    assert adv[1] == pytest.approx([0.0, 0.0, -k, -k])


def test_equal_rewards_give_exact_zero_advantages():
    """The "loss is 0" case: a group that agrees teaches nothing under group scope."""
    adv = group_advantages([[0.1, 0.1, 0.1], [1.0, 0.0, 1.0], [0.3]])
    assert adv[0] == [0.0, 0.0, 0.0]  # exactly, despite 0.1 + 0.1 + 0.1 != 0.3
    assert adv[2] == [0.0]  # a lone rollout has no group to compare with
    assert zero_advantage_groups(adv) == [True, False, True]
    # under batch scope the same agreeing group is ranked against the other images
    batch = group_advantages([[0.1, 0.1], [0.5, 0.5]], scope="batch")
    assert zero_advantage_groups(batch) == [False, False]
    assert group_advantages([[0.2, 0.2], [0.2]], scope="batch") == [[0.0, 0.0], [0.0]]


def test_unknown_scope():
    with pytest.raises(ValueError, match="scope"):
        group_advantages([[1.0, 0.0]], scope="image")  # type: ignore[arg-type]


STEP = [["7", "7", "7", "1"], ["3", "3", "1", "2"], ["5", I, "5", I], ["4", "4", "4", "4"]]


def _advantages(alpha: float, scope: str, normalize: bool = True) -> list[list[float]]:
    rewards = [totals(ttrv_reward(g, alpha=alpha, normalize_entropy=normalize)) for g in STEP]
    return group_advantages(rewards, scope=scope)  # type: ignore[arg-type]


@pytest.mark.parametrize("normalize", [True, False])
def test_entropy_term_cancels_under_group_scope(normalize):
    """The flaw in the released code: per-image normalisation makes alpha irrelevant."""
    a0, a75 = _advantages(0.0, "group", normalize), _advantages(0.75, "group", normalize)
    for g0, g75 in zip(a0, a75, strict=True):
        assert g75 == pytest.approx(g0, abs=1e-9)


@pytest.mark.parametrize("normalize", [True, False])
def test_entropy_term_reaches_advantages_under_batch_scope(normalize):
    """Batch scope lets the entropy term act: agreeing images are pushed up as a whole."""
    a0, a75 = _advantages(0.0, "batch", normalize), _advantages(0.75, "batch", normalize)
    flat0, flat75 = list(itertools.chain(*a0)), list(itertools.chain(*a75))
    assert max(abs(x - y) for x, y in zip(flat0, flat75, strict=True)) > 0.1
    mean = [sum(g) / len(g) for g in a75]
    mean0 = [sum(g) / len(g) for g in a0]
    # the unanimous image (H = 0) gains relative to the split one (["3","3","1","2"])
    assert mean[3] - mean[1] > mean0[3] - mean0[1]
