"""Evaluation metrics over per-image answer distributions. Pure functions, numpy only.

Shared by the benchmark (`bench/benchmark.py`) and anything that shows evaluation results
(the UI's answer marginals). Inputs are canonical answers (`ttrv.answers`), INVALID included:

- a *distribution* per image: {answer: probability} at the rollout temperature (INVALID is
  a key like any other; probabilities sum to 1), e.g. from `bench.fastpath` or from
  `ttrv.answers.answer_distribution` over sampled answers;
- a *greedy answer* per image;
- a gold *label* per image, already canonical (`ttrv.answers.canonical_label`).

Definitions (each has a test in tests/test_benchmark.py):
- greedy accuracy: share of images whose greedy answer equals the label.
- expected (sampled) accuracy: mean over images of p(label): the accuracy of one sampled
  answer, in expectation.
- maj@N: mean over images of the probability that a vote over N independent samples picks
  the label. As in the rewards, INVALID never wins a vote (all-invalid votes are wrong);
  a tie among t valid answers counts 1/t (a uniform random tie-break). Exact, not sampled.
- answer entropy: mean over images of the entropy (nats) of the distribution, INVALID one
  category.
- per-answer accuracy: greedy accuracy over the images whose gold answer is a (shows an
  answer the model has stopped giving: the miniature study's vanishing "B").
- marginal: the share of images giving each greedy answer (or the mean distribution).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from .answers import INVALID

Dist = Mapping[str, float]


def greedy_accuracy(answers: Sequence[str], labels: Sequence[str]) -> float:
    """Share of images whose greedy answer is the label.

    >>> greedy_accuracy(["7", "1", INVALID], ["7", "2", "3"])
    0.3333333333333333
    """
    _same_length(answers, labels)
    return sum(a == y for a, y in zip(answers, labels, strict=True)) / len(labels)


def expected_accuracy(dists: Sequence[Dist], labels: Sequence[str]) -> float:
    """Mean p(label) over images.

    >>> expected_accuracy([{"7": 0.5, "1": 0.5}, {"2": 1.0}], ["7", "3"])
    0.25
    """
    _same_length(dists, labels)
    return sum(d.get(y, 0.0) for d, y in zip(dists, labels, strict=True)) / len(labels)


def entropy(dist: Dist) -> float:
    """Entropy in nats of one distribution.

    >>> round(entropy({"7": 0.5, "1": 0.5}), 4)
    0.6931
    """
    return -sum(p * math.log(p) for p in dist.values() if p > 0)


def mean_entropy(dists: Sequence[Dist]) -> float:
    return sum(entropy(d) for d in dists) / len(dists)


def invalid_rate(answers: Sequence[str]) -> float:
    return sum(a == INVALID for a in answers) / len(answers)


def invalid_mass(dists: Sequence[Dist]) -> float:
    """Mean sampled probability of an invalid answer."""
    return sum(d.get(INVALID, 0.0) for d in dists) / len(dists)


def marginal(values: Sequence[Hashable]) -> dict[str, float]:
    """Share of each value (greedy answers, option letters, ...), most common first.

    >>> marginal(["7", "7", "1", INVALID])
    {'7': 0.5, '1': 0.25, '<invalid>': 0.25}
    """
    counts = Counter(values)
    return {str(k): c / len(values) for k, c in counts.most_common()}


def mean_distribution(dists: Sequence[Dist]) -> dict[str, float]:
    """The sampled marginal: the average of the images' distributions, largest first.

    >>> mean_distribution([{"7": 1.0}, {"7": 0.5, "1": 0.5}])
    {'7': 0.75, '1': 0.25}
    """
    total: Counter[str] = Counter()
    for d in dists:
        total.update({k: v / len(dists) for k, v in d.items()})
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def per_answer_accuracy(
    answers: Sequence[Hashable], labels: Sequence[Hashable]
) -> dict[str, dict[str, float]]:
    """For each gold answer: its image count, greedy accuracy, and how often it is *given*
    (share of all images whose answer it is), sorted by gold answer.

    >>> per_answer_accuracy(["A", "A", "B", "A"], ["A", "B", "B", "C"])["B"]
    {'n': 2, 'accuracy': 0.5, 'given': 0.25}
    """
    _same_length(answers, labels)
    given = Counter(answers)
    out = {}
    for gold in sorted({str(y) for y in labels}):
        idx = [i for i, y in enumerate(labels) if str(y) == gold]
        hits = sum(str(answers[i]) == gold for i in idx)
        out[gold] = {
            "n": len(idx),
            "accuracy": hits / len(idx),
            "given": given[gold] / len(answers),
        }
    return out


# ---------------------------------------------------------------------------------------
# maj@N, exact
# ---------------------------------------------------------------------------------------


def majority_vote_accuracy(dists: Sequence[Dist], labels: Sequence[str], n: int) -> float:
    """maj@N: mean probability that a vote of `n` samples picks the label (see module doc).

    >>> majority_vote_accuracy([{"7": 1.0}], ["7"], 5)
    1.0
    >>> majority_vote_accuracy([{"7": 0.5, "1": 0.5}], ["7"], 1)  # one sample: p(label)
    0.5
    """
    _same_length(dists, labels)
    return float(np.mean(majority_vote_probs(dists, labels, n)))


def majority_vote_probs(dists: Sequence[Dist], labels: Sequence[str], n: int) -> np.ndarray:
    """Per image, P(vote of n samples picks the label), vectorised over images.

    The multinomial probability of counts x is n! prod p_j^x_j / x_j!. With the label's
    count fixed at c >= 1, every other valid answer may take 0..c samples (t of them tying
    at c), INVALID takes the rest; a dynamic programme over the other answers sums those
    terms, tracking (samples used, ties). Cost ~ n^2 * answers per image.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1 (got {n}).")
    p_y, p_other, p_inv = _split(dists, labels)  # [I], [I, K], [I]
    n_img, k = p_other.shape
    # term[x] = p^x / x!  for x = 0..n
    fact = np.array([math.factorial(x) for x in range(n + 1)], dtype=np.float64)
    xs = np.arange(n + 1)

    def powers(p: np.ndarray) -> np.ndarray:  # [..., n+1]
        return p[..., None] ** xs / fact

    pow_y, pow_o, pow_inv = powers(p_y), powers(p_other), powers(p_inv)  # [I,n+1] [I,K,n+1]
    total = np.zeros(n_img)
    for c in range(1, n + 1):
        # f[i, used, ties]: sum over counts of the other answers so far
        f = np.zeros((n_img, n + 1, k + 1))
        f[:, 0, 0] = 1.0
        for j in range(k):
            g = np.zeros_like(f)
            for x in range(c + 1):
                w = pow_o[:, j, x][:, None, None]  # [I, 1, 1]
                if x < c:
                    g[:, x:, :] += f[:, : n + 1 - x, :] * w
                else:
                    g[:, x:, 1:] += f[:, : n + 1 - x, :-1] * w
            f = g
        credit = f / np.arange(1, k + 2)  # a tie among t+1 answers earns 1/(t+1)
        used = np.arange(n + 1)
        rest = n - c - used  # samples left for INVALID
        ok = rest >= 0
        inv = np.zeros((n_img, n + 1))
        inv[:, ok] = pow_inv[:, rest[ok]]
        total += pow_y[:, c] * (credit.sum(axis=2) * inv).sum(axis=1)
    return total * fact[n]


def _split(dists: Sequence[Dist], labels: Sequence[str]) -> tuple[np.ndarray, ...]:
    """p(label), the other valid answers' probabilities (padded with 0), p(INVALID)."""
    others = [
        [p for a, p in d.items() if a not in (y, INVALID) and p > 0]
        for d, y in zip(dists, labels, strict=True)
    ]
    k = max((len(o) for o in others), default=0)
    p_other = np.zeros((len(dists), k))
    for i, o in enumerate(others):
        p_other[i, : len(o)] = o
    p_y = np.array(
        [d.get(y, 0.0) if y != INVALID else 0.0 for d, y in zip(dists, labels, strict=True)]
    )
    p_inv = np.array([d.get(INVALID, 0.0) for d in dists])
    return p_y, p_other, p_inv


def _same_length(a: Sequence[object], b: Sequence[object]) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} answers but {len(b)} labels.")
    if not a:
        raise ValueError("No images to score.")
