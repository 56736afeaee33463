"""Prompt templates (issue 10): each task kind's wording is an editable template, so a model
trained on its own wording can be posed as it was trained. The multiple-choice kind used to
rewrite every instruction in the paper's words, and such a model then answered empty."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from ttrv.answers import INVALID, extract_answer
from ttrv.config import BUNDLED_MODEL, DEFAULT_TEMPLATES, ConfigError, ModelConfig, TaskConfig
from ttrv.tasks import LETTERS, Item, build_prompt, option_orders

# The wording a multiple-choice model was trained on (issue 10).
TRAINED = (
    "Choose the correct answer from the options below and respond with only the option "
    "letter. Options: A. 2 B. 1 C. 0 D. 8"
)
TRAINED_TASK = TaskConfig(
    kind="multiple_choice",
    template="Choose the correct answer from the options below and respond with only the "
    "option letter. Options: {options}",
)
DIGIT = Path(BUNDLED_MODEL).parent.parent / "demo" / "digits" / "test-0000.png"


def paper_text(kind: str, question: str, options: list[str]) -> str:
    """The prompt text before templates existed (ttrv/tasks.py at 94aa0cd), kept verbatim:
    the default templates must reproduce it exactly."""
    if kind == "multiple_choice":
        letters = [LETTERS[i] for i in range(len(options))]
        if len(letters) == 2:
            letter_list = f"{letters[0]} or {letters[1]}"
        else:
            letter_list = ", ".join(letters[:-1]) + f", or {letters[-1]}"
        shown = " ".join(f"{letter}. {opt}" for letter, opt in zip(letters, options, strict=True))
        return (
            f"{question.strip()} Choose the correct answer from the options below and respond "
            f"with only the corresponding option letter ({letter_list}). Do not include any "
            f"explanation or extra text. Options: {shown}"
        )
    if kind == "classes":
        return f"{question} Answer with one of: {', '.join(options)}."
    if kind == "yes_no":
        return f"{question} Answer yes or no."
    return question


OPTION_SETS = [["cat", "dog"], ["3", "7", "1"], ["2", "1", "0", "8"], list(LETTERS)]


@pytest.mark.parametrize("kind", list(DEFAULT_TEMPLATES))
def test_default_template_renders_todays_prompt_exactly(kind):
    for options, question, own in itertools.product(
        OPTION_SETS, ["Which digit is shown?", "  What {is} this?  "], [None, "Own question?"]
    ):
        task = TaskConfig(kind=kind, question=question, options=",".join(options))
        item = Item("id", "a.png", None, question=own if kind == "per_image" else None)
        asked = (item.question or question).strip()
        prompt = build_prompt(task, item)
        assert prompt.text == paper_text(kind, asked, options)
        if kind == "multiple_choice":  # and with the options reordered
            order = list(reversed(range(len(options))))
            shown = [options[i] for i in order]
            assert build_prompt(task, item, order).text == paper_text(kind, asked, shown)


def test_trained_wording_is_reproduced_exactly():
    prompt = build_prompt(TRAINED_TASK, Item("id", "a.png", None, options=["2", "1", "0", "8"]))
    assert prompt.text == TRAINED
    assert prompt.options == ("2", "1", "0", "8")


def test_option_format_separator_and_line_breaks():
    task = TaskConfig(
        kind="multiple_choice",
        options="2,1",
        template="{question}\\nOptions:\\n{options}\\nAnswer with {letters}.",
        option_format="({letter}) {option}",
        option_separator="\\n",
    )
    prompt = build_prompt(task, Item("id", "a.png", None), order=[1, 0])
    assert (
        prompt.text
        == "Which digit is shown? Answer with a single digit.\nOptions:\n(A) 1\n(B) 2\nAnswer with A or B."
    )
    # letters still map to the options as shown
    assert extract_answer("(B)", task, prompt.options) == "2"
    assert extract_answer("A", task, prompt.options) == "1"


def test_other_kinds_use_their_template():
    classes = TaskConfig(kind="classes", options="cat,dog", template="{question} ({classes})")
    assert build_prompt(classes, Item("id", "a", None)).text.endswith("(cat, dog)")
    yes_no = TaskConfig(kind="yes_no", question="Is it a 7?", template="Q: {question} A:")
    assert build_prompt(yes_no, Item("id", "a", None)).text == "Q: Is it a 7? A:"
    literal = TaskConfig(template="{{json}} {question}")
    assert build_prompt(literal, Item("id", "a", None)).text.startswith("{json} Which digit")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (
            {"template": "{question} {choices}"},
            r"unknown placeholder \{choices\}: use \{question\}",
        ),
        (
            {"kind": "multiple_choice", "template": "{question} {option}"},
            r"\{option\}: use \{question\}, \{options\}, \{letters\}",
        ),
        (
            {"kind": "yes_no", "template": "{question} {options}"},
            r"unknown placeholder \{options\}",
        ),
        ({"template": "{question!r}"}, r"unknown placeholder \{question!r\}"),
        ({"template": "{}"}, r"unknown placeholder \{\}"),
        ({"template": "{question"}, "stray brace"),
        (
            {"kind": "multiple_choice", "template": "{question}"},
            r"must show the options: put \{options\}",
        ),
        ({"kind": "per_image", "template": "Describe it."}, r"must hold \{question\}"),
        ({"option_format": "{letter}) {opt}"}, r"option_format has an unknown placeholder \{opt\}"),
        ({"option_format": "{letter}"}, r"put \{option\} in it"),
    ],
)
def test_bad_templates_are_refused_clearly(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        TaskConfig(**kwargs)


def test_template_is_stored_with_the_session_config():
    from ttrv.config import AdaptConfig

    cfg = AdaptConfig(task=TRAINED_TASK)
    again = AdaptConfig.from_dict(cfg.to_dict())
    assert again.task.template == TRAINED_TASK.template
    assert (
        build_prompt(again.task, Item("i", "a", None, options=["2", "1", "0", "8"])).text == TRAINED
    )


@pytest.mark.slow
def test_rollouts_and_greedy_answers_see_the_template():
    """The engine's prompts (rollouts, greedy answers) are built from the template."""
    from ttrv.adapt import make_policy
    from ttrv.config import RolloutConfig
    from ttrv.images import load_items
    from ttrv.loading import load_model
    from ttrv.rollout import rollout_groups

    items, _ = load_items([str(DIGIT)])
    items[0].options = ["2", "1", "0", "8"]
    policy = make_policy(load_model(ModelConfig()))
    task = TaskConfig(**{**TRAINED_TASK.__dict__, "option_orders": 2})
    cfg = RolloutConfig(n_rollouts=4, n_train=4, max_new_tokens=2)
    orders = [option_orders(task, items[0], cfg.n_rollouts, seed=0, step=0)]
    (group,) = rollout_groups(policy, items, task, cfg, orders)
    assert group.encoded[0].prompt.text == TRAINED
    assert TRAINED in group.encoded[0].text  # inside the model's chat template
    reordered = group.encoded[1].prompt
    assert reordered.text.startswith(TRAINED_TASK.template.split("{")[0])
    assert reordered.options != group.encoded[0].prompt.options
    # each rollout's answer is an option content (or invalid), whatever its order
    assert set(group.answers) <= {"2", "1", "0", "8", INVALID}


@pytest.mark.slow
def test_prompt_preview_shows_the_template():
    """The preview (a worker job renders the prompt; the UI parses) shows the template."""
    import dataclasses

    from sessions.worker import render_preview
    from ui.task_tab import parsed_text, preview_prompt

    image = {"image_id": "x", "name": "x.png", "options": ["2", "1", "0", "8"]}
    prompt, item = preview_prompt(TRAINED_TASK, image)
    request = {"model": BUNDLED_MODEL, "task": dataclasses.asdict(TRAINED_TASK), "item": item}
    text = render_preview(request)["prompt"]
    assert TRAINED in text and text != TRAINED  # the chat template was applied
    parsed = parsed_text(TRAINED_TASK, prompt, "B")
    assert "parsed as **1**" in parsed
    assert TRAINED_TASK.template in parsed and "the task's template" in parsed
    default_task = TaskConfig(kind="multiple_choice")
    default = parsed_text(default_task, preview_prompt(default_task, image)[0], "B")
    assert DEFAULT_TEMPLATES["multiple_choice"] in default and "the paper's wording" in default
