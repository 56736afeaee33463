"""Flip review: settle whether a run helped from a handful of labels.

Label-free signals cannot always tell whether adaptation helped. But only the images whose
greedy answer changed ("flips") can change accuracy, so a person who marks a few flips
("before was right", "after is right", "neither") measures the net change directly:

    net change in accuracy = (flips / images) * (P(after right) - P(before right))

estimated over the flips, with a Dirichlet posterior on the three outcomes (Jeffreys
prior, 0.5 each) and a finite-population correction (reviewing every flip gives the exact
answer, with no interval). The recommendation is to keep the adapter only when the
reviewed flips lean towards "after" (ties revert: keeping changes that are not shown to
help only adds risk). Pure functions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

MARKS = ("before", "after", "neither")  # which answer was right; "neither": both wrong
MARK_LABELS = {
    "before": "before was right",
    "after": "after is right",
    "neither": "neither is right",
}
PRIOR = 0.5
Z95 = 1.959964


@dataclass
class Verdict:
    flips: int  # images whose greedy answer changed
    images: int  # all images answered before and after
    reviewed: int
    before_right: int
    after_right: int
    neither: int
    estimate: float  # estimated net change in accuracy over all images (fraction)
    low: float  # 95% interval
    high: float
    recommendation: str  # "keep" | "revert" | "review"
    message: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def flips(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """Image ids (in `before`'s order) whose answer changed between the two answer sets."""
    return [i for i, a in before.items() if i in after and after[i] != a]


def verdict(marks: Mapping[str, str], n_flips: int, n_images: int) -> Verdict:
    """The verdict from the marks given so far (image id -> mark; "skip" marks are left
    out), over `n_flips` flips among `n_images` images."""
    bad = {m for m in marks.values() if m not in MARKS}
    if bad:
        raise ValueError(f"Unknown review marks {sorted(bad)}: use one of {MARKS}.")
    if len(marks) > n_flips:
        raise ValueError(f"{len(marks)} marks for only {n_flips} flips.")
    a = sum(m == "after" for m in marks.values())
    b = sum(m == "before" for m in marks.values())
    c = sum(m == "neither" for m in marks.values())
    m = a + b + c
    share = n_flips / n_images if n_images else 0.0
    if n_flips == 0:
        return Verdict(
            0,
            n_images,
            0,
            0,
            0,
            0,
            0.0,
            0.0,
            0.0,
            "keep",
            "No answer changed: the adapter changes no greedy answer on these images.",
        )
    if m == 0:
        return Verdict(
            n_flips,
            n_images,
            0,
            0,
            0,
            0,
            0.0,
            -share,
            share,
            "review",
            f"{n_flips} of {n_images} answers changed; mark a few to see whether they helped.",
        )
    if m == n_flips:  # everything reviewed: exact
        est = share * (a - b) / m
        low = high = est
    else:
        alpha = [a + PRIOR, b + PRIOR, c + PRIOR]
        total = sum(alpha)
        mean = (alpha[0] - alpha[1]) / total
        # Var(p_a - p_b) under Dirichlet(alpha), shrunk by the unreviewed share.
        var = (
            alpha[0] * (total - alpha[0]) + alpha[1] * (total - alpha[1]) + 2 * alpha[0] * alpha[1]
        ) / (total**2 * (total + 1))
        fpc = (n_flips - m) / max(1, n_flips - 1)
        half = Z95 * math.sqrt(var * fpc)
        # Point estimate: the reviewed flips' own balance (the prior only widens the interval).
        est = share * (a - b) / m
        low = share * max(-1.0, mean - half)
        high = share * min(1.0, mean + half)
    keep = a > b
    rec = "keep" if keep else "revert"
    lean = (
        f"after is right on {a}, before on {b}, neither on {c} of {m} reviewed flips "
        f"({n_flips} in all)"
    )
    interval = "" if low == high else f", 95% interval {low * 100:+.1f} to {high * 100:+.1f}"
    action = "keep the adapter" if keep else "roll back to the unadapted model"
    msg = f"{lean}: estimated {est * 100:+.1f} points of accuracy{interval}. Recommendation: {action}."
    return Verdict(n_flips, n_images, m, b, a, c, est, low, high, rec, msg)


def review_order(flip_ids: Sequence[str], seed: int) -> list[str]:
    """The order flips are offered in: seeded random, so a reviewer of the first few sees an
    unbiased sample of all flips (not the first images of the folder)."""
    ids = sorted(flip_ids)
    random.Random(f"{seed}:review").shuffle(ids)
    return ids


def labelled_review(
    before: Mapping[str, str],
    after: Mapping[str, str],
    labels: Mapping[str, str],
    seed: int,
    n: int,
) -> tuple[dict[str, str], Verdict]:
    """A reviewer who knows the (canonical) labels marks up to `n` flips in the seeded
    review order, skipping images without a label as a person would; the marks and the
    verdict over all flips."""
    flipped = flips(before, after)
    marks: dict[str, str] = {}
    for image_id in review_order(flipped, seed):
        if len(marks) >= n:
            break
        if image_id in labels:
            marks[image_id] = mark_from_label(labels[image_id], before[image_id], after[image_id])
    return marks, verdict(marks, len(flipped), len(before))


def mark_from_label(label: str, before: str, after: str) -> str:
    """What a reviewer holding the true label marks (the benchmark's and CLI's reviewer)."""
    if after == label:
        return "after"
    if before == label:
        return "before"
    return "neither"
