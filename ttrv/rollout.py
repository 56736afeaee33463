"""Rollouts: encode an image once, sample N answers, and score token log-probabilities.

The vision tower is frozen, so an image's encoder output is computed once (`ImageCache`)
and reused for all N rollouts, the training forward passes and every round. Sampling and
scoring hand the cached features to transformers through `mm_encoder_outputs`, which every
supported family accepts; models that do not fall back to re-encoding pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .answers import extract_answer
from .config import RolloutConfig, TaskConfig
from .tasks import Item, Prompt, build_prompt, render_prompt


@dataclass
class Encoded:
    """One prompt for one image, ready for the model."""

    prompt: Prompt
    text: str  # the exact rendered prompt
    input_ids: torch.Tensor  # [1, P]
    attention_mask: torch.Tensor  # [1, P]
    model_kwargs: dict[str, Any]  # image inputs: cached encoder outputs or raw pixels

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
            # Keys the encoder consumed (pixels, grids) are replaced by its output; keys that
            # depend on the prompt (token type ids) stay per prompt.
            self._cache[image_id] = (out["mm_encoder_outputs"], set(raw) - set(out))
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
        text = render_prompt(self.processor, prompt)
        batch = self.processor(text=[text], images=[item.image], return_tensors="pt")
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
        kwargs = self.cache.image_kwargs(item.image_id, batch)
        return Encoded(prompt, text, input_ids, attention_mask, kwargs)

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


def supports_shared_prefix(model: Any) -> bool:
    """Can a prompt's KV cache be reused for continuations run without the image?

    Not for models whose text positions depend on the image layout (Qwen-VL's multimodal
    rope computes them from the full input): they keep the full-sequence path.
    """
    base = hf_model(model)
    inner = getattr(base, "model", base)
    return supports_cached_images(model) and not hasattr(inner, "get_rope_index")


def wants_token_type_ids(model: Any) -> bool:
    """Gemma3 needs token type ids (bidirectional attention over image tokens)."""
    import inspect

    return "token_type_ids" in inspect.signature(hf_model(model).forward).parameters


def _expand(model: Any, enc: Encoded, n: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """input_ids and model kwargs repeated n times, image features included."""
    base = hf_model(model)
    return base._expand_inputs_for_generation(
        expand_size=n, input_ids=enc.input_ids, **enc.kwargs()
    )


def trim_completion(tokens: torch.Tensor, eos: list[int], pad: int) -> torch.Tensor:
    """Cut after the first EOS (kept: the model must learn to stop); drop trailing pad."""
    out = []
    for t in tokens.tolist():
        out.append(t)
        if t in eos:
            break
    while out and out[-1] == pad and pad not in eos:
        out.pop()
    return torch.tensor(out, dtype=torch.long)


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
        return out[:, enc.length :]  # [n, T]
    cache = _cache_of(_prefill(model, enc, enc.input_ids[:, :-1], logits_to_keep=1))
    cache.batch_repeat_interleave(n)
    out = model.generate(
        input_ids=enc.input_ids.expand(n, -1),
        attention_mask=enc.attention_mask.expand(n, -1),
        cache=cache,
        **gen_kwargs,
    )
    return out[:, enc.length :]  # [n, T]


def decode(tokenizer: Any, tokens: torch.Tensor) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def rollout_group(
    policy: Policy,
    item: Item,
    task: TaskConfig,
    cfg: RolloutConfig,
    orders: list[list[int] | None],
) -> Group:
    """Sample N rollouts of `item`, split evenly over the given option orders."""
    gen_kwargs = policy.generation_kwargs(cfg, sample=True)
    encoded = [policy.encode(build_prompt(task, item, order), item) for order in orders]
    counts = [cfg.n_rollouts // len(orders)] * len(orders)
    for i in range(cfg.n_rollouts % len(orders)):
        counts[i] += 1
    completions, prompt_index = [], []
    for i, (enc, count) in enumerate(zip(encoded, counts, strict=True)):
        if count == 0:
            continue
        tokens = sample(policy.model, enc, count, gen_kwargs, policy.shared_prefix)
        completions += [trim_completion(row, policy.eos, policy.pad) for row in tokens]
        prompt_index += [i] * count
    responses = [decode(policy.tokenizer, c) for c in completions]
    answers = [
        extract_answer(r, task, encoded[p].prompt.options)
        for r, p in zip(responses, prompt_index, strict=True)
    ]
    return Group(item, encoded, prompt_index, completions, responses, answers)


def _checkpointing(model: Any) -> bool:
    # transformers turns the KV cache off in train mode under gradient checkpointing.
    base = hf_model(model)
    flag = getattr(base, "is_activation_checkpointing", None)  # transformers >= 5.2x name
    return bool(flag if flag is not None else getattr(base, "is_gradient_checkpointing", False))


def _prefill(model: Any, enc: Encoded, input_ids: torch.Tensor, **extra: Any) -> Any:
    """Run (part of) the prompt once with the image and return the forward output."""
    kw = enc.kwargs()
    p = input_ids.shape[1]
    for key, value in list(kw.items()):
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == enc.length:
            kw[key] = value[:, :p]  # per-token side inputs cut to the prefix
    return model(input_ids=input_ids, use_cache=True, **kw, **extra)


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _prefix_shared_logits(
    model: Any, enc: Encoded, comp: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Logits predicting each completion token, with the prompt run once, not K times.

    The prompt's KV cache (which carries the gradient of the LoRA weights on the prompt) is
    repeated K times and the completions run on top of it: P + K*T tokens instead of
    K*(P+T). Same numbers as scoring full sequences (tested per family).
    """
    k, t = comp.shape
    out = _prefill(model, enc, enc.input_ids, logits_to_keep=1)
    first = out.logits[:, -1:, :].expand(k, -1, -1)  # [K, 1, V]: predicts token 0
    if t == 1:
        return first
    cache = _cache_of(out)
    cache.batch_repeat_interleave(k)
    attn = torch.cat([enc.attention_mask.expand(k, -1), mask.long()], dim=1)[:, :-1]
    rest = model(
        input_ids=comp[:, :-1], attention_mask=attn, cache=cache, use_cache=True
    ).logits  # [K, T-1, V]
    return torch.cat([first, rest], dim=1)  # [K, T, V]


def sequence_logprobs(
    model: Any,
    enc: Encoded,
    completions: list[torch.Tensor],
    pad: int,
    temperature: float,
    shared_prefix: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each completion given the prompt.

    Returns (logprobs [K, T], mask [K, T]). Only the completion positions get logits
    (`logits_to_keep`), so the full-vocabulary tensor never covers the prompt.
    """
    k = len(completions)
    if k > 1 and "mm_encoder_outputs" not in enc.model_kwargs:
        # Raw pixel inputs cannot be repeated generically (some families flatten patches
        # across images), so without cached features each completion is scored alone.
        rows = [sequence_logprobs(model, enc, [c], pad, temperature, False) for c in completions]
        t = max(len(c) for c in completions)
        pad_to = lambda x: torch.nn.functional.pad(x, (0, t - x.shape[1]))  # noqa: E731
        return torch.cat([pad_to(r[0]) for r in rows]), torch.cat([pad_to(r[1]) for r in rows])
    t = max(len(c) for c in completions)
    device = enc.input_ids.device
    comp = torch.full((k, t), pad, dtype=torch.long, device=device)  # [K, T]
    mask = torch.zeros((k, t), dtype=torch.float32, device=device)  # [K, T]
    for i, c in enumerate(completions):
        comp[i, : len(c)] = c.to(device)
        mask[i, : len(c)] = 1.0
    if shared_prefix and "mm_encoder_outputs" in enc.model_kwargs and not _checkpointing(model):
        logits = _prefix_shared_logits(model, enc, comp, mask)  # [K, T, V]
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        logp = logp.gather(-1, comp.unsqueeze(-1)).squeeze(-1)
        return logp * mask, mask  # [K, T], [K, T]
    prompt_ids, kwargs = _expand(model, enc, k)  # [K, P]
    input_ids = torch.cat([prompt_ids, comp], dim=1)  # [K, P+T]
    kwargs["attention_mask"] = torch.cat([kwargs["attention_mask"], mask.long()], dim=1)
    p = prompt_ids.shape[1]
    for key, value in kwargs.items():
        # Per-token side inputs (token type ids, multimodal token types) cover the prompt;
        # the completion is plain text, type 0.
        if key != "attention_mask" and isinstance(value, torch.Tensor) and value.shape == (k, p):
            kwargs[key] = torch.cat([value, torch.zeros_like(comp, dtype=value.dtype)], 1)
    out = model(input_ids=input_ids, logits_to_keep=t + 1, use_cache=False, **kwargs)
    logits = out.logits[:, :-1, :].float() / temperature  # [K, T, V]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, comp.unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask  # [K, T], [K, T]


@torch.no_grad()
def greedy_answers(
    policy: Policy, items: list[Item], task: TaskConfig, cfg: RolloutConfig
) -> list[dict[str, str]]:
    """The greedy response and canonical answer for each item (options in given order)."""
    gen_kwargs = policy.generation_kwargs(cfg, sample=False)
    results = []
    for item in items:
        enc = policy.encode(build_prompt(task, item), item)
        tokens = sample(policy.model, enc, 1, gen_kwargs)[0]
        response = decode(policy.tokenizer, trim_completion(tokens, policy.eos, policy.pad))
        results.append(
            {
                "image_id": item.image_id,
                "response": response,
                "answer": extract_answer(response, task, enc.prompt.options),
            }
        )
    return results
