"""Rollouts: encode an image once, sample N answers, and score token log-probabilities.

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

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from .answers import extract_answer
from .batching import (
    PER_IMAGE_KEYS,
    can_merge,
    image_block_ids,
    is_per_token,
    left_pad,
    pack,
    packed_may_attend,
    packed_positions,
    position_ids,
    row_index,
    same_feature_shapes,
    split_counts,
    stack_kwargs,
    within_window,
)
from .config import RolloutConfig, TaskConfig
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


# -- sampling keyed by rollout ---------------------------------------------------------------
# `generate(do_sample=True)` draws from one global generator, so a row's tokens depend on
# which rows share the call: the images of a step, and so the process count under data
# parallelism. Keyed sampling makes each rollout row's randomness a function of its key
# (seed, step, image, row) and the token position alone: Gumbel-max with counter-based
# noise. argmax(logits / T + g), g = -log(-log u), u uniform, is a draw from
# softmax(logits / T), so generate runs greedy (do_sample=False) over the scores below.

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit hash (xorshift-multiply rounds) of int64 values in [0, 2**32).
    Multipliers below 2**31 keep every product below 2**63: no int64 overflow."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def row_keys(stream: str, image_id: str, rows: range) -> torch.Tensor:
    """Two 32-bit keys per rollout row of one image: [len(rows), 2] int64."""
    keys = []
    for row in rows:
        digest = hashlib.blake2b(f"{stream}|{image_id}|{row}".encode(), digest_size=8).digest()
        keys.append((int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")))
    return torch.tensor(keys, dtype=torch.int64).reshape(-1, 2)


def hashed_vocab(size: int, device: torch.device) -> torch.Tensor:
    """The token ids 0..size-1, hashed: [V] int64 (computed once per generate call)."""
    return _mix32(torch.arange(size, device=device))


def row_states(keys: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """The rows' hashed states [count, R] at generated positions start..start+count-1, from
    their keys [R, 2]: a fresh stream per position."""
    step = torch.arange(start, start + count, device=keys.device) * 0x9E3779B9  # [C]
    step = (keys[None, :, 1] + step[:, None]) & _M32  # [C, R]
    return _mix32(keys[None, :, 0] ^ _mix32(step))  # [C, R]


def state_noise(states: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """Gumbel noise [..., R, V] from row states [..., R] (`row_states`) over the hashed token
    ids `vocab` [V] (`hashed_vocab`)."""
    bits = _mix32(_mix32(states[..., None] ^ vocab))  # [..., R, V]
    u = ((bits >> 8).to(torch.float32) + 0.5) * 2.0**-24  # in (0, 1), exact in float32
    return -torch.log(-torch.log(u))


def gumbel_noise(keys: torch.Tensor, position: int, vocab: torch.Tensor) -> torch.Tensor:
    """Gumbel noise [R, V] for the rows' keys [R, 2] at one generated position, over the
    hashed token ids `vocab` [V] (`hashed_vocab`)."""
    return state_noise(row_states(keys, position, 1)[0], vocab)


# Keyed noise is drawn for several positions at once (never past the call's last one), up to
# this many elements (16 MB of float32 noise; the hash's int64 intermediates are briefly a
# few times that): a bundled-size vocabulary draws every position of a call in one go, a 150k
# vocabulary one position at a time. Row states are computed for STATE_POSITIONS positions at
# once. Elementwise either way, so the same bits as one position at a time (tested).
NOISE_ELEMENTS = 2**22
STATE_POSITIONS = 1024


class KeyedSampler:
    """A logits processor that makes greedy decoding sample: temperature, then top-p (as
    transformers' warpers do), then Gumbel noise keyed per row. Runs after generate's own
    processors, so suppressed tokens (-inf) stay suppressed. `positions`: how many tokens
    the call generates at most (noise is drawn that far ahead; None: one position at a
    time)."""

    def __init__(
        self, keys: torch.Tensor, temperature: float, top_p: float, positions: int | None = None
    ) -> None:
        self.keys = keys  # [R, 2]
        self.positions = positions
        self.temperature = temperature
        self.top_p = None
        if top_p < 1.0:  # built once, not at every generated token
            from transformers import TopPLogitsWarper

            self.top_p = TopPLogitsWarper(top_p)
        self.start: int | None = None  # input width at the first generated token
        self.vocab: torch.Tensor | None = None
        self.states = torch.empty(0, 0, dtype=torch.int64)  # [C, R] from position states_at
        self.states_at = 0
        self.noise = torch.empty(0, 0, 0)  # [B, R, V] from position noise_at
        self.noise_at = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:  # positions count from the first generated token, so left
            self.start = input_ids.shape[1]  # padding (which rows share a call) cannot matter
            self.keys = self.keys.to(scores.device)
            self.vocab = hashed_vocab(scores.shape[-1], scores.device)
        scores = scores / self.temperature  # [R, V]
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        return scores + self._noise(input_ids.shape[1] - self.start, scores)

    def _noise(self, position: int, scores: torch.Tensor) -> torch.Tensor:
        """Noise [R, V] at `position`, from the block drawn last or a new one from here."""
        if not self.noise_at <= position < self.noise_at + len(self.noise):
            count, ahead = 1, STATE_POSITIONS
            if self.positions is not None:
                ahead = max(1, self.positions - position)
                count = max(1, min(NOISE_ELEMENTS // scores.numel(), ahead))
            at = position - self.states_at
            if at < 0 or at + count > len(self.states):
                self.states = row_states(
                    self.keys, position, max(count, min(ahead, STATE_POSITIONS))
                )
                self.states_at, at = position, 0
            self.noise = state_noise(self.states[at : at + count], self.vocab).to(scores.dtype)
            self.noise_at = position
        return self.noise[position - self.noise_at]


def keyed_kwargs(gen_kwargs: dict[str, Any], keys: torch.Tensor) -> dict[str, Any]:
    """Sampling `gen_kwargs` turned into a greedy call whose rows draw from their keys
    [R, 2] (one per row of the call, in row order)."""
    from transformers import LogitsProcessorList

    kwargs = dict(gen_kwargs)
    sampler = KeyedSampler(
        keys, kwargs.pop("temperature"), kwargs.pop("top_p"), kwargs.get("max_new_tokens")
    )
    kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None,
                  logits_processor=LogitsProcessorList([sampler]))  # fmt: skip
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
    cache = _cache_of(out)
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


def _checkpointing(model: Any) -> bool:
    # transformers turns the KV cache off in train mode under gradient checkpointing.
    base = hf_model(model)
    flag = getattr(base, "is_activation_checkpointing", None)  # transformers >= 5.2x name
    return bool(flag if flag is not None else getattr(base, "is_gradient_checkpointing", False))


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


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


# Images answered per generate call in `greedy_answers` (bounds memory on large sets).
GREEDY_BATCH = 32


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
    if shared_prefix and not _checkpointing(model):
        kw = stack_kwargs([e.model_kwargs for e in encoded], range(len(encoded)))
        if positions:
            kw["position_ids"] = position_ids(mask)
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **kw)
        logits = out.logits[:, -1:, :][rows]  # [R, 1, V]: predicts token 0
        if t > 1:
            cache = _cache_of(out)
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
