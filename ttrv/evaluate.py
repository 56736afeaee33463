"""Scoring answers against labels. Labels are used for evaluation only, never for training."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .answers import canonical_label
from .config import TaskConfig
from .tasks import Item


def correct(answer: str, label: str, task: TaskConfig) -> bool:
    """Does a canonical answer match a gold label (put in the same canonical form)?"""
    return answer == canonical_label(label, task)


def accuracy(
    answers: Sequence[dict[str, Any]], items: Sequence[Item], task: TaskConfig
) -> float | None:
    """Share of labelled items whose answer is right; None when no item has a label."""
    labels = {it.image_id: it.label for it in items if it.label is not None}
    hits = [correct(a["answer"], labels[a["image_id"]], task) for a in answers
            if a["image_id"] in labels]  # fmt: skip
    return sum(hits) / len(hits) if hits else None
