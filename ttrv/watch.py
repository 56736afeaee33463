"""Which of a run's images are adapted on, and which form the guard's watch pool.

Self-consistency rewards can leave the images they train on untouched while moving the
answers of every other image (seen on a position-biased multiple-choice model: 0 of 20
adapted answers changed, 6-7% of the held-out ones did, at a net loss). A guard that only
looks at the trained images cannot see that, so a seeded share of the session's images is
held out and never trained on: the watch pool. Everything here is pure and seeded by image
id, so a resumed run (whose images may be listed in another order) splits the same way.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from .config import AdaptConfig

T = TypeVar("T")


@dataclass(frozen=True)
class Split:
    adapt: list[str]  # image ids trained on, in the session's order
    watch: list[str]  # image ids of the watch pool, in the session's order
    note: str  # one sentence for the UI and the events

    def to_dict(self) -> dict[str, object]:
        return {"adapt": self.adapt, "watch": self.watch, "note": self.note}


def split_sizes(n_images: int, cfg: AdaptConfig) -> tuple[int, int]:
    """(images adapted on, images in the watch pool) for a session of `n_images`."""
    g, wanted = cfg.guard, cfg.optim.adapt_images
    if n_images <= 0:
        return 0, 0
    if wanted:  # adapt on a sample, watch (some of) the rest
        n_adapt = min(wanted, n_images)
        pool = min(g.max_watch_images, n_images - n_adapt)
    else:
        pool = min(g.max_watch_images, int(n_images * g.watch_share))
    if not g.guard or g.watch_share == 0 or pool < g.min_watch_images:
        pool = 0
    if not wanted:
        n_adapt = n_images - pool
    return n_adapt, pool


def pool_note(n_images: int, cfg: AdaptConfig, n_adapt: int, pool: int) -> str:
    g = cfg.guard
    if not g.guard:
        return "The guard is off: no watch pool."
    if pool:
        rest = n_images - n_adapt - pool
        tail = f"; {rest} more only answered before and after" if rest else ""
        return (
            f"Adapting on {n_adapt} of {n_images} images; the guard watches {pool} others it "
            f"never trains on{tail}."
        )
    if g.watch_share == 0:
        return (
            "The watch pool is switched off (watch_share = 0): the guard watches only the "
            "images it adapts on."
        )
    need = math.ceil(g.min_watch_images / g.watch_share)
    return (
        f"{n_images} images are too few for a watch pool (it needs at least {need} images): "
        "the guard watches only the images it adapts on, so harm to other images goes unseen."
    )


def split_images(image_ids: Sequence[str], cfg: AdaptConfig) -> Split:
    """Seeded split of a session's image ids into the adapted images and the watch pool."""
    ids = list(dict.fromkeys(image_ids))  # a duplicate image is one image
    n_adapt, pool = split_sizes(len(ids), cfg)
    shuffled = sorted(ids)  # independent of the order the session lists its images in
    random.Random(f"{cfg.optim.seed}:watch").shuffle(shuffled)
    watch = set(shuffled[:pool])
    adapt = set(shuffled[pool : pool + n_adapt])
    return Split(
        adapt=[i for i in ids if i in adapt],
        watch=[i for i in ids if i in watch],
        note=pool_note(len(ids), cfg, n_adapt, pool),
    )


def seeded_sample(values: Sequence[T], k: int, seed: int, salt: str) -> list[T]:
    """Up to `k` of `values`, seeded, in their original order (all of them if k >= len)."""
    if k >= len(values):
        return list(values)
    keep = set(random.Random(f"{seed}:{salt}").sample(range(len(values)), k))
    return [v for i, v in enumerate(values) if i in keep]
