"""Which images can the loaded model take? One bad image must never sink a run.

`ttrv.images.load_image` refuses what no model can use (unreadable files, decompression
bombs, extreme strips). What a particular model refuses is only known to its processor:
Qwen2/2.5/3-VL refuse aspect ratios over 200:1, other families have other limits. So once
the model is loaded, `screen_items` runs every image through the model's own processor,
one at a time and exactly as rollouts do, and sets aside the ones it refuses, each with a
`Rejection` that names the file and gives the processor's reason.

Encoding during a run is isolated the same way (`ttrv.rollout`): an image that fails there
raises `ImageEncodeError`, which names every failing image of the call so the caller can
drop them and go on with the rest.

This module imports neither torch nor transformers, so front ends can catch these errors
before loading anything heavy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from .config import TaskConfig
from .images import ImageError
from .tasks import Item, build_prompt, render_prompt


@dataclass(frozen=True)
class Rejection:
    """One image the model cannot take, and why (the message names the file)."""

    image_id: str
    name: str  # the file's path when the item was loaded from a file, else the item's name
    reason: str

    @classmethod
    def of(cls, item: Item, reason: str) -> Rejection:
        return cls(item.image_id, str(item.meta.get("path") or item.name), reason)

    @property
    def message(self) -> str:
        return f"{self.name}: {self.reason}"

    def __str__(self) -> str:
        return self.message


class ImageEncodeError(ImageError):
    """Images of one call that the model could not encode; the others were processed.

    `rejections` lists every failing image of the call (not only the first), so the caller
    can drop them all and repeat the call once with the rest.
    """

    def __init__(self, rejections: Sequence[Rejection]) -> None:
        self.rejections = list(rejections)
        shown = "; ".join(r.message for r in self.rejections)
        count = len(self.rejections)
        super().__init__(f"the model cannot use {count} image{'s' * (count != 1)}: {shown}")

    @property
    def image_ids(self) -> set[str]:
        return {r.image_id for r in self.rejections}


class Screened(NamedTuple):
    """`screen_items`' result: the items the model takes (in their order) and the others."""

    kept: list[Item]
    rejected: list[Rejection]


def processor_reason(error: BaseException) -> str:
    """The processor's own words, said to come from the model's processor."""
    detail = str(error).strip() or type(error).__name__
    return f"the model's processor refuses this image ({detail})"


def screen_items(processor_or_policy: Any, items: Sequence[Item], task: TaskConfig) -> Screened:
    """Split `items` into those the loaded model's processor takes and those it refuses.

    `processor_or_policy` is either a `ttrv.rollout.Policy` (then each image goes through
    `Policy.encode`, as in rollouts: processor, and with the policy's image cache also the
    vision tower, whose output is cached and reused by the run, so screening costs nothing
    extra) or a bare processor (then only the processor call rollouts make is checked:
    chat template, then `processor(text=[...], images=[image])`). Images go one at a time,
    so one refusal costs nothing but itself. Each item is checked with its first prompt
    (options in their given order); other option orders change only text.

    Only image problems are rejections; a task that cannot build a prompt for an item
    (`ConfigError`) and running out of memory propagate.
    """
    encode = getattr(processor_or_policy, "encode", None)
    kept: list[Item] = []
    rejected: list[Rejection] = []
    for item in items:
        prompt = build_prompt(task, item)
        if callable(encode):
            try:
                encode(prompt, item)
            except ImageEncodeError as e:
                rejected += e.rejections
                continue
        else:
            processor = processor_or_policy
            text = render_prompt(processor, prompt)
            try:
                processor(text=[text], images=[item.image], return_tensors="pt")
            except MemoryError:
                raise
            except Exception as e:  # processors raise ValueError, TypeError, ... on images
                rejected.append(Rejection.of(item, processor_reason(e)))
                continue
        kept.append(item)
    return Screened(kept, rejected)
