"""Guard signals and verdicts on hand-made answer lists."""

import math

import pytest

from ttrv.answers import INVALID
from ttrv.config import GuardConfig
from ttrv.guard import check, marginal_entropy, score, signals


def test_marginal_entropy_hand_computed():
    assert marginal_entropy(["a", "a", "b", "b"]) == pytest.approx(math.log(2))
    assert marginal_entropy(["a"] * 5) == 0.0


def test_collapse_onto_one_answer_trips():
    """Guards the collapse seen in the reference logs (always answering "D")."""
    base = signals(["1", "2", "3", "4", "1", "2"])
    now = signals(["4"] * 6)
    verdict = check(base, now, GuardConfig())
    assert verdict.tripped
    assert "single answer" in verdict.reason


def test_collapse_onto_invalid_trips():
    """Guards the collapse to empty output (46.8 -> 0.0 in the authors' logs)."""
    base = signals(["1", "2", "3", "4"])
    now = signals(["1", INVALID, INVALID, "4"])
    verdict = check(base, now, GuardConfig())
    assert verdict.tripped and "invalid" in verdict.reason


def test_healthy_change_does_not_trip():
    base = signals(["1", "2", "3", "3"])
    now = signals(["1", "2", "3", "4"])  # more diverse, nothing invalid
    assert not check(base, now, GuardConfig()).tripped
    assert score(base, now) == pytest.approx(1.0)


def test_kl_bound():
    base = signals(["1", "2"])
    now = signals(["1", "2"], kl=0.9)
    assert check(base, now, GuardConfig(max_kl=0.5)).tripped


def test_letter_position_bias_trips_even_when_contents_stay_diverse():
    """Guards the miniature study's failure: option "B" vanishing while digits stay varied."""
    answers = ["1", "2", "3", "4", "5", "6"]
    base = signals(answers, positions=[0, 1, 2, 3, 0, 1])
    now = signals(answers, positions=[0, 0, 0, 0, 0, 3])
    verdict = check(base, now, GuardConfig())
    assert verdict.tripped and "letter" in verdict.reason
