"""Scoring answers against labels. Labels are used for evaluation only, never for training.

A label is scored in the canonical form of the task's answers (`canonical_label`). A label
that is no answer of the task (a digit for a yes/no question, a name outside the options)
cannot be scored: it counts neither right nor wrong, and `unscorable_labels` names such
labels so that the front ends can say so. (Both sides came out `<invalid>` before, so a
model answering nothing valid scored 100%.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .answers import INVALID, canonical_label
from .config import TaskConfig
from .tasks import Item


def gold(label: str, task: TaskConfig) -> str | None:
    """A label as an answer of the task, None when it is not one (it cannot be scored)."""
    canon = canonical_label(label, task)
    return None if canon == INVALID else canon


def correct(answer: str, label: str, task: TaskConfig) -> bool | None:
    """Does a canonical answer match a gold label? None when the label is no answer of
    the task."""
    target = gold(label, task)
    return None if target is None else answer == target


def accuracy(
    answers: Sequence[dict[str, Any]], items: Sequence[Item], task: TaskConfig
) -> float | None:
    """Share of the items with a scorable label whose answer is right; None when none
    has one."""
    golds = {it.image_id: gold(it.label, task) for it in items if it.label is not None}
    hits = [a["answer"] == golds[a["image_id"]] for a in answers
            if golds.get(a["image_id"]) is not None]  # fmt: skip
    return sum(hits) / len(hits) if hits else None


def unscorable_labels(items: Sequence[Item], task: TaskConfig) -> list[str]:
    """The distinct labels that are no answer of this task, in order of appearance."""
    out: list[str] = []
    for it in items:
        if it.label is not None and gold(it.label, task) is None and it.label not in out:
            out.append(it.label)
    return out
