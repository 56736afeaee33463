"""Label-free rewards over one image's group of N answers, and GRPO advantages.

Every reward has the signature `RewardFn`: canonical answers in (see `ttrv.answers`), one
dict per rollout out, holding its components (logged per rollout) and "total". Every dict
also holds "valid" (1.0 / 0.0).

`REWARDS` is the one registry of rewards: name -> how to build it, the `RewardConfig`
parameters it takes and its default advantage scope. The config's choices
(`ttrv.config.RewardKind`), `RewardConfig.scope()`, `make_reward` and the reward tests all
read it, so adding a reward is one entry here plus its test.

How this departs from the paper and its code (facts in shared/notes/ttrv-reference.md):

1. The entropy term cancels under per-image advantages. TTRV's R = p(a) - alpha * H is
   the same H for every rollout of an image, so (R - mean_group) / std_group does not
   depend on alpha at all; the released code normalises per group and its entropy term
   never reaches the gradient. `group_advantages(..., scope="group")` is that paper-exact
   form. `scope="batch"` centres and scales by the whole step's rewards instead, so an
   image whose answers agree (low H) has all its rollouts pushed up relative to images
   whose answers disagree. Any per-group centring would cancel the term again.
2. Invalid answers (`INVALID`) never form a winning cluster: their frequency reward is 0,
   and each one counts as a cluster of its own in the entropy ("agrees with nothing", as
   in EMPO), so a group of empty outputs has maximal entropy, not zero. An invalid rollout
   still takes its group's entropy term (total = -alpha * H): with a 0 total instead, a
   group whose valid answers all disagree (p = 0.25, Hn = 1: 0.25 - 0.75 < 0) would rank
   its invalid rollouts above its valid ones and teach the model to answer nothing, the
   collapse seen in the reference logs. This way valid - invalid = p > 0 within every group,
   and the entropy term still cancels exactly under group scope.
3. `ttrv_paper_reward` reproduces the released code's formula instead: INVALID is one
   ordinary answer (the code counted the empty string as an answer) with its own frequency
   reward and no penalty, and the entropy is over those clusters. Only the reward is
   reproduced; answer extraction is this project's (`ttrv.answers`), not the code's regex.
4. Majority ties: every answer tied for the top count gets 1 (no arbitrary tie-break that
   would depend on sampling order). The majority is taken over valid answers only.

Entropy is in nats, or divided by log M (M = number of clusters; 0 when M = 1) when
`normalize_entropy` is set. Advantages use the unbiased standard deviation (ddof = 1),
as torch.std does in verl and TRL.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from .answers import INVALID

if TYPE_CHECKING:  # config reads the registry below, so it cannot be imported at run time
    from .config import RewardConfig

RewardFn = Callable[[Sequence[str]], list[dict[str, float]]]
Scope = Literal["group", "batch"]


def _entropy(counts: Sequence[int], normalize: bool) -> float:
    n = sum(counts)
    if n == 0:
        return 0.0
    h = -sum(c / n * math.log(c / n) for c in counts if c)
    if not normalize:
        return h
    m = sum(1 for c in counts if c)
    return h / math.log(m) if m > 1 else 0.0


def _clusters(answers: Sequence[str]) -> list[int]:
    """Cluster sizes: equal valid answers pool, each INVALID is a cluster of its own."""
    counts = Counter(a for a in answers if a != INVALID)
    return list(counts.values()) + [1] * sum(1 for a in answers if a == INVALID)


def answer_entropy(answers: Sequence[str], normalize: bool = False) -> float:
    """Entropy of a group's answers, each INVALID counting as a cluster of its own.

    >>> round(answer_entropy(["7", "7", "7", "1"]), 4)  # -(.75 ln .75 + .25 ln .25)
    0.5623
    >>> round(answer_entropy(["7", "7", "7", "1"], normalize=True), 4)  # / ln 2
    0.8113
    >>> answer_entropy([INVALID, INVALID], normalize=True)  # two singletons: ln 2 / ln 2
    1.0
    """
    return _entropy(_clusters(answers), normalize)


def _valid(answer: str) -> float:
    return 0.0 if answer == INVALID else 1.0


def _neg(h: float) -> float:
    return -h if h else 0.0  # no -0.0 in the logs


def ttrv_reward(
    answers: Sequence[str], alpha: float = 0.75, normalize_entropy: bool = True
) -> list[dict[str, float]]:
    """TTRV: frequency p(a) over all N rollouts + alpha * (-H); invalid earns frequency 0.

    >>> [r["total"] for r in ttrv_reward(["7", "7", INVALID, INVALID], alpha=0.0)]
    [0.5, 0.5, 0.0, 0.0]
    """
    n = len(answers)
    counts = Counter(a for a in answers if a != INVALID)
    h = answer_entropy(answers, normalize_entropy)
    out = []
    for a in answers:
        freq = counts[a] / n if a != INVALID else 0.0
        out.append(
            {
                "frequency": freq,
                "neg_entropy": _neg(h),
                "valid": _valid(a),
                "total": freq - alpha * h,
            }
        )
    return out


def ttrv_paper_reward(
    answers: Sequence[str], alpha: float = 0.75, normalize_entropy: bool = True
) -> list[dict[str, float]]:
    """The released code's reward: p(a) - alpha * H / log M, INVALID an ordinary answer.

    Meant for group scope only: a group of nothing but INVALID scores the maximum, 1.0.

    H = -(.5 ln .5 + 2 * .25 ln .25) = 1.0397, Hn = H / ln 3 = 0.9464, 0.75 * Hn = 0.7098:

    >>> [round(r["total"], 4) for r in ttrv_paper_reward([INVALID, INVALID, "7", "1"])]
    [-0.2098, -0.2098, -0.4598, -0.4598]
    """
    n = len(answers)
    counts = Counter(answers)
    h = _entropy(list(counts.values()), normalize_entropy)
    return [
        {
            "frequency": counts[a] / n,
            "neg_entropy": _neg(h),
            "valid": _valid(a),
            "total": counts[a] / n - alpha * h,
        }
        for a in answers
    ]


def frequency_reward(answers: Sequence[str]) -> list[dict[str, float]]:
    """p(a) over all N rollouts; invalid 0.

    >>> [r["total"] for r in frequency_reward(["7", "7", "1", INVALID])]
    [0.5, 0.5, 0.25, 0.0]
    """
    return [
        {"frequency": r["frequency"], "valid": r["valid"], "total": r["frequency"]}
        for r in ttrv_reward(answers, alpha=0.0)
    ]


def majority_reward(answers: Sequence[str]) -> list[dict[str, float]]:
    """TTRL's hard reward: 1 for the most common valid answer (all tied ones), else 0.

    >>> [r["total"] for r in majority_reward(["7", "1", "1", "7", "2"])]
    [1.0, 1.0, 1.0, 1.0, 0.0]
    >>> [r["total"] for r in majority_reward([INVALID, INVALID, INVALID, "7"])]
    [0.0, 0.0, 0.0, 1.0]
    """
    n = len(answers)
    counts = Counter(a for a in answers if a != INVALID)
    top = max(counts.values(), default=0)
    out = []
    for a in answers:
        win = 1.0 if a != INVALID and counts[a] == top else 0.0
        freq = counts[a] / n if a != INVALID else 0.0
        out.append({"majority": win, "frequency": freq, "valid": _valid(a), "total": win})
    return out


def entropy_reward(
    answers: Sequence[str], normalize_entropy: bool = True
) -> list[dict[str, float]]:
    """TENT-like: total = -H for every rollout of the group (invalid rollouts included).

    Constant within a group, so it gives all-zero advantages under group scope; it acts
    only under batch scope, where it ranks whole images by how much their answers agree.

    >>> {r["total"] for r in entropy_reward(["7", "7", "1", "1"])}
    {-1.0}
    """
    h = answer_entropy(answers, normalize_entropy)
    return [{"neg_entropy": _neg(h), "valid": _valid(a), "total": _neg(h)} for a in answers]


def make_random_reward(seed: int = 0) -> RewardFn:
    """A control: each rollout gets an independent uniform [0, 1) total from a seeded stream.

    >>> fn = make_random_reward(3)
    >>> fn(["7", "1"]) == make_random_reward(3)(["7", "1"])
    True
    """
    rng = random.Random(seed)

    def random_reward(answers: Sequence[str]) -> list[dict[str, float]]:
        out = []
        for a in answers:
            u = rng.random()
            out.append({"random": u, "valid": _valid(a), "total": u})
        return out

    return random_reward


@dataclass(frozen=True)
class Reward:
    """One registered reward.

    `build(**params)` returns the reward function with its parameters bound; `params`
    names them: `RewardConfig` fields, or "seed" (a seed per step, for stochastic rewards).
    `scope` is the advantage scope that `advantage_scope="auto"` picks: "batch" for a
    reward whose entropy term is constant within an image's group (per-image
    normalisation would cancel it), "group" otherwise.
    """

    build: Callable[..., RewardFn]
    params: tuple[str, ...]
    scope: Scope
    summary: str


def _bind(fn: Callable[..., list[dict[str, float]]]) -> Callable[..., RewardFn]:
    """A builder that binds keyword parameters of a plain reward function."""
    return lambda **params: partial(fn, **params) if params else fn


REWARDS: dict[str, Reward] = {
    "ttrv": Reward(
        _bind(ttrv_reward),
        ("alpha", "normalize_entropy"),
        "batch",
        "frequency + alpha * negative entropy with batch-scope advantages (the entropy term "
        "reaches the gradient)",
    ),
    "ttrv_paper": Reward(
        _bind(ttrv_paper_reward),
        ("alpha", "normalize_entropy"),
        "group",
        "the reference code's form (per-image normalisation, entropy cancels)",
    ),
    "frequency": Reward(_bind(frequency_reward), (), "group", "p(a) over the N rollouts"),
    "majority": Reward(_bind(majority_reward), (), "group", "1 for the top answer (TTRL)"),
    "entropy": Reward(
        _bind(entropy_reward), ("normalize_entropy",), "batch", "-H of the group (TENT-like)"
    ),
    "random": Reward(make_random_reward, ("seed",), "group", "uniform noise (a control)"),
}


def make_reward(cfg: RewardConfig, seed: int = 0) -> RewardFn:
    """The reward function `cfg` names, with its parameters bound from `cfg` (and `seed`)."""
    entry = REWARDS[cfg.reward]
    values: dict[str, Any] = {"seed": seed}
    params = {p: values[p] if p in values else getattr(cfg, p) for p in entry.params}
    return entry.build(**params)


# ---------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and unbiased standard deviation; std 0 for fewer than 2 or all-equal values."""
    if not values:
        return 0.0, 0.0
    mean = math.fsum(values) / len(values)
    if len(values) < 2 or max(values) == min(values):
        return mean, 0.0
    var = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def group_advantages(
    rewards: Sequence[Sequence[float]],
    scope: Literal["group", "batch"] = "group",
    eps: float = 1e-6,
) -> list[list[float]]:
    """GRPO advantages for one step: `rewards[g][i]` is rollout i of image g.

    group: (r - mean_g) / (std_g + eps), per image (paper-exact; a group's constant terms
    cancel). batch: (r - mean_all) / (std_all + eps) over every rollout of the step.
    Rewards that are all equal (within a group for "group", in the step for "batch") give
    exact zeros.

    >>> group_advantages([[0.75, 0.75, 0.75, 0.25]], eps=0.0)  # mean .625, std .25
    [[0.5, 0.5, 0.5, -1.5]]
    >>> group_advantages([[1.0, 1.0], [0.0, 0.0]], scope="batch", eps=0.0)  # std 1/sqrt(3)
    [[0.866..., 0.866...], [-0.866..., -0.866...]]
    """
    if scope == "group":
        out = []
        for group in rewards:
            mean, std = _mean_std(group)
            out.append([0.0 if std == 0 else (r - mean) / (std + eps) for r in group])
        return out
    if scope == "batch":
        mean, std = _mean_std([r for group in rewards for r in group])
        return [[0.0 if std == 0 else (r - mean) / (std + eps) for r in group] for group in rewards]
    raise ValueError(f"Unknown advantage scope {scope!r}: use 'group' or 'batch'.")


def zero_advantage_groups(advantages: Sequence[Sequence[float]], atol: float = 1e-12) -> list[bool]:
    """Which groups carry no learning signal (every advantage zero): skip their backward.

    >>> zero_advantage_groups(group_advantages([[1.0, 1.0], [1.0, 0.0]]))
    [True, False]
    """
    return [all(abs(a) <= atol for a in group) for group in advantages]
