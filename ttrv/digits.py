"""The offline digits data set (scikit-learn's 1,797 real 8x8 handwritten digits) as Items.

Used by `scripts/make_demo_model.py` (which trains the bundled demo model) and by the
benchmark, so both see exactly the same split and the same multiple-choice protocol.

- `load_digits_split(seed=0)`: fixed train / val / test split (900 / 100 / 797) of
  (image, digit) pairs. Images are 32x32 RGB, dark ink on a white background, made from the
  8x8 originals by nearest-neighbour upscaling (every original pixel is a 4x4 block).
- `mc_options(label, rng, k=4)`: the paper's recognition protocol: the correct digit plus
  k-1 random distractor digits, shuffled.
- `digit_items(split, task_kind, seed)`: `ttrv.tasks.Item`s for one split.

scikit-learn is a dev / benchmark dependency, not an app dependency: it is imported lazily.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

from PIL import Image

from .config import BUNDLED_MODEL, TaskConfig
from .tasks import Item, image_sha256

SPLIT_SIZES = {"train": 900, "val": 100, "test": 797}  # sums to the 1,797 images
IMAGE_SIZE = 32  # side of the images in the split (pixels)
DIGITS = [str(d) for d in range(10)]
MC_QUESTION = "Which digit is shown?"  # the question of the multiple-choice protocol
DIGITS_PREFIX = Path(BUNDLED_MODEL).name  # the bundled model and its siblings (-offformat)


def digit_image(pixels, size: int = IMAGE_SIZE) -> Image.Image:
    """An 8x8 scikit-learn digit (values 0..16, 16 = ink) as a `size` x `size` RGB image.

    Dark ink on white; nearest-neighbour upscaling keeps the original pixels as sharp blocks
    (use a multiple of 8 for `size`, e.g. 32 for the model and 128 for display).
    """
    import numpy as np

    arr = np.asarray(pixels, dtype=np.float64).reshape(8, 8)
    gray = np.clip(np.rint(255.0 - arr * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    img = Image.fromarray(gray).resize((size, size), Image.Resampling.NEAREST)
    return img.convert("RGB")


@lru_cache(maxsize=4)
def _split_indices(seed: int) -> dict[str, tuple[tuple[int, int], ...]]:
    """(scikit-learn index, digit) pairs per split; a fixed permutation of all 1,797."""
    from sklearn.datasets import load_digits

    target = load_digits().target
    order = list(range(len(target)))
    random.Random(seed).shuffle(order)
    out: dict[str, tuple[tuple[int, int], ...]] = {}
    start = 0
    for name, n in SPLIT_SIZES.items():
        out[name] = tuple((i, int(target[i])) for i in order[start : start + n])
        start += n
    assert start == len(target), "split sizes must cover the data set"
    return out


def split_indices(seed: int = 0) -> dict[str, list[tuple[int, int]]]:
    """For each split, the (scikit-learn `load_digits()` index, digit) pairs in split order."""
    return {k: list(v) for k, v in _split_indices(seed).items()}


@lru_cache(maxsize=2)
def _load(seed: int, size: int) -> dict[str, tuple[tuple[Image.Image, int], ...]]:
    from sklearn.datasets import load_digits

    images = load_digits().images
    return {
        name: tuple((digit_image(images[i], size), d) for i, d in pairs)
        for name, pairs in _split_indices(seed).items()
    }


def load_digits_split(
    seed: int = 0, size: int = IMAGE_SIZE
) -> dict[str, list[tuple[Image.Image, int]]]:
    """Splits "train" (900), "val" (100), "test" (797) of (32x32 RGB image, digit) pairs.

    Deterministic in `seed` (seed 0 is the split the bundled model was trained and measured
    on). The lists are fresh; the images are shared (cached) - copy before mutating them.
    """
    return {name: list(pairs) for name, pairs in _load(seed, size).items()}


def mc_options(label: int | str, rng: random.Random, k: int = 4) -> list[str]:
    """The correct digit plus k-1 distinct random distractors, in random order (as strings)."""
    correct = str(label)
    if correct not in DIGITS:
        raise ValueError(f"label must be a digit 0-9 (got {label!r}).")
    if not 2 <= k <= 10:
        raise ValueError(f"k must be between 2 and 10 (got {k}).")
    options = [correct] + rng.sample([d for d in DIGITS if d != correct], k - 1)
    rng.shuffle(options)
    return options


def digit_items(
    split: str = "test",
    task_kind: str = "open",
    seed: int = 0,
    *,
    split_seed: int = 0,
    k: int = 4,
    limit: int | None = None,
) -> list[Item]:
    """Items for one split ("train", "val" or "test"), named like "test-0042".

    `label` is the digit as a string. For `task_kind="multiple_choice"` each item carries its
    own options (`mc_options`, drawn from `random.Random(seed)` in split order), so the
    correct letter is `LETTERS[item.options.index(item.label)]`; other kinds get no options.
    `split_seed` picks the split (0 = the bundled model's), `seed` only the options.
    `meta` records the split, the position in it and the scikit-learn index.
    """
    if split not in SPLIT_SIZES:
        raise ValueError(f"split must be one of {sorted(SPLIT_SIZES)} (got {split!r}).")
    pairs = _load(split_seed, IMAGE_SIZE)[split]
    sk_index = _split_indices(split_seed)[split]
    rng = random.Random(seed)
    items = []
    for pos, (image, digit) in enumerate(pairs[:limit] if limit is not None else pairs):
        options = mc_options(digit, rng, k) if task_kind == "multiple_choice" else None
        items.append(
            Item(
                image_id=image_sha256(image),
                name=f"{split}-{pos:04d}",
                image=image,
                options=options,
                label=str(digit),
                meta={"split": split, "position": pos, "sklearn_index": sk_index[pos][0]},
            )
        )
    return items


# -- does an image look like the training data? ------------------------------------------------
# The bundled model saw only grey, square, dark-on-white digits of 8x8 real pixels. These
# bounds are loose on purpose: they flag photos and inverted or colour images, not a
# digit scanned at another size.
MAX_COLOUR = 20.0  # mean channel spread (max - min of R, G, B) per pixel, 0..255; grey = 0
MAX_ASPECT = 1.5  # longer side / shorter side
MAX_SIDE = 256  # pixels; the model sees every image at 32x32
MIN_BACKGROUND = 128  # mean grey level of the border; training digits sit on white (255)


def unlike_training_digits(image: Image.Image, size: tuple[int, int] | None = None) -> list[str]:
    """Why `image` does not look like the bundled model's training digits ([] = it does).

    `image` may be a thumbnail (colours and background are read from it); `size` is the
    original (width, height) when the thumbnail is smaller.

    >>> unlike_training_digits(Image.new("RGB", (128, 128), "white"))
    []
    >>> unlike_training_digits(Image.new("RGB", (640, 480), (250, 180, 120)), (640, 480))
    ['large (640x480)', 'in colour']
    """
    import numpy as np

    w, h = size or image.size
    reasons = []
    if max(w, h) > MAX_SIDE:
        reasons.append(f"large ({w}x{h})")
    if max(w, h) > MAX_ASPECT * max(1, min(w, h)):
        reasons.append(f"not square ({w}x{h})")
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)  # [H, W, 3]
    if float((rgb.max(axis=2) - rgb.min(axis=2)).mean()) > MAX_COLOUR:
        reasons.append("in colour")
    grey = rgb.mean(axis=2)  # [H, W]
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    if float(border.mean()) < MIN_BACKGROUND:
        reasons.append("dark background")
    return reasons


def is_digits_model(model: str) -> bool:
    """The bundled model or a sibling checkpoint trained on the same 8x8 digits."""
    return bool(model) and Path(model).expanduser().name.startswith(DIGITS_PREFIX)


def task_notes(model: str, task: TaskConfig) -> list[str]:
    """Warnings (not errors) about asking this model this task: the digits models know
    only the prompts they were trained on. Shown by the app before Start and by the CLI."""
    if not is_digits_model(model):
        return []
    trained = {"open": TaskConfig().question, "multiple_choice": MC_QUESTION}
    if task.kind not in trained:
        return [
            f"The digits model was trained on open and multiple-choice prompts only; a "
            f"{task.kind.replace('_', ' ')} task gets digit-like answers or junk."
        ]
    if task.question.strip() != trained[task.kind]:
        return [
            f"The digits model was trained on the question {trained[task.kind]!r} for this "
            "task kind; other wording gets digit-like answers or junk. Ask it that question "
            "(--question / the Task tab)."
        ]
    return []
