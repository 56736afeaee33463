"""Pure pieces of the do-no-harm work: watch-pool split, guard decisions, forecast, review."""

from __future__ import annotations

import pytest

from ttrv.answers import INVALID
from ttrv.config import AdaptConfig, ConfigError, GuardConfig, OptimConfig
from ttrv.forecast import favoured, forecast, vote
from ttrv.guard import check, decide, replay, signals, unexplained_share
from ttrv.review import flips, mark_from_label, review_order, verdict
from ttrv.watch import split_images, split_sizes


def cfg(**guard) -> AdaptConfig:
    adapt_images = guard.pop("adapt_images", 0)
    return AdaptConfig(guard=GuardConfig(**guard), optim=OptimConfig(adapt_images=adapt_images))


# -- watch pool ---------------------------------------------------------------------------


def test_split_sizes_share_cap_minimum_and_adapt_sample():
    assert split_sizes(100, cfg()) == (80, 20)
    assert split_sizes(10_000, cfg()) == (9_800, 200)  # capped
    assert split_sizes(20, cfg()) == (20, 0)  # 4 < min 10: no pool
    assert split_sizes(100, cfg(guard=False)) == (100, 0)
    assert split_sizes(5_000, cfg(adapt_images=100)) == (100, 200)
    assert split_sizes(105, cfg(adapt_images=100)) == (100, 0)  # 5 left: too few


def test_split_is_seeded_disjoint_and_independent_of_order():
    ids = [f"id{i:03d}" for i in range(100)]
    a = split_images(ids, cfg())
    b = split_images(list(reversed(ids)), cfg())
    assert set(a.watch) == set(b.watch) and set(a.adapt) == set(b.adapt)
    assert not set(a.watch) & set(a.adapt) and len(a.watch) == 20
    other = split_images(ids, AdaptConfig(optim=OptimConfig(seed=1)))
    assert set(other.watch) != set(a.watch)
    assert a.adapt == [i for i in ids if i in set(a.adapt)]  # session order kept


def test_invalid_watch_settings_are_refused():
    with pytest.raises(ConfigError, match="watch_share"):
        GuardConfig(watch_share=0.95)
    with pytest.raises(ConfigError, match="healthy_margin"):
        GuardConfig(healthy_margin=0)
    with pytest.raises(ConfigError, match="adapt_images"):
        OptimConfig(adapt_images=-1)


# -- guard decisions ----------------------------------------------------------------------


def test_unexplained_flips_count_only_valid_moves_to_unfavoured_answers():
    before = ["1", "2", "3", "4", INVALID]
    favoured = [["1"], ["2", "5"], ["3"], None, ["6"]]
    now = ["1", "5", "7", "9", "8"]  # image 1 moved to a favoured answer, image 2 did not;
    # image 3 was not sampled; image 4 learnt the format (invalid -> valid): not counted,
    # but it is one of the 4 sampled images
    assert unexplained_share(before, favoured, now) == pytest.approx(1 / 4)
    assert unexplained_share(before, [None] * 5, now) is None
    now_invalid = ["1", "2", INVALID, "4", INVALID]  # invalid output: the invalid rate's
    assert unexplained_share(before, favoured, now_invalid) == 0.0


def test_favoured_answers_are_within_half_of_the_top_count():
    assert favoured(["a"] * 4 + ["b"] * 2 + ["c"] + [INVALID] * 5) == ["a", "b"]
    assert favoured([INVALID, INVALID]) == []


def test_decide_names_the_set_and_separates_healthy_from_near():
    g = GuardConfig(max_changed_answers=0.2, healthy_margin=0.5)
    before = [str(i % 10) for i in range(20)]
    base = {"adapted": signals(before), "watch": signals(before)}
    same = {k: signals(before, before=before) for k in base}
    d = decide(base, same, g)
    assert not d.tripped and d.healthy
    moved = list(before)
    moved[0], moved[1], moved[2] = before[1], before[2], before[0]  # 15%: in (10%, 20%]
    near = {"adapted": signals(before, before=before), "watch": signals(moved, before=before)}
    d = decide(base, near, g)
    assert not d.tripped and not d.healthy and d.near.startswith("watch pool:")
    worse = list(moved)
    worse[4], worse[5] = before[5], before[4]  # 25% changed
    d = decide(
        base, {"adapted": signals(before, before=before), "watch": signals(worse, before=before)}, g
    )
    assert d.tripped and d.reason.startswith("watch pool:")


def test_replay_rolls_back_to_the_last_clearly_healthy_check_or_the_start():
    g = GuardConfig(max_changed_answers=0.2, healthy_margin=0.5)
    before = [str(i % 10) for i in range(20)]
    base = {"adapted": signals(before)}
    healthy = {"adapted": signals(before, before=before)}
    near_answers = list(before)
    near_answers[0], near_answers[1], near_answers[2] = before[1], before[2], before[0]
    near = {"adapted": signals(near_answers, before=before)}
    collapse = {"adapted": signals(["3"] * 20, before=before)}
    out = replay(base, [(5, healthy), (10, near), (15, collapse)], g)
    assert (out["step"], out["tripped_at"], out["rolled_back_to"]) == (
        5,
        15,
        "the weights after step 5",
    )
    out = replay(base, [(5, near), (10, collapse)], g)
    assert out["step"] == 0 and out["rolled_back_to"] == "the unadapted model"
    out = replay(base, [(5, healthy), (10, near)], g)
    assert out["status"] == "done" and out["step"] == 10


# -- forecast -----------------------------------------------------------------------------


def test_vote_ignores_invalid_and_breaks_ties_by_first_seen():
    assert vote([INVALID, "b", "a", "a", "b"]) == "b"
    assert vote([INVALID, INVALID]) is None


def test_forecast_outlooks():
    off = forecast([INVALID] * 9 + ["A"], [["A", "A", "B", INVALID]] * 10)
    assert off.outlook == "likely_help" and "invalid on 90%" in off.message
    agree = forecast(["A"] * 10, [["A", "A", "B", "A"]] * 10)
    assert agree.outlook == "little_gain" and agree.greedy_is_vote == 1.0
    assert agree.consensus == pytest.approx(0.75)
    mixed = forecast(["A", "B"] * 5, [["A", "A", "B", "B"], ["A", "A", "A", "B"]] * 5)
    assert mixed.outlook == "risky" and "Not likely to help" in mixed.message
    # Mostly invalid whether greedy or sampled: the wording, not adaptation, is the fix
    # (said, not counted as agreement: the few valid votes agree with nothing).
    wrong = forecast([INVALID] * 8 + ["A", "B"], [[INVALID, INVALID, INVALID, "A"]] * 10)
    assert wrong.outlook == "no_format" and "rarely answers this prompt" in wrong.message
    assert "invalid on 80% of 10 images, 75% of sampled answers invalid" in wrong.message
    assert "Task tab" in wrong.message
    # greedy mostly invalid but most samples valid (a smaller gain than a format failure):
    # not "rarely answers in format"
    some = forecast([INVALID] * 11 + ["A"] * 9, [["A", "A", INVALID, INVALID, "A"]] * 20)
    assert (some.greedy_invalid, some.sampled_invalid) == (0.55, pytest.approx(0.4))
    assert some.outlook != "no_format"
    # one answer for most images is named as a likely bias (the digits model asked other
    # wording answered '7' on 13 of 24 images at 4% accuracy: "little to gain" alone)
    biased = forecast(["7"] * 6 + ["1", "2", "3", "4"], [["7", "7", "7", "7"]] * 6
                      + [["1"] * 4, ["2"] * 4, ["3"] * 4, ["4"] * 4])  # fmt: skip
    assert biased.outlook == "little_gain"
    assert "60% of the images get the same answer ('7')" in biased.message
    assert "same answer" not in mixed.message  # A and B on half each: no single answer
    assert forecast([], []).images == 0
    with pytest.raises(ValueError):
        forecast(["A"], [])


# -- flip review --------------------------------------------------------------------------


def test_flips_and_marks():
    assert flips({"a": "1", "b": "2", "c": "3"}, {"a": "1", "b": "5", "c": "4"}) == ["b", "c"]
    assert mark_from_label("5", "2", "5") == "after"
    assert mark_from_label("2", "2", "5") == "before"
    assert mark_from_label("9", "2", "5") == "neither"


def test_verdict_estimate_interval_and_recommendation():
    # 40 flips among 400 images; reviewed 10: after right 7, before right 2, neither 1
    marks = {f"i{k}": m for k, m in enumerate(["after"] * 7 + ["before"] * 2 + ["neither"])}
    v = verdict(marks, 40, 400)
    assert v.estimate == pytest.approx(0.1 * 5 / 10)
    assert v.low < v.estimate < v.high and v.recommendation == "keep"
    assert "+5.0 points" in v.message and "keep the adapter" in v.message
    bad = verdict({"a": "before", "b": "before", "c": "after"}, 40, 400)
    assert bad.recommendation == "revert" and bad.estimate < 0
    tie = verdict({"a": "before", "b": "after"}, 10, 100)
    assert tie.recommendation == "revert"  # not shown to help: do no harm


def test_verdict_narrows_with_more_marks_and_is_exact_when_all_reviewed():
    few = verdict({"a": "after", "b": "after", "c": "before"}, 20, 200)
    more = verdict({f"i{k}": m for k, m in enumerate(["after", "after", "before"] * 4)}, 20, 200)
    assert (more.high - more.low) < (few.high - few.low)
    every = verdict({f"i{k}": "after" if k < 3 else "before" for k in range(4)}, 4, 100)
    assert every.low == every.high == pytest.approx(0.02)


def test_verdict_without_marks_or_flips_and_bad_marks():
    assert verdict({}, 0, 50).recommendation == "keep"
    assert verdict({}, 5, 50).recommendation == "review"
    with pytest.raises(ValueError, match="Unknown review marks"):
        verdict({"a": "maybe"}, 5, 50)
    with pytest.raises(ValueError, match="marks for only"):
        verdict({"a": "after", "b": "after"}, 1, 50)


def test_review_order_is_seeded_and_covers_all_flips():
    ids = [f"x{i}" for i in range(30)]
    a, b = review_order(ids, 0), review_order(list(reversed(ids)), 0)
    assert a == b and sorted(a) == sorted(ids) and a != sorted(ids)
    assert review_order(ids, 1) != a


# -- bench.signals: detectors and whole guards on hand-made runs --------------------------


def test_signal_rates_and_threshold_choice():
    from bench.signals import choose, rates

    rows = [{"harm": True, "s": 0.3}, {"harm": True, "s": 0.1}, {"harm": False, "s": 0.0},
            {"harm": False, "s": 0.05}, {"harm": False, "s": None}]  # fmt: skip
    assert rates(rows, "s", 0.2) == (0.5, 0.0, 2, 2)
    assert rates(rows, "s", 0.0) == (1.0, 0.5, 2, 2)
    assert choose(rows, "s") == 0.05  # catches both harmful checks, no false alarm


def test_guard_outcomes_replay_the_engine_decision():
    from bench.signals import guard_outcomes

    before = [str(i % 10) for i in range(20)]
    collapse = signals(["3"] * 20, before=before)
    run = {"model": "m", "base": {"adapted": signals(before)},
           "rounds": [{"adapted": signals(before, before=before)}, {"adapted": collapse}],
           "deltas": [0.0, 0.01, -0.2]}  # fmt: skip
    # round 1 is clearly healthy, round 2 collapses: the run ends on round 1's delta
    assert guard_outcomes([run], {}) == [0.01]
    off = {"max_marginal_entropy_drop": 1.0, "max_changed_answers": 1.0, "max_invalid_rise": 1.0}
    assert guard_outcomes([run], off) == [0.01]  # the single-answer collapse always trips


def test_letter_collapse_trips_without_a_reference_before():
    """An off-format model had almost no valid answers before (no letter spread to compare
    with); 70% of the images now choosing letter A is a collapse all the same."""
    before = [INVALID] * 18 + ["1", "2"]
    base = signals(before, positions=[0, 1], letters=4)
    now_answers = ["1"] * 14 + ["2", "3", "4", "2", "1", "2"]  # the two valid ones kept
    positions = [0] * 14 + [1, 2, 3, 1, 0, 1]
    now = signals(now_answers, positions=positions, before=before, letters=4)
    verdict = check(base, now, GuardConfig())
    assert verdict.tripped and "same option letter" in verdict.reason
    spread = signals(now_answers, positions=[0, 1, 2, 3] * 5, before=before, letters=4)
    assert not check(base, spread, GuardConfig()).tripped
    # 45% on one letter: within the 60% bound, not clearly healthy (limit 25% + 35% / 2)
    lean = signals(now_answers, positions=[0] * 9 + [1, 2, 3] * 3 + [1, 2], letters=4)
    assert not check(base, lean, GuardConfig()).tripped
    assert check(base, lean, GuardConfig(), scale=0.5).tripped


def test_letter_spread_needs_a_reference_with_mostly_valid_answers():
    """A letter spread measured on a few valid answers before adaptation is no reference:
    its drop does not trip; the letter share still watches."""
    before = [INVALID] * 16 + ["1", "2", "3", "4"]
    base = signals(before, positions=[0, 1, 2, 3], letters=4)
    now = signals(before[16:] * 5, positions=[0, 0, 1, 2] * 5, before=None, letters=4)
    assert not check(base, now, GuardConfig(max_invalid_rise=1.0)).tripped
    valid_before = signals(["1", "2", "3", "4"] * 5, positions=[0, 1, 2, 3] * 5, letters=4)
    verdict = check(valid_before, now, GuardConfig())
    assert verdict.tripped and "spread of chosen option letters" in verdict.reason
