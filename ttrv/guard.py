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

- answers moving to something the unadapted model did not favour ("unexplained flips"):
  TTRV pushes greedy answers towards what the model's own samples favour, so a flip to
  such an answer is what it is meant to do; a valid answer flipping to one its samples
  rarely gave before adaptation is drift that nothing in the reward explains.

The signals are taken on two sets of images (`SETS`): the images adapted on and a watch
pool of the session's images that are never trained on (`ttrv.watch`). `decide` is the
one decision both the adaptation loop and the benchmark's replay call, every
`check_every` steps and at each round's end: trip (roll back and stop), or go on; and
whether the weights at this check are *clearly* healthy (every signal within
`healthy_margin` of its bound), which makes them the new rollback target. With no clearly
healthy check since the start, a trip rolls back to the unadapted model.

Every function here is pure.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
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
    # Share of the images whose valid answer before adaptation is now another valid answer
    # (`changed_share`); None for the signals before adaptation.
    changed_answers: float | None = None
    # Share of the sampled images whose valid answer moved to one the unadapted model's
    # samples did not favour (`unexplained_share`).
    unexplained_flips: float | None = None
    # Multiple choice: the share of all images that chose the most chosen option position,
    # and how many options there are. Needs no reference before adaptation, so it also
    # watches a model whose answers were mostly invalid before (the off-format model).
    top_letter_share: float | None = None
    letters: int | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def changed_share(before: Sequence[str], now: Sequence[str]) -> float:
    """Share of the images (all of them) whose valid answer before is now another valid one.

    Invalid -> valid (an off-format model learning the format) and valid -> invalid (counted
    by the invalid rate) do not count. The denominator is every image, not only those valid
    before: what a changed answer can cost is a share of all images, and a model whose
    answers are mostly invalid before would otherwise trip on two or three changes among a
    handful of valid ones (seen at K = 200 on the off-format model).

    >>> changed_share(["1", "2", INVALID, "4"], ["1", "3", "5", INVALID])
    0.25
    """
    if len(before) != len(now):
        raise ValueError(f"{len(before)} answers before adaptation but {len(now)} now.")
    moved = sum(b != INVALID and n != b and n != INVALID for b, n in zip(before, now, strict=True))
    return moved / len(before) if before else 0.0


def unexplained_share(
    before: Sequence[str], favoured: Sequence[Collection[str] | None], now: Sequence[str]
) -> float | None:
    """Share of the sampled images (`favoured` not None) whose valid answer before is now
    another valid answer that the unadapted model's samples did not favour (`favoured`: the
    answers that drew at least half the top answer's votes); None when no image was sampled.
    Invalid -> valid (learning the format) does not count; as in `changed_share`, the
    denominator is every sampled image.

    >>> unexplained_share(["1", "2", "3"], [["1"], ["2", "4"], None], ["1", "4", "5"])
    0.0
    >>> unexplained_share(["1", "2"], [["1"], ["2"]], ["7", "2"])
    0.5
    """
    if not len(before) == len(favoured) == len(now):
        raise ValueError("before, favoured and now must have one entry per image.")
    sampled = [i for i, f in enumerate(favoured) if f is not None]
    if not sampled:
        return None
    odd = sum(
        before[i] != INVALID
        and now[i] != INVALID
        and now[i] != before[i]
        and now[i] not in favoured[i]
        for i in sampled
    )
    return odd / len(sampled)


def signals(
    answers: Sequence[str],
    kl: float | None = None,
    positions: Sequence[int] | None = None,
    before: Sequence[str] | None = None,
    favoured: Sequence[Collection[str] | None] | None = None,
    letters: int | None = None,
) -> Signals:
    """Signals of one set of greedy answers (one per image); `positions` are the chosen
    option indices of a multiple-choice task (invalid answers left out); `before` are the
    same images' greedy answers before adaptation (for `changed_answers`); `favoured` the
    answers their samples favoured before adaptation, None where not sampled
    (`unexplained_flips`); `letters` the number of options (for `top_letter_share`)."""
    n = max(1, len(answers))
    top = max(Counter(positions).values()) / n if positions else None
    valid = {a for a in answers if a != INVALID}
    return Signals(
        marginal_entropy=marginal_entropy(answers),
        distinct=len(valid),
        invalid_rate=sum(a == INVALID for a in answers) / n,
        kl=kl,
        position_entropy=marginal_entropy([str(p) for p in positions]) if positions else None,
        changed_answers=changed_share(before, answers) if before is not None else None,
        unexplained_flips=(
            unexplained_share(before, favoured, answers)
            if before is not None and favoured is not None
            else None
        ),
        top_letter_share=top,
        letters=letters if positions else None,
    )


def pct(x: float) -> str:
    """A share as a percentage, one decimal only where it is not whole (7.5%, 15%)."""
    return f"{x:.1%}".replace(".0%", "%")


@dataclass
class Verdict:
    tripped: bool
    reason: str


def check(base: Signals, now: Signals, cfg: GuardConfig, scale: float = 1.0) -> Verdict:
    """Has adaptation moved the unsupervised signals past the configured bounds (each
    multiplied by `scale`: `scale < 1` asks whether a checkpoint is *clearly* healthy)?"""
    reasons = []
    entropy_bound = cfg.max_marginal_entropy_drop * scale
    if base.marginal_entropy > 0:
        drop = 1 - now.marginal_entropy / base.marginal_entropy
        if drop > entropy_bound:
            reasons.append(
                f"answer diversity across images fell by {drop:.0%} "
                f"(entropy {base.marginal_entropy:.2f} -> {now.marginal_entropy:.2f} nats)"
            )
    # The letter spread before adaptation is a reference only when most images had a valid
    # answer: an off-format model's ~9% valid answers give a noisy one (it tripped runs that
    # gained 45 points); such a model is watched by the letter share below instead.
    if base.position_entropy and now.position_entropy is not None and base.invalid_rate <= 0.5:
        drop = 1 - now.position_entropy / base.position_entropy
        if drop > entropy_bound:
            reasons.append(
                f"the spread of chosen option letters fell by {drop:.0%}: a letter-position "
                "bias is being reinforced"
            )
    if now.top_letter_share is not None and now.letters:
        # The bound scales on the excess over an even spread (1 / letters), so that "clearly
        # healthy" still means something for 2 or 26 options.
        even = 1 / now.letters
        bound = even + (cfg.max_letter_share - even) * scale
        before = base.top_letter_share or 0.0
        if now.top_letter_share > bound and now.top_letter_share > before:
            reasons.append(
                f"{pct(now.top_letter_share)} of the images now choose the same option "
                f"letter (> {pct(bound)}; {pct(before)} before adaptation)"
            )
    if now.distinct <= 1 < base.distinct:
        reasons.append("the model collapsed onto a single answer for every image")
    rise = now.invalid_rate - base.invalid_rate
    if rise > cfg.max_invalid_rise * scale:
        reasons.append(
            f"invalid answers rose from {base.invalid_rate:.0%} to {now.invalid_rate:.0%}"
        )
    if now.kl is not None and now.kl > cfg.max_kl * scale:
        reasons.append(f"KL to the base model reached {now.kl:.3f} (> {cfg.max_kl * scale:.3g})")
    changed_bound = cfg.max_changed_answers * scale
    if now.changed_answers is not None and now.changed_answers > changed_bound:
        reasons.append(
            f"{pct(now.changed_answers)} of the images now give another answer than their "
            f"valid one before adaptation (> {pct(changed_bound)})"
        )
    unexplained_bound = cfg.max_unexplained_flips * scale
    if now.unexplained_flips is not None and now.unexplained_flips > unexplained_bound:
        reasons.append(
            f"{pct(now.unexplained_flips)} of the sampled images now give an answer their "
            f"samples did not favour before adaptation (> {pct(unexplained_bound)})"
        )
    return Verdict(bool(reasons), "; ".join(reasons))


# -- the decision at a guard check --------------------------------------------------------

SETS = {"adapted": "images adapted on", "watch": "watch pool"}
UNADAPTED = "the unadapted model"


@dataclass
class Decision:
    tripped: bool  # roll back to the target and stop
    healthy: bool  # clearly healthy: these weights become the rollback target
    reason: str  # why it tripped ("" when it did not)
    near: str  # when not clearly healthy: which signals are past the margin


def decide(base: Mapping[str, Signals], now: Mapping[str, Signals], cfg: GuardConfig) -> Decision:
    """The guard's decision at one check, over every watched set of images (`SETS`)."""
    tripped, near = [], []
    for name in SETS:
        if name not in base or name not in now:
            continue
        label = SETS[name]
        verdict = check(base[name], now[name], cfg)
        if verdict.tripped:
            tripped.append(f"{label}: {verdict.reason}")
        close = check(base[name], now[name], cfg, scale=cfg.healthy_margin)
        if close.tripped:
            near.append(f"{label}: {close.reason}")
    return Decision(bool(tripped), not near, "; ".join(tripped), "; ".join(near))


def target_label(step: int) -> str:
    return UNADAPTED if step == 0 else f"the weights after step {step}"


def replay(
    base: Mapping[str, Signals],
    checks: Sequence[tuple[int, Mapping[str, Signals]]],
    cfg: GuardConfig,
) -> dict[str, object]:
    """Where a guarded run ends, given the signals at each of its checks `(step, signals)`
    in order: the loop in `ttrv.adapt.adapt` makes exactly these decisions."""
    target = 0
    for step, now in checks:
        d = decide(base, now, cfg)
        if d.tripped:
            return {
                "step": target,
                "status": "guard_stopped",
                "reason": d.reason,
                "tripped_at": step,
                "rolled_back_to": target_label(target),
            }
        if d.healthy:
            target = step
    last = checks[-1][0] if checks else 0
    return {
        "step": last,
        "status": "done",
        "reason": "",
        "tripped_at": None,
        "rolled_back_to": None,
    }
