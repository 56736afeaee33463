"""Answer extraction: what counts as the same answer when rollouts vote."""

from __future__ import annotations

import doctest

import pytest

import ttrv.answers
from ttrv.answers import (
    INVALID,
    answer_distribution,
    canonical_label,
    extract_answer,
    normalize_text,
)
from ttrv.config import TaskConfig

MC = TaskConfig(kind="multiple_choice", question="Which digit?", options="3,7,1,9")
ANIMALS = TaskConfig(kind="multiple_choice", question="Which animal?", options="dog,cat,bird,fish")
CLASSES = TaskConfig(
    kind="classes", question="What animal?", options="cat,dog,black cat", synonyms="kitty=cat"
)
YES_NO = TaskConfig(kind="yes_no", question="Is there a cat?")
OPEN = TaskConfig(kind="open", question="How many?", synonyms="a dozen=12")


def test_doctests():
    """The examples in the module's docstrings stay true."""
    result = doctest.testmod(ttrv.answers, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cats!", "cat"),
        ("  Seven. ", "7"),
        ("7.0", "7"),
        ("3.50", "3.5"),
        ("007", "7"),
        ("twenty-one", "21"),
        ("An apple", "apple"),
        ("a", "a"),  # a lone article is kept: it may be the option letter
        ("Café", "cafe"),
        ("dog's", "dog"),
        ("3d", "3d"),
        ("-4", "-4"),
    ],
)
def test_normalize_text(text, expected):
    """Punctuation, case, articles, number words and number spellings do not split votes."""
    assert normalize_text(text) == expected


@pytest.mark.parametrize(
    ("plural", "singular"),
    [
        ("cats", "cat"),
        ("boxes", "box"),
        ("buses", "bus"),
        ("glasses", "glass"),
        ("classes", "class"),
        ("horses", "horse"),
        ("houses", "house"),
        ("puppies", "puppy"),
        ("movies", "movie"),
        ("knives", "knife"),
        ("gloves", "glove"),
        ("tomatoes", "tomato"),
        ("shoes", "shoe"),
        ("bananas", "banana"),
        ("churches", "church"),
        ("headaches", "headache"),
        ("children", "child"),
    ],
)
def test_plurals_become_singular(plural, singular):
    assert normalize_text(plural) == singular


@pytest.mark.parametrize(
    "word", ["glass", "bus", "gas", "is", "this", "tennis", "octopus", "species", "news", "lens"]
)
def test_singular_words_ending_in_s_are_kept(word):
    """A naive rule strips the s of glass, bus, tennis: they must stay as they are."""
    assert normalize_text(word) == word


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("B", "7"),
        ("B.", "7"),
        ("(B)", "7"),
        ("b", "7"),
        ("**C**", "1"),
        ("Answer: B", "7"),
        ("The answer is B", "7"),
        ("The correct option is 'D'.", "9"),
        ("answer: (b)", "7"),
        ("It's option d", "9"),
        ("B. 7", "7"),
        ("C) 1", "1"),
        ("I think it's B", "7"),  # the pronoun I is not option I
        ("A\n\nBecause the digit has a loop.", "3"),
        ("A is correct", "3"),
        ("7", "7"),  # option content, not a letter
        ("seven", "7"),
        ("\\boxed{B}", "7"),
        ("<answer>D</answer><|im_end|>", "9"),
        ("<answer>A</answer> wait <answer>C</answer>", "1"),
        ("<think>A or B?</think> C", "1"),
    ],
)
def test_multiple_choice_letters_and_contents(response, expected):
    assert extract_answer(response, MC) == expected


def test_multiple_choice_votes_on_content_across_orders():
    """Votes pool across option orders: letter B means the content shown second."""
    assert extract_answer("B", MC, options=("3", "7", "1", "9")) == "7"
    assert extract_answer("D", MC, options=("1", "9", "3", "7")) == "7"
    assert extract_answer("B", MC, options=("9", "3", "7", "1")) == "3"


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("It is a cat.", "cat"),  # reference quirk: upper-casing made this option A (dog)
        ("a cat", "cat"),
        ("A cat", "cat"),
        ("The answer is a bird", "bird"),
        ("Answer: A fish", "fish"),
        ("a", "dog"),  # a bare letter is the option, an article never stands alone
        ("a.", "dog"),
        ("(a)", "dog"),
        ("The answer is a", "dog"),
    ],
)
def test_article_a_is_not_option_a(response, expected):
    """The reference code upper-cased the text, so every article "a" voted for option A."""
    assert extract_answer(response, ANIMALS) == expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("B, but the answer is D", "9"),  # the last explicit statement wins
        ("Answer: B. Actually, the answer is C.", "1"),
        ("B or C", "7"),  # no statement: the first letter named
        ("Not A, it's B", "7"),  # a negated letter is skipped
    ],
)
def test_multiple_choice_ambiguous_letters(response, expected):
    assert extract_answer(response, MC) == expected


@pytest.mark.parametrize(
    "response",
    ["E", "Z.", "The answer is F", "", "   ", "<|im_end|>", "</s>", "<end_of_turn>", "<think>A or"],
)
def test_multiple_choice_invalid(response):
    """Letters beyond the options, empty output and cut-off reasoning are INVALID."""
    assert extract_answer(response, MC) == INVALID


def test_letter_form_beats_content_and_content_beats_inner_letters():
    """ "A. cat" names letter A (dog); "Vitamin C" is an option content, not option C."""
    assert extract_answer("A. cat", ANIMALS) == "dog"
    assert extract_answer("B) dog", ANIMALS) == "cat"
    vitamins = TaskConfig(
        kind="multiple_choice", question="Which?", options="Vitamin A,Vitamin C,Iron"
    )
    assert extract_answer("Vitamin C", vitamins) == "vitamin c"
    assert extract_answer("Vitamin A", vitamins) == "vitamin a"
    assert extract_answer("C", vitamins) == "iron"


def test_multiple_choice_content_mentions():
    assert extract_answer("It looks like a bird to me", ANIMALS) == "bird"
    assert extract_answer("a dog chasing a cat", ANIMALS) == INVALID  # two options named
    assert extract_answer("a horse", ANIMALS) == INVALID


def test_multiple_choice_without_options_is_an_error():
    task = TaskConfig(kind="multiple_choice", question="Which?", options="")
    with pytest.raises(ValueError, match="shown options"):
        extract_answer("B", task)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("cat", "cat"),
        ("Cats.", "cat"),
        ("It is a cat.", "cat"),
        ("Kitty", "cat"),  # synonym
        ("a black cat", "black cat"),  # "cat" inside "black cat" does not count on its own
        ("The dogs", "dog"),
        ("cat and dog", INVALID),
        ("fish", INVALID),
        ("", INVALID),
    ],
)
def test_classes(response, expected):
    assert extract_answer(response, CLASSES) == expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("yes", "yes"),
        ("Yes.", "yes"),
        ("yes, it is", "yes"),
        ("NO", "no"),
        ("No, there is not.", "no"),
        ("True", "yes"),
        ("false", "no"),
        ("I think yes", "yes"),
        ("There is no cat", "no"),
        ("maybe", INVALID),
        ("I can't say yes or no", INVALID),
        ("<end_of_turn>", INVALID),
    ],
)
def test_yes_no(response, expected):
    assert extract_answer(response, YES_NO) == expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("7", "7"),
        ("Seven.", "7"),
        ("There are 7 dogs.", "7"),
        ("The answer is: 7.0", "7"),
        ("Answer:\n7", "7"),
        ("a dozen", "12"),  # synonym
        ("A red bus", "red bus"),
        ("2 cats and 3 dogs", "2 cat and 3 dog"),
        ("It's a red bus.\nThe bus is parked.", "red bus"),
        ("one two three four five six seven eight nine ten eleven", "1 2 3 4 5 6 7 8 9 10"),
        ("<|im_end|>", INVALID),
    ],
)
def test_open_answers(response, expected):
    assert extract_answer(response, OPEN) == expected


def test_per_image_uses_free_text():
    task = TaskConfig(kind="per_image", question="What is it?")
    assert extract_answer("The Red Buses", task) == "red bus"


def test_canonical_label_matches_extracted_answers():
    """Gold labels land in the same canonical form, so accuracy compares equal strings."""
    assert canonical_label("Seven", MC) == extract_answer("B", MC)
    assert canonical_label("Kitty", CLASSES) == "cat"
    assert canonical_label("Yes", YES_NO) == "yes"
    assert canonical_label("There are 7", OPEN) == "7"


def test_answer_distribution():
    dist = answer_distribution(["7", "7", "7", "1", INVALID, INVALID, "7", "7"])
    assert dist == {"7": 5 / 8, INVALID: 2 / 8, "1": 1 / 8}
    assert list(dist) == ["7", INVALID, "1"]  # most common first
    assert answer_distribution([]) == {}


def test_labels_that_are_no_answer_of_the_task_are_not_scored():
    """A digit label on a yes/no task is no answer of it: it used to become <invalid> like
    the model's invalid answers, so a model answering nothing valid scored 100%."""
    from PIL import Image

    from ttrv.answers import INVALID
    from ttrv.config import TaskConfig
    from ttrv.evaluate import accuracy, correct, unscorable_labels
    from ttrv.tasks import Item

    yes_no = TaskConfig(kind="yes_no", question="Is this a seven?")
    blank = Image.new("RGB", (4, 4))
    items = [Item(f"i{k}", f"{k}.png", blank, label=label)
             for k, label in enumerate(["5", "7", "yes", "no"])]  # fmt: skip
    answers = [{"image_id": f"i{k}", "answer": INVALID} for k in range(4)]
    assert correct(INVALID, "5", yes_no) is None
    assert accuracy(answers[:2], items[:2], yes_no) is None  # nothing scorable: no accuracy
    assert accuracy(answers, items, yes_no) == 0.0  # yes/no labels: invalid answers are wrong
    right = [{"image_id": "i2", "answer": "yes"}, {"image_id": "i3", "answer": "yes"}]
    assert accuracy(right, items, yes_no) == 0.5
    assert unscorable_labels(items, yes_no) == ["5", "7"]
    assert unscorable_labels(items, TaskConfig()) == []  # an open task takes any text
