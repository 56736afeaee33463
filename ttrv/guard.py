"""The guard: unsupervised signals that adaptation is doing harm, and what to do about it.

Self-consistency rewards sharpen whatever the model already prefers, biases included
(see docs/benchmark.md). No label tells us when that happens, so the guard watches signals
that need none, compared with the model before adaptation:

- the entropy of the greedy answers across images (the answer marginal) falling: the model
  is collapsing onto fewer answers than it gave before;
- answers disappearing from the marginal altogether;
- the invalid rate rising (collapse onto empty or off-format output);
- too many images changing their answer: the share of images whose valid greedy answer
  before adaptation is now another valid answer (a behavioural trust region: on the
  benchmark's val split, runs that harmed had moved many answers while the selected
  setting's gains moved few);
- the KL to the base model growing past a bound (when it is measured).

Every function here is pure; the adaptation loop calls `check` after each round and
decides to roll back to the best checkpoint and stop when it trips.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .answers import INVALID
from .config import GuardConfig


def marginal_entropy(answers: Sequence[str]) -> float:
    """Entropy (nats) of the distribution of answers across images, invalid included."""
    if not answers:
        return 0.0
    counts = Counter(answers)
    n = len(answers)
    return -sum(c / n * math.log(c / n) for c in counts.values())


@dataclass
class Signals:
    marginal_entropy: float
    distinct: int
    invalid_rate: float
    kl: float | None = None
    # Multiple choice: entropy of the chosen option *positions* (letters). Voting over
    # contents hides a letter-slot bias that wipes out one letter (the miniature study's "B").
    position_entropy: float | None = None
    # Share of images whose valid answer before adaptation is now another valid answer
    # (`changed_share`); None for the signals before adaptation.
    changed_answers: float | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def changed_share(before: Sequence[str], now: Sequence[str]) -> float:
    """Share of the images with a valid answer before whose answer is now another valid one.

    Invalid -> valid (an off-format model learning the format) and valid -> invalid (counted
    by the invalid rate) do not count; 0.0 when no image had a valid answer before.

    >>> changed_share(["1", "2", INVALID, "4"], ["1", "3", "5", INVALID])
    0.3333333333333333
    """
    if len(before) != len(now):
        raise ValueError(f"{len(before)} answers before adaptation but {len(now)} now.")
    valid = [i for i, a in enumerate(before) if a != INVALID]
    moved = sum(now[i] != before[i] and now[i] != INVALID for i in valid)
    return moved / len(valid) if valid else 0.0


def signals(
    answers: Sequence[str],
    kl: float | None = None,
    positions: Sequence[int] | None = None,
    before: Sequence[str] | None = None,
) -> Signals:
    """Signals of one set of greedy answers (one per image); `positions` are the chosen
    option indices of a multiple-choice task (invalid answers left out); `before` are the
    same images' greedy answers before adaptation (for `changed_answers`)."""
    n = max(1, len(answers))
    valid = {a for a in answers if a != INVALID}
    return Signals(
        marginal_entropy=marginal_entropy(answers),
        distinct=len(valid),
        invalid_rate=sum(a == INVALID for a in answers) / n,
        kl=kl,
        position_entropy=marginal_entropy([str(p) for p in positions]) if positions else None,
        changed_answers=changed_share(before, answers) if before is not None else None,
    )


@dataclass
class Verdict:
    tripped: bool
    reason: str


def check(base: Signals, now: Signals, cfg: GuardConfig) -> Verdict:
    """Has adaptation moved the unsupervised signals past the configured bounds?"""
    reasons = []
    if base.marginal_entropy > 0:
        drop = 1 - now.marginal_entropy / base.marginal_entropy
        if drop > cfg.max_marginal_entropy_drop:
            reasons.append(
                f"answer diversity across images fell by {drop:.0%} "
                f"(entropy {base.marginal_entropy:.2f} -> {now.marginal_entropy:.2f} nats)"
            )
    if base.position_entropy and now.position_entropy is not None:
        drop = 1 - now.position_entropy / base.position_entropy
        if drop > cfg.max_marginal_entropy_drop:
            reasons.append(
                f"the spread of chosen option letters fell by {drop:.0%}: a letter-position "
                "bias is being reinforced"
            )
    if now.distinct <= 1 < base.distinct:
        reasons.append("the model collapsed onto a single answer for every image")
    rise = now.invalid_rate - base.invalid_rate
    if rise > cfg.max_invalid_rise:
        reasons.append(
            f"invalid answers rose from {base.invalid_rate:.0%} to {now.invalid_rate:.0%}"
        )
    if now.kl is not None and now.kl > cfg.max_kl:
        reasons.append(f"KL to the base model reached {now.kl:.3f} (> {cfg.max_kl})")
    if now.changed_answers is not None and now.changed_answers > cfg.max_changed_answers:
        reasons.append(
            f"{now.changed_answers:.0%} of the images with a valid answer before adaptation "
            f"now give a different answer (> {cfg.max_changed_answers:.0%})"
        )
    return Verdict(bool(reasons), "; ".join(reasons))


def score(base: Signals, now: Signals) -> float:
    """Unsupervised quality of a checkpoint for rollback: higher is safer.

    Penalises lost answer diversity and added invalid output relative to the base.
    """
    keep = 1.0 if base.marginal_entropy == 0 else now.marginal_entropy / base.marginal_entropy
    return min(keep, 1.0) - max(0.0, now.invalid_rate - base.invalid_rate)
