"""Items (an image plus what is asked of it) and the prompts the model receives.

A prompt is the user text plus, for multiple choice, the option contents in the order they
are shown. The user text is the task's template (`TaskConfig.wording()`: the person's own,
so a model's trained wording can be reproduced, or the paper's) with its placeholders
filled. Rendering into the model's own chat template happens in `render_prompt`.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .config import ConfigError, TaskConfig

LETTERS = string.ascii_uppercase


@dataclass
class Item:
    """One unlabeled image and what is asked of it. `label` is used only for evaluation."""

    image_id: str  # sha256 of the file bytes (or of the pixels for in-memory images)
    name: str
    image: Image.Image
    question: str | None = None  # per_image tasks
    options: list[str] | None = None  # per-image multiple-choice options
    label: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Prompt:
    text: str
    options: tuple[str, ...] = ()  # option contents in shown order (multiple choice only)


def image_sha256(image: Image.Image) -> str:
    """Content hash of an in-memory image (mode, size and pixels)."""
    h = hashlib.sha256()
    h.update(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def item_options(task: TaskConfig, item: Item) -> list[str]:
    """The options offered for this item (multiple choice and class lists)."""
    options = item.options or task.option_list()
    if task.kind == "multiple_choice" and len(options) < 2:
        raise ConfigError(
            f"Multiple-choice task without options for image {item.name!r}: list the options "
            "in the task or give each image its own."
        )
    return list(options)


def _unescape(text: str) -> str:
    # A form's one-line text box cannot hold a line break, so templates write it as \n.
    return text.replace("\\n", "\n")


def letter_list(n: int) -> str:
    """The letters of `n` options as the paper's wording names them.

    >>> letter_list(2), letter_list(4)
    ('A or B', 'A, B, C, or D')
    """
    letters = LETTERS[:n]
    if n == 2:
        return f"{letters[0]} or {letters[1]}"
    return ", ".join(letters[:-1]) + f", or {letters[-1]}"


def mc_prompt_text(task: TaskConfig, question: str, options: list[str]) -> str:
    """A multiple-choice prompt: the options lettered A, B, ... in the order given, each
    shown by `task.option_format` and joined by `task.option_separator`.

    >>> mc = TaskConfig(kind="multiple_choice", template="{question} Options: {options}",
    ...                 option_format="({letter}) {option}", option_separator="\\n")
    >>> print(mc_prompt_text(mc, "Which digit?", ["2", "1"]))
    Which digit? Options: (A) 2
    (B) 1
    """
    if len(options) > len(LETTERS):
        raise ConfigError(f"{len(options)} options: multiple choice letters at most 26.")
    shown = _unescape(task.option_separator).join(
        _unescape(task.option_format).format(letter=letter, option=option)
        for letter, option in zip(LETTERS, options, strict=False)
    )
    return _unescape(task.wording()).format(
        question=question.strip(), options=shown, letters=letter_list(len(options))
    )


def build_prompt(task: TaskConfig, item: Item, order: list[int] | None = None) -> Prompt:
    """The user text for `item`; `order` permutes multiple-choice options."""
    question = (item.question or task.question).strip()
    if task.kind == "per_image" and not question:
        raise ConfigError(f"Image {item.name!r} has no question and the task has no fallback.")
    if task.kind == "multiple_choice":
        options = item_options(task, item)
        if order is not None:
            options = [options[i] for i in order]
        return Prompt(mc_prompt_text(task, question, options), tuple(options))
    if task.kind == "classes":
        classes = item_options(task, item)
        text = _unescape(task.wording()).format(question=question, classes=", ".join(classes))
        return Prompt(text, tuple(classes))
    return Prompt(_unescape(task.wording()).format(question=question))


def option_orders(
    task: TaskConfig, item: Item, count: int, seed: int, step: int
) -> list[list[int] | None]:
    """`count` option orders for the rollouts of `item` (identity first).

    Deterministic in (seed, image, step), so a resumed run samples the same orders.
    """
    if task.kind != "multiple_choice" or task.option_orders <= 1:
        return [None]
    n = len(item_options(task, item))
    rng = random.Random(f"{seed}:{item.image_id}:{step}")
    orders: list[list[int] | None] = [list(range(n))]
    for _ in range(min(count, task.option_orders) - 1):
        perm = list(range(n))
        rng.shuffle(perm)
        orders.append(perm)
    return orders


def messages_for(prompt: Prompt) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": prompt.text}],
        }
    ]


def render_prompt(processor: Any, prompt: Prompt) -> str:
    """The exact text the model sees, through the model's own chat template."""
    return processor.apply_chat_template(
        messages_for(prompt), add_generation_prompt=True, tokenize=False
    )
