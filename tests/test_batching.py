"""Batching several images into one model call must not change what the model computes.

Prompts of different lengths (different image sizes, different questions) are left-padded
into one batch; every family must then give the same greedy tokens and the same
per-token log-probabilities (and gradients) as running each prompt alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_engine import loaded_model, small_config
from tests.tiny_models import FAMILIES
from ttrv import rollout, scoring
from ttrv.adapt import make_policy, trainable_params
from ttrv.batching import (
    image_block_ids,
    left_pad,
    merge_mm_outputs,
    pack,
    packed_may_attend,
    packed_positions,
    position_ids,
    row_index,
    split_counts,
)
from ttrv.config import RolloutConfig, TaskConfig
from ttrv.grpo import grpo_update
from ttrv.rollout import (
    greedy_answers,
    hf_model,
    rollout_groups,
    sample,
    sample_many,
    stackable,
)
from ttrv.scoring import _pixel_logprobs, batch_logprobs, packed_attention
from ttrv.tasks import Item, build_prompt, image_sha256


def gradient_reader(model):
    """`grads(fn)` -> (log-probs fn returns, the LoRA gradients of their sum), with the
    LoRA weights given non-zero values first (B = 0 would leave A's gradients zero)."""
    params = list(trainable_params(model).values())
    for p in params:
        torch.nn.init.normal_(p, std=0.05)
    model.train()

    def grads(fn):
        for p in params:
            p.grad = None
        logp = fn()
        logp.sum().backward()
        return logp.detach(), [p.grad.clone() for p in params]

    return grads


# ---- pure helpers ------------------------------------------------------------------------


def test_left_pad_and_positions():
    rows = [torch.tensor([[5, 6, 7]]), torch.tensor([[8]])]
    ids = left_pad(rows, 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    mask = left_pad([torch.ones(1, 3), torch.ones(1, 1)], 0)
    assert position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_row_index_and_pack():
    assert row_index([2, 0, 3]).tolist() == [0, 0, 2, 2, 2]
    assert pack([3, 3, 3, 5], 6) == [[0, 1], [2], [3]]
    assert pack([8, 1], 4) == [[0], [1]]  # a unit over the limit is never split


def test_merge_mm_outputs_keeps_each_layout():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    def out(pool):
        return {"image": BaseModelOutputWithPooling(pooler_output=pool)}

    a, b = torch.zeros(1, 4, 2), torch.ones(1, 4, 2)
    merged = merge_mm_outputs([out(a), out(b), out(a)])["image"].pooler_output
    assert merged.shape == (3, 4, 2) and merged[1].eq(1).all()
    lists = merge_mm_outputs([out([a[0]]), out([b[0]])])["image"].pooler_output
    assert isinstance(lists, list) and len(lists) == 2 and lists[1].eq(1).all()
    tuples = merge_mm_outputs([out((a[0],)), out((b[0],))])["image"].pooler_output
    assert isinstance(tuples, tuple) and len(tuples) == 2


def test_packed_row_layout():
    """Guards the packed row's mask and positions: two prompts (one left-padded), two slots
    of width 2. A slot sees the real prompt and itself causally, never the other slot or
    padding; its positions restart at the prompt's real length."""
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])  # [M=2, P=3]
    pos = packed_positions(mask, 2, 2)
    assert pos.tolist() == [[0, 0, 1, 2, 3, 2, 3], [0, 1, 2, 3, 4, 3, 4]]
    may = packed_may_attend(mask, 2, 2)  # [2, 7, 7]
    assert may[0].long().tolist() == [
        [1, 0, 0, 0, 0, 0, 0],  # padding: itself only
        [0, 1, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 0],
        [0, 1, 1, 1, 0, 0, 0],  # slot 0
        [0, 1, 1, 1, 1, 0, 0],
        [0, 1, 1, 0, 0, 1, 0],  # slot 1: the prompt, not slot 0
        [0, 1, 1, 0, 0, 1, 1],
    ]
    blocks = image_block_ids(torch.tensor([[0, 1, 1, 0, 1]]))
    assert blocks.tolist() == [[-1, 0, 0, -1, 1]]
    assert split_counts([5, 2], 2) == [(0, 2), (0, 2), (0, 1), (1, 2)]


# ---- against one prompt at a time, per family --------------------------------------------


def _items() -> list[Item]:
    rng = np.random.default_rng(3)
    items = []
    for i, size in enumerate([(40, 40), (64, 48)]):
        image = Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))
        items.append(Item(image_sha256(image), f"img{i}", image, options=["cat", "dog", "owl"]))
    return items


def _encoded(policy):
    """Three prompts of different lengths: two image sizes, an open and an MC question."""
    open_task = TaskConfig(kind="open", question="What is it?")
    mc_task = TaskConfig(kind="multiple_choice", options="cat,dog,owl")
    a, b = _items()
    return [
        policy.encode(build_prompt(open_task, a), a),
        policy.encode(build_prompt(mc_task, b), b),
        policy.encode(build_prompt(mc_task, a, [2, 0, 1]), a),
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_matches_one_prompt_at_a_time(tiny_model_dir, family):
    folder = tiny_model_dir(family)
    loaded = loaded_model(folder, small_config(folder))
    policy = make_policy(loaded)
    encoded = _encoded(policy)
    assert stackable(encoded)
    assert len({e.length for e in encoded}) > 1, "prompts must differ in length"
    gen = policy.generation_kwargs(RolloutConfig(max_new_tokens=4), sample=False)
    batched = sample_many(policy, encoded, [1, 1, 1], gen)
    for enc, tokens in zip(encoded, batched, strict=True):
        alone = sample(policy.model, enc, 1, gen, policy.shared_prefix)
        t = min(tokens.shape[1], alone.shape[1])
        assert torch.equal(tokens[0, :t], alone[0, :t]), family


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shared", [True, False])
def test_batched_logprobs_and_grads_match(tiny_model_dir, family, shared):
    folder = tiny_model_dir(family)
    loaded = loaded_model(folder, small_config(folder))
    policy = make_policy(loaded)
    if shared and not policy.shared_prefix:
        pytest.skip("family keeps the full-sequence path (multimodal rope)")
    encoded = _encoded(policy)
    torch.manual_seed(0)
    gen = policy.generation_kwargs(RolloutConfig(max_new_tokens=4), sample=True)
    comps = [
        [row[row != policy.pad] for row in t] for t in sample_many(policy, encoded, [2, 3, 1], gen)
    ]
    comps = [[c if len(c) else torch.tensor([policy.eos[0]]) for c in cs] for cs in comps]
    grads = gradient_reader(loaded.model)

    def alone():  # the plain reference: each completion after its own unpadded prompt
        parts = [_pixel_logprobs(loaded.model, e, c, policy.pad, 1.0)[0]
                 for e, c in zip(encoded, comps, strict=True)]  # fmt: skip
        t = max(x.shape[1] for x in parts)
        return torch.cat([torch.nn.functional.pad(x, (0, t - x.shape[1])) for x in parts])

    ref, ref_grads = grads(alone)
    got, got_grads = grads(
        lambda: batch_logprobs(loaded.model, encoded, comps, policy.pad, 1.0, shared)[0]
    )
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    for g, r in zip(got_grads, ref_grads, strict=True):
        assert torch.allclose(g, r, atol=1e-5, rtol=1e-3)


def test_greedy_answers_are_batched_and_unchanged(tiny_model_dir, monkeypatch):
    """One generate call per GREEDY_BATCH images, same answers as image by image."""

    folder = tiny_model_dir("llava")
    loaded = loaded_model(folder, small_config(folder))
    policy = make_policy(loaded)
    task, cfg = TaskConfig(kind="open", question="What?"), RolloutConfig(max_new_tokens=3)
    items = _items() * 3
    calls = []
    original = loaded.model.generate
    monkeypatch.setattr(loaded.model, "generate", lambda **kw: calls.append(1) or original(**kw))
    batched = greedy_answers(policy, items, task, cfg)
    assert len(calls) == 1
    monkeypatch.setattr(rollout, "GREEDY_BATCH", 1)
    single = greedy_answers(policy, items, task, cfg)
    assert len(calls) == 1 + len(items)
    assert batched == single


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_cached_features_keep_qwen_multimodal_positions(tiny_model_dir, family):
    """Guards: the image cache dropping Qwen-VL's patch grid, after which its image tokens
    got plain 1-D positions (logits off by up to 0.06 on these tiny models)."""
    folder = tiny_model_dir(family)
    loaded = loaded_model(folder, small_config(folder))
    item = _items()[1]
    task = TaskConfig(kind="open", question="What is it?")
    raw = make_policy(loaded, cache_images=False).encode(build_prompt(task, item), item)
    cached = make_policy(loaded).encode(build_prompt(task, item), item)
    assert "pixel_values" not in cached.model_kwargs and "image_grid_thw" in cached.model_kwargs
    with torch.no_grad():
        a = loaded.model(input_ids=raw.input_ids, **raw.kwargs()).logits
        b = loaded.model(input_ids=cached.input_ids, **cached.kwargs()).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_micro_batches_give_the_same_update(tiny_model_dir):
    """Splitting a step's rows into micro-batches only trades memory for time: the same
    loss and the same weights after the step (gradients accumulate, token mean over the
    whole step)."""
    folder = tiny_model_dir("llava")
    cfg = small_config(folder)
    loaded = loaded_model(folder, cfg)
    policy = make_policy(loaded)
    items = _items() + _items()[:1]
    torch.manual_seed(0)
    groups = rollout_groups(policy, items, TaskConfig(kind="open", question="What?"),
                            RolloutConfig(n_rollouts=4, n_train=4, max_new_tokens=3), [[None]] * 3)  # fmt: skip
    for g in groups:
        g.train_mask = [True] * 4
    advantages = [[1.0, -1.0, 0.5, 0.0], [0.0] * 4, [-0.5, 0.5, 1.0, -1.0]]
    params = list(trainable_params(loaded.model).values())
    start = [p.detach().clone() for p in params]
    results = []
    for budget in (1, 10**6):  # one prompt per micro-batch, all prompts in one
        for p, s in zip(params, start, strict=True):
            p.data.copy_(s)
        calls = []
        hook = loaded.model.register_forward_pre_hook(lambda *a, c=calls: c.append(1))
        stats = grpo_update(policy, groups, advantages, torch.optim.SGD(params, lr=1.0), params,
                            1.0, 0.2, 0.0, 0.0, micro_batch_tokens=budget)  # fmt: skip
        hook.remove()
        results.append((stats, [p.detach().clone() for p in params], len(calls)))
    assert results[0][2] > results[1][2]  # the budget sets how many forwards run
    for stats, weights, _ in results[1:]:
        assert stats.groups_skipped == results[0][0].groups_skipped == 1
        assert stats.tokens == results[0][0].tokens
        assert stats.loss == pytest.approx(results[0][0].loss, abs=1e-6)
        for a, b in zip(weights, results[0][1], strict=True):
            assert torch.allclose(a, b, atol=1e-6)
    assert any(not torch.equal(a, s) for a, s in zip(results[0][1], start, strict=True))


def test_generate_calls_are_split_by_the_token_budget(tiny_model_dir, monkeypatch):
    """A step whose prompts and responses would exceed `batch_tokens` in one KV cache is
    sampled over several generate calls; each prompt still gets its own rows."""
    folder = tiny_model_dir("llava")
    loaded = loaded_model(folder, small_config(folder))
    policy = make_policy(loaded)
    encoded = _encoded(policy)
    gen = policy.generation_kwargs(RolloutConfig(max_new_tokens=2), sample=False)
    calls = []
    original = loaded.model.generate
    monkeypatch.setattr(loaded.model, "generate", lambda **kw: calls.append(1) or original(**kw))
    whole = sample_many(policy, encoded, [1, 2, 1], gen, batch_tokens=10**6)
    assert len(calls) == 1
    split = sample_many(policy, encoded, [1, 2, 1], gen, batch_tokens=1)
    assert len(calls) == 1 + 3  # one call per prompt
    assert [t.shape[0] for t in split] == [1, 2, 1]
    for a, b in zip(whole, split, strict=True):  # greedy: the same tokens either way
        t = min(a.shape[1], b.shape[1])
        assert torch.equal(a[:, :t], b[:, :t])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("row_tokens", [2048, 10])
def test_packed_forward_matches_full_sequences(
    tiny_model_dir, monkeypatch, family, attention, row_tokens
):
    """Guards the packed training forward (each prompt once, its completions after it under
    a block mask, positions restarting after the prompt): every completion must get the
    log-probs and LoRA gradients of its own full, unpadded sequence. Three prompts of
    different lengths (left-padded), completions of lengths 1 to 6, with sdpa's boolean and
    eager's additive mask, and with prompts split over several rows (row_tokens 10). Gemma3
    runs with a sliding window shorter than its prompts and keeps its bidirectional image
    blocks. Qwen-VL (multimodal rope) must stay off this path."""
    folder = tiny_model_dir(family)
    loaded = loaded_model(folder, small_config(folder))
    model = loaded.model
    if family.startswith("qwen"):
        assert packed_attention(model) is None
        return
    hf_model(model).set_attn_implementation(attention)
    text = hf_model(model).config.get_text_config()
    if family == "gemma3":
        monkeypatch.setattr(text, "sliding_window", 5)
    monkeypatch.setattr(scoring, "PACKED_ROW_TOKENS", row_tokens)
    packing = packed_attention(model)
    assert packing is not None
    assert (packing.additive is not None) == (attention == "eager")
    assert (packing.windows is not None) == packing.image_blocks == (family == "gemma3")
    policy = make_policy(loaded)
    encoded = _encoded(policy)
    words = torch.tensor(policy.tokenizer("a cat and a dog by the owl").input_ids)
    words = words[~torch.isin(words, torch.tensor(policy.suppress + policy.eos))]
    assert len(words) >= 6
    lengths = [[3, 6], [1, 4, 2], [5]]
    comps = [[words[:n] for n in ns] for ns in lengths]
    grads = gradient_reader(model)

    def alone():
        parts = [_pixel_logprobs(model, e, c, policy.pad, 0.7)[0]
                 for e, c in zip(encoded, comps, strict=True)]  # fmt: skip
        t = max(x.shape[1] for x in parts)
        return torch.cat([torch.nn.functional.pad(x, (0, t - x.shape[1])) for x in parts])

    calls = []
    hook = model.register_forward_pre_hook(lambda *a, c=calls: c.append(1))
    got, got_grads = grads(lambda: batch_logprobs(model, encoded, comps, policy.pad, 0.7, True)[0])
    hook.remove()
    assert len(calls) == 1  # one forward, no prompt-only pass
    ref, ref_grads = grads(alone)
    assert got.shape == ref.shape == (6, 6)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    for g, r in zip(got_grads, ref_grads, strict=True):
        assert (g - r).abs().max() <= 1e-5 * r.abs().max()  # float rounding
