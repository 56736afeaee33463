"""Guard signals and verdicts on hand-made answer lists."""

import json
import math

import pytest

from ttrv.answers import INVALID
from ttrv.cli import build_parser, config_from_args
from ttrv.config import ConfigError, GuardConfig
from ttrv.guard import changed_share, check, marginal_entropy, signals


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


# -- answers changed since before adaptation (max_changed_answers) ----------------------------


def test_changed_share_counts_only_valid_to_other_valid():
    """Guards the definition: invalid -> valid (an off-format model learning the format) and
    valid -> invalid (the invalid-rate check's job) do not count; the denominator is every
    image (a mostly-invalid model must not trip on two changes among a few valid answers)."""
    before = ["1", "2", "3", "4", INVALID, INVALID]
    now = ["1", "5", INVALID, "4", "7", INVALID]
    assert changed_share(before, now) == pytest.approx(1 / 6)  # only "2" -> "5"
    assert changed_share([INVALID] * 3, ["1", "2", "3"]) == 0.0  # nothing valid before
    assert changed_share(["1", "2"], ["2", "1"]) == 1.0
    with pytest.raises(ValueError, match="answers"):
        changed_share(["1", "2"], ["1"])


def test_signals_record_the_changed_share_only_against_before():
    base = signals(["1", "2", "3", "4"])
    assert base.changed_answers is None
    now = signals(["1", "2", "3", "5"], before=["1", "2", "3", "4"])
    assert now.changed_answers == pytest.approx(0.25)
    json.dumps(now.to_dict())  # guard events carry the signals as JSON
    assert now.to_dict()["changed_answers"] == pytest.approx(0.25)


def test_too_many_changed_answers_trips_and_says_how_many():
    before = [str(i % 10) for i in range(20)]
    now_answers = list(before)
    for i in (0, 2):  # two swaps: 4 of 20 images (20%) give another valid answer
        now_answers[i], now_answers[i + 1] = before[i + 1], before[i]
    base = signals(before)
    now = signals(now_answers, before=before)
    # answer diversity and invalid rate are untouched: only the new check can trip
    assert now.marginal_entropy == pytest.approx(base.marginal_entropy)
    assert now.invalid_rate == 0.0
    verdict = check(base, now, GuardConfig(max_changed_answers=0.15))
    assert verdict.tripped
    assert "20%" in verdict.reason and "15%" in verdict.reason
    assert "another answer than their valid one" in verdict.reason
    assert not check(base, now, GuardConfig(max_changed_answers=0.2)).tripped  # not > 20%
    assert not check(base, now, GuardConfig(max_changed_answers=1.0)).tripped


def test_off_format_model_learning_the_format_does_not_trip_the_changed_check():
    """The off-format model's gain (invalid -> valid answers) must not look like harm."""
    before = [INVALID] * 8 + ["3", "7"]
    now_answers = ["0", "1", "2", "3", "4", "5", "6", "7", "3", "7"]
    verdict = check(signals(before), signals(now_answers, before=before), GuardConfig())
    assert not verdict.tripped, verdict.reason


def test_max_changed_answers_is_validated_and_has_a_flag():
    assert GuardConfig().max_changed_answers == pytest.approx(0.05)
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="max_changed_answers"):
            GuardConfig(max_changed_answers=bad)
    args = build_parser().parse_args(["adapt", "--max-changed-answers", "0.3"])
    assert config_from_args(args).guard.max_changed_answers == pytest.approx(0.3)


def test_greedy_signals_pass_the_answers_before_adaptation():
    """The engine's call site: `adapt` hands `greedy_signals` the before-adaptation answers."""
    from ttrv.adapt import greedy_signals
    from ttrv.config import TaskConfig

    before = [{"image_id": str(i), "answer": a} for i, a in enumerate(["1", "2", INVALID, "4"])]
    now = [{"image_id": str(i), "answer": a} for i, a in enumerate(["1", "3", "5", "4"])]
    items = [None] * 4  # open questions: items are not looked at
    sig = greedy_signals(TaskConfig(kind="open"), items, now, before)
    assert sig.changed_answers == pytest.approx(1 / 4)
    assert greedy_signals(TaskConfig(kind="open"), items, now).changed_answers is None


def test_changed_answers_are_matched_by_image_not_by_position():
    """Guards: a resumed run lists its images in another order than its stored `before`
    answers; matching by position would count unchanged answers as changed."""
    from ttrv.adapt import greedy_signals
    from ttrv.config import TaskConfig

    before = [{"image_id": "a", "answer": "1"}, {"image_id": "b", "answer": "2"}]
    now = [{"image_id": "b", "answer": "2"}, {"image_id": "a", "answer": "1"}]
    task = TaskConfig(kind="open", question="Which digit?")
    assert greedy_signals(task, [], now, before).changed_answers == 0.0
    now[0]["answer"] = "7"
    assert greedy_signals(task, [], now, before).changed_answers == 0.5
