"""The engine end to end on tiny models: rollouts, GRPO steps, stop, checkpoints, resume."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny_models import FAMILIES
from ttrv.adapt import adapt, make_policy, run_step, trainable_params
from ttrv.config import (
    AdaptConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RewardConfig,
    RolloutConfig,
    TaskConfig,
)
from ttrv.grpo import grpo_update, make_optimizer
from ttrv.loading import load_model
from ttrv.lora import attach_lora
from ttrv.rollout import rollout_group
from ttrv.scoring import sequence_logprobs
from ttrv.tasks import Item, image_sha256


def make_items(n: int, seed: int = 0) -> list[Item]:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
        items.append(Item(image_sha256(image), f"img{i}", image))
    return items


def small_config(folder, **optim) -> AdaptConfig:
    return AdaptConfig(
        model=ModelConfig(model=str(folder)),
        task=TaskConfig(kind="multiple_choice", options="cat,dog,bird,fish"),
        rollout=RolloutConfig(n_rollouts=4, n_train=3, max_new_tokens=3),
        # a random reward always gives non-zero advantages, so every step updates weights
        reward=RewardConfig(reward="random"),
        optim=OptimConfig(**{"images_per_step": 2, "rounds": 2, "learning_rate": 0.05, **optim}),
    )


def loaded_model(folder, cfg: AdaptConfig):
    loaded = load_model(cfg.model)
    loaded.model = attach_lora(loaded.model, cfg.lora, seed=cfg.optim.seed)
    return loaded


@pytest.mark.parametrize("family", FAMILIES)
def test_one_grpo_step_changes_lora_only(tiny_model_dir, family):
    """Guards the core promise on every family: a step moves LoRA weights and nothing else."""
    cfg = small_config(tiny_model_dir(family))
    loaded = loaded_model(tiny_model_dir(family), cfg)
    frozen = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in trainable_params(loaded.model).items()}
    policy = make_policy(loaded)
    params = list(trainable_params(loaded.model).values())
    optimizer = make_optimizer(params, cfg.optim.learning_rate, 0.0)
    record, rollouts, groups = run_step(policy, make_items(2), cfg, 0, 0, optimizer, params)
    assert len(rollouts) == 2 * cfg.rollout.n_rollouts
    assert sum(r.trained for r in rollouts) == 2 * cfg.rollout.n_train
    assert record.tokens > 0 and record.grad_norm > 0
    suppressed = set(policy.suppress)
    for g in groups:
        for c in g.completions:
            assert not suppressed & set(c.tolist()), "sampled an image/special token"
    after = trainable_params(loaded.model)
    assert any(not torch.equal(lora_before[n], p) for n, p in after.items())
    for n, p in loaded.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(frozen[n], p), f"base weight {n} changed"


def test_cached_image_features_give_identical_logprobs(tiny_model_dir):
    """The vision tower runs once per image; the cached path must score exactly as pixels do."""
    folder = tiny_model_dir("qwen2_vl")  # flattened patches + rope grids: the tricky layout
    cfg = small_config(folder)
    loaded = loaded_model(folder, cfg)
    item = make_items(1)[0]
    results = []
    for cached in (True, False):
        policy = make_policy(loaded, cache_images=cached)
        torch.manual_seed(0)
        group = rollout_group(policy, item, cfg.task, cfg.rollout, [None])
        logp, mask = sequence_logprobs(loaded.model, group.encoded[0], group.completions,
                                       policy.pad, 1.0)  # fmt: skip
        results.append((group.responses, logp, mask))
    assert results[0][0] == results[1][0]
    assert torch.allclose(results[0][1], results[1][1], atol=1e-3)  # batch-shape numerics
    assert make_policy(loaded).cache.enabled


def test_converged_groups_cost_no_forward_pass(tiny_model_dir):
    """Guards the zero-advantage shortcut: agreeing rollouts must not run the model."""
    folder = tiny_model_dir("llava")
    cfg = small_config(folder)
    loaded = loaded_model(folder, cfg)
    policy = make_policy(loaded)
    group = rollout_group(policy, make_items(1)[0], cfg.task, cfg.rollout, [None])
    group.train_mask = [True] * len(group.answers)
    calls = []
    hook = loaded.model.register_forward_pre_hook(lambda *a: calls.append(1))
    params = list(trainable_params(loaded.model).values())
    stats = grpo_update(
        policy, [group], [[0.0] * len(group.answers)], make_optimizer(params, 1e-3, 0.0),
        params, temperature=1.0, clip_eps=0.2, beta=0.1, grad_clip=1.0,
    )  # fmt: skip
    hook.remove()
    assert calls == [] and stats.tokens == 0 and stats.groups_skipped == 1


def test_kl_is_measured_only_with_beta(tiny_model_dir):
    """beta > 0 runs a reference pass with the adapter disabled; beta = 0 runs none."""
    folder = tiny_model_dir("llava")
    for beta, expect_kl in ((0.0, False), (0.5, True)):
        cfg = small_config(folder, beta=beta, rounds=2)
        loaded = loaded_model(folder, cfg)
        result = adapt(loaded, make_items(2), cfg)
        kls = [r.kl for r in result.history]
        if expect_kl:
            assert all(k >= 0 for k in kls) and kls[-1] > 0  # adapter moved: KL > 0
        else:
            assert all(k != k for k in kls)  # NaN: not measured


def test_stop_is_honoured_within_one_step_and_checkpoints(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llava")
    cfg = small_config(folder)
    loaded = loaded_model(folder, cfg)
    events: list[tuple[str, dict]] = []
    steps_seen = []

    def stop() -> bool:
        return len(steps_seen) >= 1

    def sink(kind, data):
        events.append((kind, data))
        if kind == "step":
            steps_seen.append(data["step"])

    result = adapt(loaded, make_items(4), cfg, sink, stop, output_dir=tmp_path)
    assert result.status == "stopped" and result.steps == 1
    assert (result.checkpoint / "state.json").exists()
    assert (result.checkpoint / "adapter_model.safetensors").exists()
    kinds = [k for k, _ in events]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    assert kinds.index("rollouts") < kinds.index("step")  # a step's rollouts land first
    assert events[-1][1]["status"] == "stopped"


def test_resume_continues_from_checkpoint_not_from_scratch(tiny_model_dir, tmp_path):
    """A stopped-then-resumed run must end with exactly the weights of an uninterrupted one."""
    folder = tiny_model_dir("llava")
    cfg = small_config(folder, rounds=2)
    items = make_items(4)

    full = loaded_model(folder, cfg)
    adapt(full, items, cfg, output_dir=tmp_path / "full")
    want = {n: p.detach().clone() for n, p in trainable_params(full.model).items()}

    part = loaded_model(folder, cfg)
    steps = []
    first = adapt(part, items, cfg, lambda k, d: steps.append(d) if k == "step" else None,
                  lambda: len(steps) >= 3, output_dir=tmp_path / "part")  # fmt: skip
    assert first.status == "stopped" and first.steps == 3

    resumed = loaded_model(folder, cfg)  # a fresh process: new model, new adapter
    later = []
    second = adapt(resumed, items, cfg, lambda k, d: later.append(d) if k == "step" else None,
                   output_dir=tmp_path / "part", resume_from=first.checkpoint)  # fmt: skip
    assert second.status == "done" and second.steps == 4
    assert [d["step"] for d in later] == [3]  # only the missing step ran
    got = trainable_params(resumed.model)
    for n, p in want.items():
        assert torch.allclose(p, got[n], atol=1e-6), n


def test_guard_rolls_back_a_collapse(tiny_model_dir, tmp_path, monkeypatch):
    """When greedy answers collapse onto one answer the guard restores the best weights."""
    import ttrv.adapt as adapt_mod

    folder = tiny_model_dir("llava")
    cfg = small_config(folder, rounds=3)
    cfg.guard.max_marginal_entropy_drop = 0.35  # round 1's 25% drop is tolerated here
    cfg.guard.max_changed_answers = 1.0  # and so is round 1's one changed answer in four
    cfg.guard.max_unexplained_flips = 1.0  # whatever the samples favoured
    cfg.guard.healthy_margin = 0.5  # round 1's 25% drop is then not *clearly* healthy
    loaded = loaded_model(folder, cfg)
    items = make_items(4)
    answers = iter(
        [["cat", "dog", "bird", "fish"], ["cat", "dog", "bird", "cat"]] + [["fish"] * 4] * 5
    )
    real = adapt_mod.greedy_answers

    def fake(policy, its, task, rollout):
        out = real(policy, its, task, rollout)
        for a, ans in zip(out, next(answers), strict=True):
            a["answer"] = ans
        return out

    monkeypatch.setattr(adapt_mod, "greedy_answers", fake)
    events = []
    result = adapt(loaded, items, cfg, lambda k, d: events.append((k, d)), output_dir=tmp_path)
    assert result.status == "guard_stopped"
    guard = [d for k, d in events if k == "guard"]
    assert [g["action"] for g in guard] == ["keep", "rollback"]
    assert "single answer" in guard[1]["reason"]
    # round 1 moved one answer in four: within bounds, not clearly healthy, so the target
    # stayed the unadapted model
    assert not guard[0]["healthy"] and guard[1]["rolled_back_to"] == "the unadapted model"
    assert "Rolled back to the unadapted model" in result.reason


def test_empty_image_set_is_refused(tiny_model_dir):
    folder = tiny_model_dir("llava")
    cfg = small_config(folder)
    with pytest.raises(ValueError, match="No images"):
        adapt(loaded_model(folder, cfg), [], cfg)


def test_seeded_runs_are_reproducible(tiny_model_dir):
    folder = tiny_model_dir("llava")
    cfg = small_config(folder, rounds=1)
    runs = []
    for _ in range(2):
        random.seed(123)  # global state must not matter
        result = adapt(loaded_model(folder, cfg), make_items(2), cfg)
        runs.append([(r.reward_mean, r.loss) for r in result.history])
    assert runs[0] == runs[1]


def test_gradient_checkpointing_gives_the_same_update(tiny_model_dir):
    """Checkpointing trades compute for memory; it must not change the maths.

    Compared through each step's loss and gradient norm (Adam's first steps move weights by
    about lr * sign(g), so tiny rounding differences of near-zero gradients flip weights).
    """
    folder = tiny_model_dir("llava")
    results = []
    for ckpt in (False, True):
        cfg = small_config(folder, rounds=1)
        cfg.model.gradient_checkpointing = ckpt
        loaded = loaded_model(folder, cfg)
        history = adapt(loaded, make_items(2), cfg).history
        results.append([(r.loss, r.grad_norm) for r in history])
    assert len(results[0]) == len(results[1]) > 0
    for (loss_a, norm_a), (loss_b, norm_b) in zip(*results, strict=True):
        assert loss_a == pytest.approx(loss_b, abs=1e-5)
        assert norm_a == pytest.approx(norm_b, rel=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefix_matches_full_sequences(tiny_model_dir, family):
    """Running the prompt once and sharing its KV cache must change no number.

    Families whose positions depend on the image layout (Qwen-VL) must opt out.
    """
    from ttrv.rollout import sample, supports_shared_prefix

    folder = tiny_model_dir(family)
    cfg = small_config(folder)
    loaded = loaded_model(folder, cfg)
    if not supports_shared_prefix(loaded.model):
        assert family.startswith("qwen")
        assert not make_policy(loaded).shared_prefix
        return
    policy = make_policy(loaded)
    assert policy.shared_prefix
    group = rollout_group(policy, make_items(1)[0], cfg.task, cfg.rollout, [None])
    enc = group.encoded[0]
    full, _ = sequence_logprobs(loaded.model, enc, group.completions, policy.pad, 0.7, False)
    shared, _ = sequence_logprobs(loaded.model, enc, group.completions, policy.pad, 0.7, True)
    assert torch.allclose(full, shared, atol=1e-5)
    gen = policy.generation_kwargs(cfg.rollout, sample=True)
    torch.manual_seed(5)
    a = sample(loaded.model, enc, 6, gen, shared_prefix=False)
    torch.manual_seed(5)
    b = sample(loaded.model, enc, 6, gen, shared_prefix=True)
    assert torch.equal(a, b)


def test_learning_rate_follows_the_schedule_per_step(tiny_model_dir):
    """Each step trains at base lr x lr_factor(step): warm-up, then cosine to zero."""
    from ttrv.grpo import lr_factor

    folder = tiny_model_dir("llava")
    cfg = small_config(folder, rounds=2, warmup_ratio=0.5, schedule="cosine")
    loaded = loaded_model(folder, cfg)
    result = adapt(loaded, make_items(4), cfg)
    total = len(result.history)
    assert total == 4
    expected = [cfg.optim.learning_rate * lr_factor(s, total, 2, "cosine") for s in range(total)]
    assert [r.lr for r in result.history] == pytest.approx(expected)
    assert expected[0] < expected[1] and expected[-1] < expected[1]  # warm-up, then decay


def _noise_one_position(keys, position, vocab):
    """Keyed Gumbel noise exactly as first written (c294705), one position per call."""
    from ttrv.keyed import _M32, _mix32

    step = (keys[:, 1] + position * 0x9E3779B9) & _M32
    h = _mix32(keys[:, 0] ^ _mix32(step))
    bits = _mix32(_mix32(h[:, None] ^ vocab[None, :]))
    u = ((bits >> 8).to(torch.float32) + 0.5) * 2.0**-24
    return -torch.log(-torch.log(u))


@pytest.mark.parametrize("elements", [1, 3 * 6 * 37, 2**22])
def test_keyed_noise_drawn_in_blocks_is_bit_identical(monkeypatch, elements):
    """Guards keyed sampling's promise (the same tokens whatever shares the call, and from
    run to run) against the block-wise noise draw: one, three or all positions per draw,
    row states recomputed past their block, must add the very same bits to the scores as
    the per-position formula, and draw nothing past the last position of the call."""
    from ttrv import keyed
    from ttrv.keyed import KeyedSampler, hashed_vocab, row_keys

    monkeypatch.setattr(keyed, "NOISE_ELEMENTS", elements)
    monkeypatch.setattr(keyed, "STATE_POSITIONS", 4)
    keys = row_keys("3:1", "img", range(6))  # [6, 2]
    sampler = KeyedSampler(keys, 0.7, 1.0, positions=11)
    scores = torch.randn(6, 37)
    vocab = hashed_vocab(37, torch.device("cpu"))
    for t in range(11):  # a prompt of width 5, then one token per call
        got = sampler(torch.zeros(6, 5 + t, dtype=torch.long), scores)
        assert torch.equal(got, scores / 0.7 + _noise_one_position(keys, t, vocab)), t
    assert sampler.noise_at + len(sampler.noise) <= 11  # never drawn past the call's end


def test_updates_skip_the_train_mode_switch_only_when_nothing_depends_on_it(tiny_model_dir):
    """Without dropout, batch norm or checkpointing an update in eval mode is the update
    in train mode (bit for bit), so the switch is skipped; LoRA dropout or gradient
    checkpointing keep it."""
    from dataclasses import replace

    from ttrv.rollout import train_mode_matters

    folder = tiny_model_dir("llava")
    cfg = small_config(folder)
    weights = []
    for forced in (False, True):
        loaded = loaded_model(folder, cfg)
        loaded.model.eval()  # as `adapt` starts
        policy = make_policy(loaded)
        assert policy.switch_train_mode is False
        policy = replace(policy, switch_train_mode=forced)
        params = list(trainable_params(loaded.model).values())
        optimizer = make_optimizer(params, cfg.optim.learning_rate, 0.0)
        run_step(policy, make_items(2), cfg, 0, 0, optimizer, params)
        assert not loaded.model.training  # back in eval mode either way
        weights.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
    dropped = attach_lora(load_model(cfg.model).model, LoraConfig(dropout=0.1), seed=0)
    assert train_mode_matters(dropped)
    checkpointed = loaded_model(folder, cfg).model
    checkpointed.base_model.model.gradient_checkpointing_enable()
    assert train_mode_matters(checkpointed)
    # a drop-path or router-jitter rate a module reads under `if self.training`
    for name in ("drop_prob", "router_jitter_noise"):
        model = loaded_model(folder, cfg).model
        setattr(model.base_model.model.model.language_model.layers[0], name, 0.1)
        assert train_mode_matters(model), name
