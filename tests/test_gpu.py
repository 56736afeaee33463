"""The engine on a CUDA GPU: bf16, 4-bit QLoRA with bitsandbytes, the bundled model.

Skipped without CUDA, so CI (CPU only) never needs a GPU. Run on a lent GPU machine with
`bash scripts/gpu_check.sh`, which calls `pytest -m gpu`.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_engine import make_items, small_config
from ttrv.adapt import adapt, make_policy, run_step, trainable_params
from ttrv.config import AdaptConfig, ModelConfig, OptimConfig, RolloutConfig
from ttrv.grpo import make_optimizer
from ttrv.loading import load_model
from ttrv.lora import attach_lora, load_adapter, save_adapter
from ttrv.rollout import rollout_group
from ttrv.scoring import sequence_logprobs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def cuda_config(folder, **model) -> AdaptConfig:
    cfg = small_config(folder)
    cfg.model = ModelConfig(model=str(folder), device="cuda", **model)
    return cfg


def load_with_lora(cfg: AdaptConfig):
    loaded = load_model(cfg.model)
    loaded.model = attach_lora(loaded.model, cfg.lora, seed=cfg.optim.seed)
    return loaded


def one_step(loaded, cfg: AdaptConfig):
    policy = make_policy(loaded)
    params = list(trainable_params(loaded.model).values())
    optimizer = make_optimizer(params, cfg.optim.learning_rate, 0.0)
    return run_step(policy, make_items(2), cfg, 0, 0, optimizer, params)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "smolvlm", "gemma3"])
def test_bf16_step_on_cuda_moves_lora_only(tiny_model_dir, family):
    """auto dtype on CUDA is bf16; a GRPO step runs there and changes LoRA weights only."""
    cfg = cuda_config(tiny_model_dir(family))
    loaded = load_with_lora(cfg)
    assert loaded.device.type == "cuda" and loaded.dtype == torch.bfloat16
    base = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if "lora_" not in n}
    assert all(p.device.type == "cuda" for p in base.values())
    lora = {n: p.detach().clone() for n, p in trainable_params(loaded.model).items()}
    record, rollouts, _ = one_step(loaded, cfg)
    assert math.isfinite(record.loss) and record.grad_norm > 0 and record.tokens > 0
    assert len(rollouts) == 2 * cfg.rollout.n_rollouts
    after = trainable_params(loaded.model)
    assert any(not torch.equal(lora[n], p) for n, p in after.items())
    for n, p in loaded.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(base[n], p), f"base weight {n} changed"


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_qlora_4bit_on_cuda_trains_lora(tiny_model_dir, family):
    """4-bit base weights (bitsandbytes on CUDA): two steps give every LoRA weight a gradient
    and move it, and the quantised base stays as it was."""
    import bitsandbytes as bnb

    cfg = cuda_config(tiny_model_dir(family), quantization="4bit")
    loaded = load_with_lora(cfg)
    quantized = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized, "nothing was quantised"
    packed = [m.weight.detach().clone() for m in quantized]
    lora = {n: p.detach().clone() for n, p in trainable_params(loaded.model).items()}
    policy = make_policy(loaded)
    params = list(trainable_params(loaded.model).values())
    optimizer = make_optimizer(params, cfg.optim.learning_rate, 0.0)
    for step in range(2):  # step 1 moves B (A's grads are zero while B == 0); step 2 all
        record, _, _ = run_step(policy, make_items(2), cfg, step, 0, optimizer, params)
        assert math.isfinite(record.loss)
    for n, p in trainable_params(loaded.model).items():
        assert not torch.equal(lora[n], p), f"LoRA weight {n} did not move"
    for before, module in zip(packed, quantized, strict=True):
        assert torch.equal(before, module.weight)


def test_adapter_round_trip_on_cuda_gives_identical_logprobs(tiny_model_dir, tmp_path):
    """An adapter trained on the GPU, saved as safetensors and loaded back scores the same."""
    folder = tiny_model_dir("llava")
    cfg = cuda_config(folder, dtype="float32")
    loaded = load_with_lora(cfg)
    one_step(loaded, cfg)
    item = make_items(1)[0]
    policy = make_policy(loaded)
    group = rollout_group(policy, item, cfg.task, cfg.rollout, [None])
    score = lambda m: sequence_logprobs(m, group.encoded[0], group.completions, policy.pad, 1.0)  # noqa: E731
    with torch.no_grad():
        trained, mask = score(loaded.model)
    save_adapter(loaded.model, tmp_path / "adapter")
    fresh = load_model(cfg.model)
    reloaded = load_adapter(fresh.model, tmp_path / "adapter")
    with torch.no_grad():
        again, _ = score(reloaded)
    assert torch.allclose(trained[mask.bool()], again[mask.bool()], atol=1e-5)


def test_bundled_model_adapts_on_cuda(tmp_path):
    """The default model, a whole (short) run on the GPU in bf16: answers before and after,
    a checkpoint on disk, a finite loss per step."""
    from ttrv.config import BUNDLED_MODEL, TaskConfig
    from ttrv.digits import digit_items

    items = digit_items("test", limit=4)
    cfg = AdaptConfig(
        model=ModelConfig(model=BUNDLED_MODEL, device="cuda"),
        task=TaskConfig(),
        rollout=RolloutConfig(n_rollouts=8, n_train=8),
        optim=OptimConfig(images_per_step=2, rounds=1),
    )
    loaded = load_with_lora(cfg)
    result = adapt(loaded, items, cfg, output_dir=tmp_path / "run")
    assert len(result.history) == 2
    assert all(math.isfinite(r.loss) for r in result.history)
    assert len(result.before) == len(result.after) == 4
    assert any((tmp_path / "run").rglob("adapter_model.safetensors"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_split_model_over_two_gpus_trains_lora(tiny_model_dir):
    """placement split: the tiny LLaVA's blocks spread over GPUs 0 and 1 (balanced, as
    device_map="auto" does); the inputs go to the embeddings' GPU, and a GRPO step runs
    across both and moves LoRA weights."""
    folder = tiny_model_dir("llava")
    cfg = small_config(folder)
    cfg.model = ModelConfig(model=str(folder), gpus="0,1", placement="split",
                            max_memory_gib=1 / 1024)  # fmt: skip
    loaded = load_with_lora(cfg)
    placement = loaded.info["placement"]
    assert [p["device"] for p in placement] == ["cuda:0", "cuda:1"], placement
    assert loaded.device == loaded.model.get_input_embeddings().weight.device
    lora = {n: p.detach().clone() for n, p in trainable_params(loaded.model).items()}
    record, _, _ = one_step(loaded, cfg)
    assert math.isfinite(record.loss) and record.grad_norm > 0
    # (the balanced plan puts the vision tower and embeddings on GPU 0 and the decoder,
    # where every LoRA weight sits, on GPU 1: measured on the meta device)
    moved = [n for n, p in trainable_params(loaded.model).items() if not torch.equal(lora[n], p)]
    assert moved
