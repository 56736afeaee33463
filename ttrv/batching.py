"""Stacking prompts of several images into one model call.

One generate call for all rollouts of a step, and one forward for all trained rollouts,
instead of one per image and option order: on a GPU the per-call overhead (kernel
launches, the generate loop) dominates small and medium models, so this is where the
time goes (docs/performance.md). Everything here is pure tensor bookkeeping:

- prompts are left-padded, so every row's last prompt token sits in the same column and
  generated tokens line up;
- position ids follow the attention mask (as transformers' generate computes them), so a
  padded row sees exactly the positions it would see alone;
- cached image features (`mm_encoder_outputs`) are merged per row in row order, keeping
  only what models read from pre-encoded outputs (pooled and deepstack features).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

# Per-image inputs that stay beside cached features: one row per image, stacked in row
# order (Qwen-VL's patch grids, from which it computes its multimodal positions).
PER_IMAGE_KEYS = ("image_grid_thw", "video_grid_thw")


def is_per_token(key: str) -> bool:
    """Per-token side inputs (token type ids) are every model kwarg that is neither the
    cached features nor a per-image input."""
    return key != "mm_encoder_outputs" and key not in PER_IMAGE_KEYS


def left_pad(rows: Sequence[torch.Tensor], value: int | float) -> torch.Tensor:
    """Stack [1, L_i] tensors into [B, max L] with `value` on the left."""
    width = max(r.shape[-1] for r in rows)
    return torch.cat(
        [torch.nn.functional.pad(r, (width - r.shape[-1], 0), value=value) for r in rows]
    )


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (padding gets 0), as generate does."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


def row_index(counts: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """[sum counts]: the prompt each row belongs to, prompts repeated count times in order."""
    return torch.repeat_interleave(
        torch.arange(len(counts), device=device), torch.tensor(list(counts), device=device)
    )


def _cat_images(parts: Sequence[Any]) -> Any:
    """Concatenate per-prompt image sequences: tensors along dim 0, lists/tuples by items."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(list(parts))
    out = [x for p in parts for x in p]
    return tuple(out) if isinstance(parts[0], tuple) else out


def merge_mm_outputs(per_row: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One `mm_encoder_outputs` for a batch from each row's own (one image per row)."""
    merged: dict[str, Any] = {}
    for modality in per_row[0]:
        outs = [row[modality] for row in per_row]
        fields: dict[str, Any] = {}
        if outs[0].get("pooler_output") is not None:
            fields["pooler_output"] = _cat_images([o["pooler_output"] for o in outs])
        if outs[0].get("deepstack_features") is not None:
            layers = len(outs[0]["deepstack_features"])
            fields["deepstack_features"] = [
                _cat_images([o["deepstack_features"][layer] for o in outs])
                for layer in range(layers)
            ]
        merged[modality] = type(outs[0])(**fields)
    return merged


def can_merge(model_kwargs: dict[str, Any], prompt_length: int) -> bool:
    """Only cached features and per-token side inputs are known to stack; anything else
    (raw pixels of models without feature caching) keeps the one-prompt-per-call path."""
    for key, value in model_kwargs.items():
        if not isinstance(value, torch.Tensor) and key != "mm_encoder_outputs":
            return False
        if key in PER_IMAGE_KEYS and value.shape[0] != 1:
            return False  # several images in one prompt: rows could not be told apart
        if is_per_token(key) and value.shape != (1, prompt_length):
            return False
    return "mm_encoder_outputs" in model_kwargs


def same_feature_shapes(per_prompt: Sequence[dict[str, Any]]) -> bool:
    """Can these prompts' features be concatenated? Batched tensor features ([1, tokens, H])
    must agree past the first dimension; per-image lists of any length always can."""
    for modality in per_prompt[0] if per_prompt else ():
        pools = [p[modality].get("pooler_output") for p in per_prompt]
        tensors = [x for x in pools if isinstance(x, torch.Tensor)]
        if len({tuple(t.shape[1:]) for t in tensors}) > 1:
            return False
    return True


def stack_kwargs(per_prompt: Sequence[dict[str, Any]], rows: Sequence[int]) -> dict[str, Any]:
    """Model kwargs for rows drawn from prompts (`rows[j]` = prompt of row j): per-token
    inputs left-padded with 0, image features and per-image inputs stacked in row order."""
    out: dict[str, Any] = {}
    for key in per_prompt[0]:
        parts = [per_prompt[r][key] for r in rows]
        if key == "mm_encoder_outputs":
            out[key] = merge_mm_outputs(parts)
        elif key in PER_IMAGE_KEYS:
            out[key] = torch.cat(parts)
        else:
            out[key] = left_pad(parts, 0)
    return out


def pack(sizes: Sequence[int], limit: int) -> list[list[int]]:
    """Consecutive chunks of unit indices whose sizes sum to at most `limit` (a unit larger
    than the limit gets a chunk of its own; units are never split)."""
    chunks: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if chunks and total + size <= limit:
            chunks[-1].append(i)
            total += size
        else:
            chunks.append([i])
            total = size
    return chunks


# -- packed rows: a prompt once, then its completions, in one sequence ---------------------
# Row layout: [prompt, left-padded to P][slot 0: S columns][slot 1] ... [slot K-1], each slot
# holding one completion's input tokens (all but its last), right-padded. Every slot sees the
# whole real prompt and itself causally, never another slot, and its positions restart at the
# prompt's length, so each completion gets exactly the numbers of its own full sequence while
# the prompt's tokens run once.


def packed_positions(prompt_mask: torch.Tensor, slots: int, width: int) -> torch.Tensor:
    """Position ids [M, P + slots * width]: the prompt's real tokens 0..L-1 (padding 0), each
    slot's column t at L + t."""
    length = prompt_mask.sum(-1, keepdim=True)  # [M, 1]
    step = torch.arange(slots * width, device=prompt_mask.device) % width  # [K*S]
    return torch.cat([position_ids(prompt_mask), length + step], dim=1)  # [M, W]


def packed_may_attend(
    prompt_mask: torch.Tensor, slots: int, width: int, image_blocks: torch.Tensor | None = None
) -> torch.Tensor:
    """Which key each query of a packed row may attend to: [M, W, W] bool (query, key).

    A slot attends to the prompt and causally to itself; the prompt is causal over its real
    tokens. `image_blocks` [M, P] (-1 for text, else the image's index; Gemma3): tokens of one
    image also attend to each other both ways. Padding queries attend to themselves only, so
    no softmax row is empty."""
    m, p = prompt_mask.shape
    w = p + slots * width
    col = torch.arange(w, device=prompt_mask.device)  # [W]
    seq = ((col - p).div(width if width else 1, rounding_mode="floor") + 1).clamp(min=0)  # [W]
    # same row-independent pattern for every prompt: columns of one sequence are in position
    # order, and the prompt (sequence 0) precedes every slot
    shape = ((seq[None, :] == 0) | (seq[:, None] == seq[None, :])) & (col[None, :] <= col[:, None])
    real = torch.nn.functional.pad(prompt_mask.bool(), (0, w - p), value=True)  # [M, W] keys
    may = shape & (real[:, None, :] | torch.eye(w, dtype=torch.bool, device=col.device))
    if image_blocks is not None:
        blocks = torch.nn.functional.pad(image_blocks, (0, w - p), value=-1)  # [M, W]
        may = may | ((blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0))
    return may  # [M, W, W]


def within_window(may: torch.Tensor, positions: torch.Tensor, window: int) -> torch.Tensor:
    """`may` [M, W, W] limited to keys less than `window` positions behind the query (a
    sliding-window layer: kv > q - window, as transformers defines it)."""
    return may & (positions[:, None, :] > positions[:, :, None] - window)


def image_block_ids(token_type_ids: torch.Tensor) -> torch.Tensor:
    """[M, P]: each run of image tokens (type 1) numbered from 0, text -1 (Gemma3's
    bidirectional image blocks, as transformers' `get_block_sequence_ids_for_mask`)."""
    image = token_type_ids == 1
    start = image & ~torch.nn.functional.pad(image, (1, 0), value=False)[:, :-1]
    return torch.where(image, start.long().cumsum(-1) - 1, -1)


def split_counts(counts: Sequence[int], most: int) -> list[tuple[int, int]]:
    """Each prompt's rows in runs of at most `most`: (prompt, rows) in row order."""
    return [(i, min(most, c - s)) for i, c in enumerate(counts) for s in range(0, c, most)]
