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
