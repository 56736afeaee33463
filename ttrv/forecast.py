"""A forecast before adapting: is test-time RL likely to help this model on these images?

TTRV can only move a model towards what it already says when sampled. Two label-free
readings of the unadapted model tell most of the story (docs/benchmark.md):

- format failure: greedy output invalid on many images while sampled answers are mostly
  valid. Adaptation teaches the format the samples already hold, and that is where the
  large gains are (+40 to +53 points on the off-format digits model);
- no format: greedy and sampled answers mostly invalid alike. There is no format in the
  samples to teach and too few valid answers per image to vote on; the prompt's wording is
  the first thing to check;
- agreement: when the greedy answer already is the vote on nearly every image, there is
  little to gain and sharpening the model's preferences risks reinforcing its biases;
- otherwise adaptation moves the images where greedy and the vote disagree towards the
  vote. That helps only where the vote is right more often than greedy, which no label-free
  reading can tell: on the uncertain base digits model (greedy valid everywhere, the vote
  no better than greedy) no variant raised greedy accuracy (docs/benchmark.md), so the
  forecast says "not likely to help" and points to the flip review.

Pure functions: the caller samples; this module only counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .answers import INVALID

# Thresholds on the unadapted model's own outputs (no labels). A format failure needs a
# clear majority of invalid greedy answers and samples that are mostly valid.
FORMAT_GREEDY_INVALID = 0.5
FORMAT_SAMPLED_VALID_GAIN = 0.2
AGREEMENT_HIGH = 0.9
# One greedy answer on more than this share of the images (of at least BIAS_MIN_IMAGES)
# is named in the forecast as a likely bias.
BIAS_SHARE = 0.5
BIAS_MIN_IMAGES = 8


@dataclass
class Forecast:
    outlook: str  # "likely_help" | "no_format" | "little_gain" | "risky"
    message: str  # one line for the Adapt tab and the CLI
    images: int
    greedy_invalid: float  # share of images whose greedy answer is invalid
    sampled_invalid: float  # share of all samples that are invalid
    greedy_is_vote: float  # share of images (valid vote) whose greedy answer is the vote
    consensus: float  # mean share of samples agreeing with the image's top valid answer

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def vote(samples: Sequence[str]) -> str | None:
    """The most frequent valid answer (ties: the first seen), None when all are invalid."""
    counts = Counter(a for a in samples if a != INVALID)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in samples if counts.get(a) == top)


def favoured(samples: Sequence[str], ratio: float = 0.5) -> list[str]:
    """The valid answers that drew at least `ratio` of the top valid answer's votes (the
    answers adaptation may legitimately move a greedy answer to)."""
    counts = Counter(a for a in samples if a != INVALID)
    if not counts:
        return []
    top = max(counts.values())
    return sorted(a for a, c in counts.items() if c >= ratio * top)


def forecast(greedy: Sequence[str], samples: Sequence[Sequence[str]]) -> Forecast:
    """The forecast from each image's greedy answer and its N sampled answers."""
    if len(greedy) != len(samples):
        raise ValueError(f"{len(greedy)} greedy answers but {len(samples)} sample lists.")
    n = len(greedy)
    if n == 0:
        return Forecast("risky", "No images were sampled: no forecast.", 0, 0, 0, 0, 0)
    greedy_invalid = sum(g == INVALID for g in greedy) / n
    flat = [a for s in samples for a in s]
    sampled_invalid = sum(a == INVALID for a in flat) / max(1, len(flat))
    votes = [vote(s) for s in samples]
    voted = [i for i, v in enumerate(votes) if v is not None]
    agree = sum(greedy[i] == votes[i] for i in voted) / len(voted) if voted else 0.0
    consensus = (
        sum(
            (sum(a == votes[i] for a in samples[i]) / len(samples[i])) if votes[i] else 0.0
            for i in range(n)
        )
        / n
    )
    stats = (n, greedy_invalid, sampled_invalid, agree, consensus)
    if (
        greedy_invalid >= FORMAT_GREEDY_INVALID
        and (1 - sampled_invalid) - (1 - greedy_invalid) >= FORMAT_SAMPLED_VALID_GAIN
    ):
        return Forecast(
            "likely_help",
            f"Likely to help: greedy output is invalid on {greedy_invalid:.0%} of {n} images "
            f"while {1 - sampled_invalid:.0%} of sampled answers are valid; adaptation "
            "teaches the format the samples already hold.",
            *stats,
        )
    if greedy_invalid >= FORMAT_GREEDY_INVALID and sampled_invalid >= FORMAT_GREEDY_INVALID:
        # Mostly invalid, greedy and sampled alike: no format held in the samples to teach,
        # and the few valid answers each image gets are too few to vote on.
        return Forecast(
            "no_format",
            f"Not likely to help: the model rarely answers this prompt in the expected "
            f"format (greedy output invalid on {greedy_invalid:.0%} of {n} images, "
            f"{sampled_invalid:.0%} of sampled answers invalid too), so adaptation has "
            "little valid to learn from. Check the wording first: preview the prompt "
            "(Task tab: question, template, options), try Ask on one image, or pick a model "
            "that answers in this format.",
            *stats,
        )
    bias = one_answer_note(greedy)
    if agree >= AGREEMENT_HIGH:
        return Forecast(
            "little_gain",
            f"Little to gain: the greedy answer already is the vote on {agree:.0%} of {n} "
            f"images (mean consensus {consensus:.0%}); adapting mostly sharpens what the "
            "model prefers, errors and biases included. Review the flips before keeping it."
            + bias,
            *stats,
        )
    return Forecast(
        "risky",
        f"Not likely to help on average: greedy output is already valid on "
        f"{1 - greedy_invalid:.0%} of {n} images, and the vote differs from greedy on "
        f"{1 - agree:.0%} of them (mean consensus {consensus:.0%}). Adaptation moves those "
        "answers towards the vote, which helps only where the vote is right more often than "
        "greedy; only labels can tell. Review the flips before keeping it." + bias,
        *stats,
    )


def one_answer_note(greedy: Sequence[str]) -> str:
    """" Note: ..." when one valid answer is the greedy answer of more than half of the
    images (at least `BIAS_MIN_IMAGES`): likely a bias rather than what the images show,
    and adaptation reinforces what the model prefers; "" otherwise."""
    valid = [g for g in greedy if g != INVALID]
    if len(greedy) < BIAS_MIN_IMAGES or not valid:
        return ""
    answer, count = Counter(valid).most_common(1)[0]
    share = count / len(greedy)
    if share <= BIAS_SHARE:
        return ""
    return (
        f" Note: {share:.0%} of the images get the same answer ({answer!r}): unless they "
        "really show the same thing, that is a bias, and adapting would reinforce it."
    )
