"""Rollouts: encode an image once and sample N answers (their log-probabilities for the
update are `ttrv.scoring`'s, the sampling noise `ttrv.keyed`'s).

The vision tower is frozen, so an image's encoder output is computed once (`ImageCache`)
and reused for all N rollouts, the training forward passes and every round. Sampling and
scoring hand the cached features to transformers through `mm_encoder_outputs`, which every
supported family accepts; models that do not fall back to re-encoding pixels.

One bad image never takes down the images it is batched with: every image is encoded on its
own, and a batched generate call that fails is repeated prompt by prompt. Images that fail
raise `ttrv.screening.ImageEncodeError` naming each of them (after the others have been
encoded), so the caller can drop them and repeat the call with the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .answers import extract_answer
from .batching import (
    PER_IMAGE_KEYS,
    can_merge,
    is_per_token,
    left_pad,
    pack,
    position_ids,
    row_index,
    same_feature_shapes,
    stack_kwargs,
)
from .config import RolloutConfig, TaskConfig
from .keyed import keyed_kwargs, row_keys
from .screening import ImageEncodeError, Rejection, processor_reason
from .tasks import Item, Prompt, build_prompt, render_prompt


@dataclass
class Encoded:
    """One prompt for one image, ready for the model."""

    prompt: Prompt
    text: str  # the exact rendered prompt
    input_ids: torch.Tensor  # [1, P]
    attention_mask: torch.Tensor  # [1, P]
    model_kwargs: dict[str, Any]  # image inputs: cached encoder outputs or raw pixels
    item: Item | None = None  # whose image (to name it when it fails)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    def kwargs(self) -> dict[str, Any]:
        """Model kwargs for one call. transformers expands encoder outputs in place for
        num_return_sequences, so every call gets fresh containers (tensors are shared)."""
        kw = {"attention_mask": self.attention_mask, **self.model_kwargs}
        mm = kw.get("mm_encoder_outputs")
        if mm is not None:
            kw["mm_encoder_outputs"] = {m: type(o)(**dict(o.items())) for m, o in mm.items()}
        return kw


@dataclass
class Group:
    """The N rollouts of one image in one step."""

    item: Item
    encoded: list[Encoded]  # one per option order
    prompt_index: list[int]  # which `encoded` each rollout used
    completions: list[torch.Tensor]  # token ids per rollout, trimmed after the first EOS
    responses: list[str]
    answers: list[str]
    train_mask: list[bool] = field(default_factory=list)


def hf_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def supports_cached_images(model: Any) -> bool:
    base = hf_model(model)
    check = getattr(base, "_supports_mm_encoder_outputs", None)
    return bool(
        check and check() and hasattr(base, "_prepare_multimodal_encoder_kwargs_for_generation")
    )


class ImageCache:
    """Encoder outputs per (image, prompt) so the frozen vision tower runs once per image."""

    def __init__(self, model: Any, enabled: bool = True) -> None:
        self.model = model
        self.enabled = enabled and supports_cached_images(model)
        self._cache: dict[str, tuple[dict[str, Any], set[str]]] = {}
        self.hits = 0
        self.misses = 0

    def image_kwargs(self, image_id: str, raw: dict[str, Any]) -> dict[str, Any]:
        if not self.enabled:
            return raw
        if image_id in self._cache:
            self.hits += 1
        else:
            self.misses += 1
            base = hf_model(self.model)
            with torch.no_grad():
                out = base._prepare_multimodal_encoder_kwargs_for_generation(dict(raw))
            # Keys the encoder consumed (pixels) are replaced by its output; keys that depend
            # on the prompt (token type ids) stay per prompt. The patch grids stay too: Qwen-VL
            # builds its multimodal positions from them, and without them its image tokens
            # silently get plain 1-D positions (different logits; tested).
            consumed = set(raw) - set(out) - set(PER_IMAGE_KEYS)
            self._cache[image_id] = (out["mm_encoder_outputs"], consumed)
        features, consumed = self._cache[image_id]
        kwargs = {k: v for k, v in raw.items() if k not in consumed}
        kwargs["mm_encoder_outputs"] = features
        return kwargs

    def clear(self) -> None:
        self._cache.clear()


@dataclass
class Policy:
    """Everything rollouts need from a loaded model, gathered once."""

    model: Any
    processor: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    eos: list[int]
    pad: int
    suppress: list[int]
    cache: ImageCache
    keep_token_type_ids: bool = False
    shared_prefix: bool = False  # run each prompt once and share its KV cache (see sample)
    switch_train_mode: bool = True  # model.train() for updates (`train_mode_matters`)

    def encode(self, prompt: Prompt, item: Item) -> Encoded:
        """One prompt for one image. Raises `ImageEncodeError` naming the image when the
        processor refuses it or the vision tower fails on it (not when out of memory)."""
        text = render_prompt(self.processor, prompt)
        try:
            batch = self.processor(text=[text], images=[item.image], return_tensors="pt")
        except Exception as e:  # processors raise ValueError, TypeError, ... on images
            if _out_of_memory(e):
                raise
            raise ImageEncodeError([Rejection.of(item, processor_reason(e))]) from e
        batch = {
            k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
        }
        for key in ("pixel_values", "pixel_values_images"):
            if key in batch and batch[key].is_floating_point():
                batch[key] = batch[key].to(self.dtype)
        input_ids = batch.pop("input_ids")
        attention_mask = batch.pop("attention_mask")
        if not self.keep_token_type_ids:
            batch.pop("token_type_ids", None)
        try:
            kwargs = self.cache.image_kwargs(item.image_id, batch)
        except Exception as e:
            if _out_of_memory(e):
                raise
            reason = f"the model's vision encoder fails on this image ({type(e).__name__}: {e})"
            raise ImageEncodeError([Rejection.of(item, reason)]) from e
        return Encoded(prompt, text, input_ids, attention_mask, kwargs, item)

    def encode_all(self, prompts: list[list[Prompt]], items: list[Item]) -> list[list[Encoded]]:
        """`prompts[i]` of `items[i]`, each image encoded on its own. When some fail, the
        rest are still encoded (and their features cached), then one `ImageEncodeError`
        names every failing image."""
        encoded: list[list[Encoded]] = []
        rejections: list[Rejection] = []
        for item_prompts, item in zip(prompts, items, strict=True):
            try:
                encoded.append([self.encode(p, item) for p in item_prompts])
            except ImageEncodeError as e:
                rejections += e.rejections
        if rejections:
            raise ImageEncodeError(rejections)
        return encoded

    def generation_kwargs(self, cfg: RolloutConfig, sample: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": cfg.max_new_tokens,
            "eos_token_id": self.eos,
            "pad_token_id": self.pad,
            "suppress_tokens": self.suppress or None,
            "do_sample": sample,
        }
        if sample:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


def _out_of_memory(error: BaseException) -> bool:
    """Memory is not a property of one image: such errors are never blamed on an image."""
    return isinstance(error, MemoryError | torch.OutOfMemoryError)


def _multimodal_rope(model: Any) -> bool:
    """Qwen-VL computes its positions from the image layout (multimodal rope)."""
    base = hf_model(model)
    return hasattr(getattr(base, "model", base), "get_rope_index")


def supports_shared_prefix(model: Any) -> bool:
    """Can a prompt's KV cache be reused for continuations run without the image?

    Not for models whose text positions depend on the image layout (Qwen-VL's multimodal
    rope computes them from the full input): they keep the full-sequence path.
    """
    return supports_cached_images(model) and not _multimodal_rope(model)


def wants_token_type_ids(model: Any) -> bool:
    """Gemma3 needs token type ids (bidirectional attention over image tokens)."""
    import inspect

    return "token_type_ids" in inspect.signature(hf_model(model).forward).parameters


def _trim_ids(ids: list[int], eos: list[int], pad: int) -> list[int]:
    out = []
    for t in ids:
        out.append(t)
        if t in eos:
            break
    while out and out[-1] == pad and pad not in eos:
        out.pop()
    return out


def trim_completion(tokens: torch.Tensor, eos: list[int], pad: int) -> torch.Tensor:
    """Cut after the first EOS (kept: the model must learn to stop); drop trailing pad."""
    return torch.tensor(_trim_ids(tokens.tolist(), eos, pad), dtype=torch.long)


def trim_rows(
    tokens: torch.Tensor, eos: list[int], pad: int
) -> tuple[list[torch.Tensor], list[list[int]]]:
    """`trim_completion` of every row of host tokens [R, T], read into Python once: (each
    row's trimmed tokens as a view [L_i], the same as lists of ids)."""
    ids = [_trim_ids(row, eos, pad) for row in tokens.tolist()]
    return [tokens[i, : len(r)] for i, r in enumerate(ids)], ids


@torch.no_grad()
def sample(
    model: Any,
    enc: Encoded,
    n: int,
    gen_kwargs: dict[str, Any],
    shared_prefix: bool = False,
) -> torch.Tensor:
    """n continuations of one encoded prompt: [n, T] token ids (padded).

    With `shared_prefix`, the prompt (image included) is run once and its KV cache repeated
    n times, instead of transformers prefilling n copies of the same prompt.
    """
    if not shared_prefix or n == 1 or enc.length < 2:
        out = model.generate(
            input_ids=enc.input_ids, num_return_sequences=n, **enc.kwargs(), **gen_kwargs
        )
    else:
        kwargs = {k: v for k, v in enc.kwargs().items() if k != "attention_mask"}
        rows = torch.zeros(n, dtype=torch.long, device=enc.input_ids.device)
        out = _generate_on_shared_prefix(
            model, enc.input_ids, enc.attention_mask, kwargs, rows, gen_kwargs
        )
    return out[:, enc.length :].cpu()  # [n, T]; one copy to the host, not one per row


def decode(tokenizer: Any, tokens: torch.Tensor | list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def rollout_group(
    policy: Policy,
    item: Item,
    task: TaskConfig,
    cfg: RolloutConfig,
    orders: list[list[int] | None],
) -> Group:
    """Sample N rollouts of one item, split evenly over the given option orders."""
    return rollout_groups(policy, [item], task, cfg, [orders])[0]


def text_positions(model: Any) -> bool:
    """Does the model take plain text position ids? (Qwen-VL computes its own multimodal
    positions from the attention mask and must not be given any.)"""
    import inspect

    forward = inspect.signature(hf_model(model).forward).parameters
    return "position_ids" in forward and not _multimodal_rope(model)


def stackable(encoded: list[Encoded]) -> bool:
    return all(can_merge(e.model_kwargs, e.length) for e in encoded) and same_feature_shapes(
        [e.model_kwargs["mm_encoder_outputs"] for e in encoded]
    )


def _generate_on_shared_prefix(
    model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    kwargs: dict[str, Any],
    rows: torch.Tensor,
    gen_kwargs: dict[str, Any],
) -> torch.Tensor:
    """Run the prompts [M, P] once without their last token, repeat each one's KV cache for
    its rows (`rows[j]` = prompt of row j), then generate: [R, P + T] token ids."""
    width = ids.shape[1]
    kw = {  # per-token side inputs (token types) cut to the prefix
        k: v[:, : width - 1]
        if is_per_token(k) and getattr(v, "ndim", 0) == 2 and v.shape[1] == width
        else v
        for k, v in kwargs.items()
    }
    if text_positions(model):
        kw["position_ids"] = position_ids(mask[:, :-1])
    out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True,
                logits_to_keep=1, **kw)  # fmt: skip
    cache = kv_cache_of(out)
    cache.reorder_cache(rows)
    return model.generate(input_ids=ids[rows], attention_mask=mask[rows], cache=cache, **gen_kwargs)


def _generate_tokens(enc: Encoded, count: int, new: int, shared_prefix: bool) -> int:
    """KV-cache tokens one prompt's rows hold at the end of generation."""
    return enc.length + count * new if shared_prefix else count * (enc.length + new)


@torch.no_grad()
def sample_many(
    policy: Policy,
    encoded: list[Encoded],
    counts: list[int],
    gen_kwargs: dict[str, Any],
    batch_tokens: int | None = None,
    keys: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Continuations of several prompts in one generate call: [counts[i], T] per prompt.

    Prompts are left-padded into one batch. With `policy.shared_prefix` the prompts run once
    (one batched prefill) and each one's KV cache is repeated for its rows; otherwise every
    row carries its prompt. Models whose inputs cannot be stacked sample prompt by prompt.
    With `batch_tokens`, prompts are split over several calls so that none holds more
    tokens than that (a prompt's rows are never split). With `keys` (per prompt, [counts[i],
    2]) each row samples from its own keyed noise (`KeyedSampler`): the same tokens
    whichever prompts share the call.
    """
    if batch_tokens is not None and len(encoded) > 1:
        new = gen_kwargs["max_new_tokens"]
        shared = policy.shared_prefix
        costs = [_generate_tokens(e, c, new, shared) for e, c in zip(encoded, counts, strict=True)]
        chunks = pack(costs, batch_tokens)
        if len(chunks) > 1:
            return [
                out
                for chunk in chunks
                for out in sample_many(
                    policy,
                    [encoded[i] for i in chunk],
                    [counts[i] for i in chunk],
                    gen_kwargs,
                    keys=[keys[i] for i in chunk] if keys is not None else None,
                )
            ]
    if not stackable(encoded):
        return _sample_each(policy, encoded, counts, gen_kwargs, keys=keys)
    try:
        return _sample_stacked(policy, encoded, counts, gen_kwargs, keys)
    except Exception as e:
        if _out_of_memory(e):
            raise
        # One image's inputs can break the whole batch; prompt by prompt, only its own
        # prompts fail and `_sample_each` names it. (Good batches never get here, and a
        # batch that failed for every image re-raises this error.)
        return _sample_each(policy, encoded, counts, gen_kwargs, batch_error=e, keys=keys)


def _sample_stacked(
    policy: Policy,
    encoded: list[Encoded],
    counts: list[int],
    gen_kwargs: dict[str, Any],
    keys: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """All prompts in one generate call (the fast path; see `sample_many`)."""
    if keys is not None:
        gen_kwargs = keyed_kwargs(gen_kwargs, torch.cat(keys))  # rows come prompt by prompt
    model, device = policy.model, encoded[0].input_ids.device
    ids = left_pad([e.input_ids for e in encoded], policy.pad)  # [M, P]
    mask = left_pad([e.attention_mask for e in encoded], 0)  # [M, P]
    rows = row_index(counts, device)  # [R]
    width = ids.shape[1]
    if policy.shared_prefix and width >= 2:
        kw = stack_kwargs([e.model_kwargs for e in encoded], range(len(encoded)))
        tokens = _generate_on_shared_prefix(model, ids, mask, kw, rows, gen_kwargs)
    else:
        kw = stack_kwargs([e.model_kwargs for e in encoded], rows.tolist())
        tokens = model.generate(input_ids=ids[rows], attention_mask=mask[rows], **kw, **gen_kwargs)
    # one copy to the host for all rows (trimming reads each row's tokens)
    return list(tokens[:, width:].cpu().split(list(counts)))


def _sample_each(
    policy: Policy,
    encoded: list[Encoded],
    counts: list[int],
    gen_kwargs: dict[str, Any],
    batch_error: Exception | None = None,
    keys: list[torch.Tensor] | None = None,
) -> list[torch.Tensor | None]:
    """Prompt by prompt. Prompts that fail are tried to the end, then one
    `ImageEncodeError` names their images. When every image fails (two or more), the
    problem is not an image, and the error is raised as it is; a lone image that fails is
    named (there is nothing to compare it with, and naming it lets the run go on)."""
    out: list[torch.Tensor | None] = []
    failed: dict[str, tuple[Item, Exception]] = {}
    for i, (e, c) in enumerate(zip(encoded, counts, strict=True)):
        if not c:
            out.append(None)
            continue
        kwargs = keyed_kwargs(gen_kwargs, keys[i]) if keys is not None else gen_kwargs
        try:
            out.append(sample(policy.model, e, c, kwargs, policy.shared_prefix))
        except Exception as err:
            if _out_of_memory(err) or e.item is None:
                raise
            failed.setdefault(e.item.image_id, (e.item, err))
            out.append(None)
    if not failed:
        return out
    first = next(iter(failed.values()))[1]
    images = {e.item.image_id for e, c in zip(encoded, counts, strict=True) if c and e.item}
    if len(failed) == len(images) > 1:
        raise batch_error or first
    how = "in a batch and alone" if batch_error else "alone"
    rejections = [
        Rejection.of(item, f"the model fails on this image {how} ({type(err).__name__}: {err})")
        for item, err in failed.values()
    ]
    raise ImageEncodeError(rejections) from batch_error or first


def rollout_groups(
    policy: Policy,
    items: list[Item],
    task: TaskConfig,
    cfg: RolloutConfig,
    orders: list[list[list[int] | None]],
    stream: str | None = None,
) -> list[Group]:
    """N rollouts of each item (split evenly over its option orders), all sampled in one
    generate call.

    `stream` (e.g. "seed:step"): rollout i of an image draws from keys of (stream, image
    id, i) alone, so its tokens do not depend on which images share the call or the
    process (data parallelism gives one process's answers). None: torch's global
    generator (seed it first).
    """
    gen_kwargs = policy.generation_kwargs(cfg, sample=True)
    prompts = [
        [build_prompt(task, item, order) for order in item_orders]
        for item, item_orders in zip(items, orders, strict=True)
    ]
    encoded = policy.encode_all(prompts, items)
    counts = [_split(cfg.n_rollouts, len(o)) for o in orders]
    keys = None
    if stream is not None:  # per prompt: its rows' indices within the image's group
        keys = []
        for item, cs in zip(items, counts, strict=True):
            for i, c in enumerate(cs):
                keys.append(row_keys(stream, item.image_id, range(sum(cs[:i]), sum(cs[:i]) + c)))
    flat = sample_many(
        policy,
        [e for es in encoded for e in es],
        [c for cs in counts for c in cs],
        gen_kwargs,
        cfg.batch_tokens,
        keys,
    )
    groups, at = [], 0
    for item, encs, cs in zip(items, encoded, counts, strict=True):
        completions, ids, prompt_index = [], [], []
        for i, count in enumerate(cs):
            if count:
                rows, row_ids = trim_rows(flat[at + i], policy.eos, policy.pad)
                completions += rows
                ids += row_ids
                prompt_index += [i] * count
        at += len(cs)
        responses = [decode(policy.tokenizer, c) for c in ids]
        answers = [
            extract_answer(r, task, encs[p].prompt.options)
            for r, p in zip(responses, prompt_index, strict=True)
        ]
        groups.append(Group(item, encs, prompt_index, completions, responses, answers))
    return groups


def _split(n: int, parts: int) -> list[int]:
    """n rollouts over `parts` prompts, as evenly as possible, the first ones taking more."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


# Families whose modules compute differently in train mode beyond dropout-like rates
# (Gemma3n clamps its AltUp coefficients only while training).
TRAIN_MODE_FAMILIES = ("gemma3n",)
# Attributes read as `if self.training` with a rate: dropout, drop path, layer drop,
# router jitter (attention_dropout, drop_prob, layerdrop, router_jitter_noise, ...).
_TRAIN_ONLY_RATE = re.compile(r"drop|jitter")


def train_mode_matters(model: Any) -> bool:
    """Does any module compute differently in train mode? Dropout that is on (LoRA
    dropout, a config's attention dropout), any positive drop / jitter rate a module
    keeps (drop path, layer drop, MoE router jitter), batch norm, gradient checkpointing
    (which transformers applies in train mode only), or a family known to (Gemma3n). When
    none does, an update runs in eval mode with the same numbers, and `model.train()` /
    `model.eval()` around each update, each a walk over every module (~1,500 on a 3B VLM),
    are skipped. Models with remote code keep the switch: their modules are unknown."""
    base = hf_model(model)
    config = base.config
    families = {config.model_type, getattr(config.get_text_config(), "model_type", None)}
    if getattr(config, "auto_map", None) or is_checkpointing(model):
        return True
    if families & set(TRAIN_MODE_FAMILIES):
        return True
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            return True
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            return True
        for name, value in vars(m).items():
            rate = isinstance(value, float | int) and not isinstance(value, bool)
            if rate and value > 0 and _TRAIN_ONLY_RATE.search(name):
                return True
    return False


def is_checkpointing(model: Any) -> bool:
    # transformers turns the KV cache off in train mode under gradient checkpointing.
    base = hf_model(model)
    flag = getattr(base, "is_activation_checkpointing", None)  # transformers >= 5.2x name
    return bool(flag if flag is not None else getattr(base, "is_gradient_checkpointing", False))


# Images answered per generate call in `greedy_answers` (bounds memory on large sets).
GREEDY_BATCH = 32


def kv_cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def greedy_answers(
    policy: Policy, items: list[Item], task: TaskConfig, cfg: RolloutConfig
) -> list[dict[str, str]]:
    """The greedy response and canonical answer for each item (options in given order),
    GREEDY_BATCH images per generate call."""
    gen_kwargs = policy.generation_kwargs(cfg, sample=False)
    results = []
    for start in range(0, len(items), GREEDY_BATCH):
        chunk = items[start : start + GREEDY_BATCH]
        encoded = [
            es[0] for es in policy.encode_all([[build_prompt(task, it)] for it in chunk], chunk)
        ]
        tokens = sample_many(policy, encoded, [1] * len(chunk), gen_kwargs, cfg.batch_tokens)
        for item, enc, t in zip(chunk, encoded, tokens, strict=True):
            response = decode(policy.tokenizer, trim_completion(t[0], policy.eos, policy.pad))
            results.append(
                {
                    "image_id": item.image_id,
                    "response": response,
                    "answer": extract_answer(response, task, enc.prompt.options),
                }
            )
    return results
