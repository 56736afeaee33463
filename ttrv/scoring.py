"""Scoring: per-token log-probabilities of sampled completions, for the GRPO update.

One forward per micro-batch: with a shared prompt prefix each prompt runs once and its
completions are packed after it in one row under a block attention mask
(`_packed_logprobs`), or run on its repeated KV cache where packing does not fit the
model; otherwise every row is the full prompt + completion sequence. Same numbers as
`sequence_logprobs` per completion (tested per family).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .batching import (
    image_block_ids,
    is_per_token,
    left_pad,
    packed_may_attend,
    packed_positions,
    position_ids,
    row_index,
    split_counts,
    stack_kwargs,
    within_window,
)
from .rollout import (
    Encoded,
    hf_model,
    is_checkpointing,
    kv_cache_of,
    stackable,
    supports_shared_prefix,
    text_positions,
    wants_token_type_ids,
)


def sequence_logprobs(
    model: Any,
    enc: Encoded,
    completions: list[torch.Tensor],
    pad: int,
    temperature: float,
    shared_prefix: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each completion given one prompt: (logprobs [K, T], mask [K, T]).

    Only the completion positions get logits (`logits_to_keep`), so the full-vocabulary
    tensor never covers the prompt.
    """
    if stackable([enc]):
        return batch_logprobs(model, [enc], [completions], pad, temperature, shared_prefix)
    return _pixel_logprobs(model, enc, completions, pad, temperature)


def _pixel_logprobs(
    model: Any, enc: Encoded, completions: list[torch.Tensor], pad: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scoring without cached image features: raw pixel inputs cannot be repeated
    generically (some families flatten patches across images), so each completion runs
    alone with its full prompt."""
    t = max(len(c) for c in completions)
    logps, masks = [], []
    for c in completions:
        comp, mask = _pad_completions([c], pad, enc.input_ids.device)  # [1, T_c]
        kwargs = enc.kwargs()
        kwargs["attention_mask"] = torch.cat([kwargs["attention_mask"], mask.long()], dim=1)
        per_token = (1, enc.length)  # token types cover the prompt; the completion is text, 0
        for key, value in kwargs.items():
            if key != "attention_mask" and getattr(value, "shape", None) == per_token:
                kwargs[key] = torch.cat([value, torch.zeros_like(comp, dtype=value.dtype)], 1)
        out = model(input_ids=torch.cat([enc.input_ids, comp], 1), logits_to_keep=len(c) + 1,
                    use_cache=False, **kwargs)  # fmt: skip
        logp = torch.log_softmax(out.logits[:, :-1, :].float() / temperature, dim=-1)
        logp = logp.gather(-1, comp.unsqueeze(-1)).squeeze(-1) * mask
        logps.append(torch.nn.functional.pad(logp, (0, t - len(c))))
        masks.append(torch.nn.functional.pad(mask, (0, t - len(c))))
    return torch.cat(logps), torch.cat(masks)  # [K, T], [K, T]


def _pad_completions(
    completions: list[torch.Tensor], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Completions right-padded into ids [K, T] and a float mask [K, T].

    Built where the completions are (the host, after sampling) with a fixed handful of
    operators, then copied to `device` once each, instead of two per completion."""
    sizes = [len(c) for c in completions]
    flat = torch.cat(list(completions))  # [sum L]
    lengths = torch.tensor(sizes, device=flat.device)  # [K]
    keep = torch.arange(max(sizes), device=flat.device) < lengths[:, None]  # [K, T]
    comp = torch.full(keep.shape, pad, dtype=torch.long, device=flat.device)
    comp[keep] = flat.long()
    return comp.to(device), keep.to(device=device, dtype=torch.float32)


# Completion tokens one packed row holds at most: a prompt with more is split over several rows
# (its tokens run once per row). Attention over a packed row is quadratic in its width and
# computes the masked-out pairs too, so this bounds that cost and the mask's memory.
PACKED_ROW_TOKENS = 2048

# Families whose token type ids mark image tokens that attend to each other both ways.
IMAGE_BLOCK_MODELS = ("gemma3",)


@dataclass(frozen=True)
class PackedAttention:
    """How a family's decoder takes the attention mask of a packed row (`_packed_logprobs`)."""

    windows: dict[str, int | None] | None  # per layer type, its sliding window; None: one mask
    image_blocks: bool  # token type 1 marks image tokens that attend both ways (Gemma3)
    additive: torch.dtype | None  # eager attention adds a float mask; sdpa takes a boolean one


def packed_attention(model: Any) -> PackedAttention | None:
    """Can this model score a prompt and all its completions in one row, under a 4D mask?

    transformers uses a 4D `attention_mask` as it is (sdpa: True may attend; eager: added to
    the scores), and a dict of them keyed by layer type for models with sliding-window
    layers (Gemma3). Not for: multimodal rope (Qwen-VL), decoders that take no position ids,
    attention kernels that take no dense mask (flash), bidirectional or chunked attention,
    one sliding window over every layer (Mistral), or token types of unknown meaning.
    """
    if not supports_shared_prefix(model) or not text_positions(model):
        return None
    base = hf_model(model)
    text = base.config.get_text_config()
    impl = getattr(text, "_attn_implementation", None)
    if impl not in ("sdpa", "eager") or getattr(text, "use_bidirectional_attention", False):
        return None
    types = getattr(text, "layer_types", None)
    window = getattr(text, "sliding_window", None)
    if types is None and window is not None:
        return None
    kinds = set(types or ["full_attention"])
    if not kinds <= {"full_attention", "sliding_attention"}:
        return None
    windows = None
    if "sliding_attention" in kinds:
        windows = {"full_attention": None, "sliding_attention": window}
    blocks = base.config.model_type in IMAGE_BLOCK_MODELS
    if wants_token_type_ids(model) and not blocks:
        return None
    additive = base.get_input_embeddings().weight.dtype if impl == "eager" else None
    return PackedAttention(windows, blocks, additive)


def _packed_logprobs(
    model: Any,
    packing: PackedAttention,
    encoded: list[Encoded],
    counts: list[int],
    comp: torch.Tensor,
    cmask: torch.Tensor,
    pad: int,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_logprobs` in one forward without repeating prompts: a row per prompt holds the
    prompt once, then its completions' input tokens in slots (`ttrv.batching`). Logits are
    kept for the prompt's last column (every completion's first token) and the slots only."""
    device = comp.device
    s = comp.shape[1] - 1  # slot width: a completion's tokens but its last
    runs = split_counts(counts, max(1, PACKED_ROW_TOKENS // max(s, 1)))  # (prompt, rows)
    k = max(n for _, n in runs)  # slots per packed row
    prompt_of = [i for i, _ in runs]
    ids = left_pad([encoded[i].input_ids for i in prompt_of], pad)  # [M, P]
    mask = left_pad([encoded[i].attention_mask for i in prompt_of], 0)  # [M, P]
    slot = [r * k + j for r, (_, n) in enumerate(runs) for j in range(n)]  # [R]: row, slot
    slot_t = torch.tensor(slot, device=device)  # [R]
    slots = torch.full((len(runs) * k, s), pad, dtype=comp.dtype, device=device)  # [M*K, S]
    slots[slot_t] = comp[:, :-1]
    kw = stack_kwargs([encoded[i].model_kwargs for i in prompt_of], range(len(runs)))
    blocks = None
    for key, value in list(kw.items()):
        if is_per_token(key):  # token types: the completions are text, 0
            if key == "token_type_ids" and packing.image_blocks:
                blocks = image_block_ids(value)
            kw[key] = torch.nn.functional.pad(value, (0, k * s))
    positions = packed_positions(mask, k, s)  # [M, W]
    may = packed_may_attend(mask, k, s, blocks)  # [M, W, W]
    masks = {"full_attention": may}
    if packing.windows is not None:
        masks = {kind: may if w is None else within_window(may, positions, w)
                 for kind, w in packing.windows.items()}  # fmt: skip
    for kind, m in masks.items():  # [M, 1, W, W]
        m = m[:, None]
        if packing.additive is not None:
            m = torch.zeros((), dtype=packing.additive, device=device).masked_fill(
                ~m, torch.finfo(packing.additive).min
            )
        masks[kind] = m
    attention = masks if packing.windows is not None else masks["full_attention"]
    out = model(input_ids=torch.cat([ids, slots.view(len(runs), k * s)], 1),
                attention_mask=attention, position_ids=positions, logits_to_keep=k * s + 1,
                use_cache=False, **kw)  # fmt: skip
    logp = torch.log_softmax(out.logits.float() / temperature, dim=-1)  # [M, 1 + K*S, V]
    # token t of row r is predicted at kept column 0 (t = 0) or 1 + slot*S + t - 1
    col = ((slot_t % k) * s)[:, None] + torch.arange(comp.shape[1], device=device)  # [R, T]
    col[:, 0] = 0
    logp = logp[(slot_t // k)[:, None], col, comp]  # [R, T]
    return logp * cmask, cmask  # [R, T], [R, T]


def batch_logprobs(
    model: Any,
    encoded: list[Encoded],
    completions: list[list[torch.Tensor]],
    pad: int,
    temperature: float,
    shared_prefix: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the completions of several prompts in one forward.

    `completions[i]` are continuations of `encoded[i]`; rows come out prompt by prompt:
    (logprobs [R, T], mask [R, T]). Prompts are left-padded into one batch. With
    `shared_prefix` each prompt runs once: in one packed row with its completions
    (`packed_attention`), or, for families that cannot take a packed row's mask, run first
    with its KV cache (which carries the gradient of the LoRA weights on the prompt)
    repeated for its rows. Otherwise each row is the full prompt + completion sequence. Same
    numbers as `sequence_logprobs` per prompt (tested per family); inputs that cannot be
    stacked are scored prompt by prompt.
    """
    keep = [i for i, c in enumerate(completions) if c]
    encoded = [encoded[i] for i in keep]
    completions = [completions[i] for i in keep]
    if not stackable(encoded):
        parts = [_pixel_logprobs(model, e, c, pad, temperature)
                 for e, c in zip(encoded, completions, strict=True)]  # fmt: skip
        t = max(p[0].shape[1] for p in parts)
        pad_to = lambda x: torch.nn.functional.pad(x, (0, t - x.shape[1]))  # noqa: E731
        return torch.cat([pad_to(p[0]) for p in parts]), torch.cat([pad_to(p[1]) for p in parts])
    device = encoded[0].input_ids.device
    counts = [len(c) for c in completions]
    comp, cmask = _pad_completions([c for cs in completions for c in cs], pad, device)
    t = comp.shape[1]
    packing = packed_attention(model) if shared_prefix else None
    if packing is not None:
        return _packed_logprobs(model, packing, encoded, counts, comp, cmask, pad, temperature)
    ids = left_pad([e.input_ids for e in encoded], pad)  # [M, P]
    mask = left_pad([e.attention_mask for e in encoded], 0)  # [M, P]
    rows = row_index(counts, device)  # [R]
    positions = text_positions(model)
    if shared_prefix and not is_checkpointing(model):
        kw = stack_kwargs([e.model_kwargs for e in encoded], range(len(encoded)))
        if positions:
            kw["position_ids"] = position_ids(mask)
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **kw)
        logits = out.logits[:, -1:, :][rows]  # [R, 1, V]: predicts token 0
        if t > 1:
            cache = kv_cache_of(out)
            cache.reorder_cache(rows)
            attn = torch.cat([mask[rows], cmask.long()], dim=1)[:, :-1]
            extra = {}
            if positions:
                start = mask.sum(-1, keepdim=True)[rows]  # [R, 1]: real prompt tokens
                extra["position_ids"] = start + torch.arange(t - 1, device=device)
            rest = model(input_ids=comp[:, :-1], attention_mask=attn, cache=cache,
                         use_cache=True, **extra).logits  # [R, T-1, V]  # fmt: skip
            logits = torch.cat([logits, rest], dim=1)  # [R, T, V]
    else:
        kw = stack_kwargs([e.model_kwargs for e in encoded], rows.tolist())
        for key, value in kw.items():
            if is_per_token(key):  # token types: the completion is text, 0
                kw[key] = torch.cat([value, torch.zeros_like(comp, dtype=value.dtype)], 1)
        attn = torch.cat([mask[rows], cmask.long()], dim=1)  # [R, P+T]
        if positions:
            kw["position_ids"] = position_ids(attn)
        out = model(input_ids=torch.cat([ids[rows], comp], 1), attention_mask=attn,
                    logits_to_keep=t + 1, use_cache=False, **kw)  # fmt: skip
        logits = out.logits[:, :-1, :]  # [R, T, V]
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp.gather(-1, comp.unsqueeze(-1)).squeeze(-1)
    return logp * cmask, cmask  # [R, T], [R, T]
