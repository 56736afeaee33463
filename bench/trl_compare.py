"""TRL's GRPOTrainer set up to do exactly what this engine does, and a loss/gradient check.

    python -m bench.trl_compare            # loss + gradient equivalence on the bundled model

`grpo_args` maps our settings onto GRPOConfig, naming every setting whose TRL default
differs from our maths or could change the work:

- loss_type "dapo": the clipped surrogate summed over every completion token of the step
  and divided by the step's token count (`num_items_in_batch`) - our token-mean loss.
  (TRL's default; "grpo" would average per sequence first.)
- scale_rewards "group" with our advantage_scope "group": (r - mean_g) / (std_g + eps), both
  with the unbiased std. TRL's eps is 1e-4, ours 1e-6 (advantages differ by < 1e-4 relative).
  TRL always centres per group, so our default batch scope has no TRL equivalent.
- beta as ours; 0 means no reference pass on either side. With beta > 0 TRL takes the
  reference from the same PEFT model with the adapter disabled, as we do, and
  use_bias_correction_kl=False keeps its k3 KL term unweighted, as ours is.
- num_iterations 1, steps_per_generation 1, gradient_accumulation_steps 1: one optimiser
  step per batch of rollouts, so old log-probs are the detached current ones (ratio 1).
- activation (gradient) checkpointing off: TRL turns it on by default; we never recompute.
- per_device_train_batch_size = images per step x N; num_generations = N.
- AdamW (torch, fused: TRL's default and ours; `Spec.trl_optim`), constant learning rate,
  no warm-up, no weight decay, grad clip.
- Sampling: temperature, top_p 1, top_k 0, no repetition penalty, max_completion_length =
  max new tokens, the same suppressed token ids (`generation_kwargs`), the same EOS ids.
- The reward function decodes each completion, extracts its canonical answer
  (`ttrv.answers.extract_answer`, the options shown) and applies `ttrv.rewards.make_reward`
  to each group of N adjacent completions (TRL keeps a prompt's N completions adjacent).
- LoRA through `peft_config` with our regex targets (language model only), rank, alpha,
  dropout 0, no bias. On a 4-bit base TRL casts the adapter to bf16 (ours stays fp32).

Equivalence (`loss_equivalence`): the same fixed completions, advantages and old log-probs
(perturbed, so that PPO clipping acts) go through our `sequence_logprobs` + `clipped_surrogate`
(+ beta * k3 KL) and through `GRPOTrainer._compute_loss`, on two copies of the same LoRA
weights; per-token log-probs, loss and every LoRA gradient are compared.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Any

import torch

from bench.speed import (
    Spec,
    StepClock,
    adapt_config,
    bench_items,
    bundled_model_dir,
    memory_report,
    resolved_device,
    rss_mib,
    setup_torch,
    suppress_ids,
)

# Equivalence tolerances (float32, CPU): measured differences are ~1e-7 (see docs/performance.md).
LOGP_ATOL = 1e-5
LOSS_ATOL = 1e-6
GRAD_RTOL = 1e-4  # max |g_ours - g_trl| / max |g_ours|


def grpo_args(cfg: Any, spec: Spec, output_dir: str, suppress: list[int]) -> Any:
    """GRPOConfig equal to `cfg` (an AdaptConfig); see the module docstring for each choice."""
    from trl import GRPOConfig

    device = resolved_device(spec)
    bf16 = cfg.model.dtype == "bfloat16" or (cfg.model.dtype == "auto" and device == "cuda")
    checkpointing = (
        {"activation_checkpointing": False}
        if "activation_checkpointing" in GRPOConfig.__dataclass_fields__
        else {"gradient_checkpointing": False}
    )
    return GRPOConfig(
        output_dir=output_dir,
        max_steps=spec.steps,
        per_device_train_batch_size=cfg.optim.images_per_step * cfg.rollout.n_rollouts,
        gradient_accumulation_steps=1,
        num_generations=cfg.rollout.n_rollouts,
        steps_per_generation=1,
        num_iterations=1,
        # sampling
        max_completion_length=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        generation_kwargs={"suppress_tokens": suppress},
        mask_truncated_completions=False,
        # loss
        loss_type="dapo",
        scale_rewards="group",
        beta=cfg.optim.beta,
        use_bias_correction_kl=False,
        epsilon=cfg.optim.clip_eps,
        importance_sampling_level="token",
        top_entropy_quantile=1.0,
        # optimiser
        learning_rate=cfg.optim.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=cfg.optim.weight_decay,
        optim=spec.trl_optim,  # adamw_torch_fused: TRL's default, as ours (make_optimizer)
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=cfg.optim.grad_clip,
        # machinery
        **checkpointing,
        bf16=bf16,
        fp16=False,
        use_cpu=device == "cpu",
        seed=cfg.optim.seed,
        shuffle_dataset=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        report_to="none",
        save_strategy="no",
        logging_steps=10**9,
        disable_tqdm=True,
        log_completions=False,
    )


def peft_config(cfg: Any) -> Any:
    from peft import LoraConfig

    from ttrv.lora import lora_target_regex

    return LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=lora_target_regex(cfg.lora),
        bias="none",
    )


def shown_options(task: Any, item: Any) -> list[str]:
    from ttrv.tasks import build_prompt

    return list(build_prompt(task, item).options)


def trl_dataset(items: list[Any], task: Any) -> Any:
    """Conversational prompt + image rows, the prompt text exactly as ours (`build_prompt`)."""
    from datasets import Dataset

    from ttrv.tasks import build_prompt

    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": build_prompt(task, item).text}],
                "image": item.image,
                "shown_options": shown_options(task, item),
            }
            for item in items
        ]
    )


def make_trl_reward(cfg: Any, tokens: list[int] | None = None) -> Any:
    """A TRL reward function computing our TTRV reward over each group of N completions.

    Appends each call's completion token count to `tokens` (TRL logs none per step)."""
    from ttrv.answers import extract_answer
    from ttrv.rewards import make_reward

    n = cfg.rollout.n_rollouts
    calls = [0]

    def ttrv_reward(
        prompts: list, completions: list, completion_ids: list, shown_options: list, **_: Any
    ) -> list:
        if tokens is not None:
            tokens.append(sum(len(c) for c in completion_ids))
        reward_fn = make_reward(cfg.reward, seed=cfg.optim.seed * 1_000_003 + calls[0])
        calls[0] += 1
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        answers = [
            extract_answer(t.strip(), cfg.task, tuple(o or ()))
            for t, o in zip(texts, shown_options, strict=True)
        ]
        totals: list[float] = []
        for g in range(0, len(answers), n):
            totals += [r["total"] for r in reward_fn(answers[g : g + n])]
        return totals

    return ttrv_reward


def _step_clock_callback(clock: StepClock, step_hook: Any = None) -> Any:
    """Times each step; `step_hook(steps_done)` runs at train begin (0) and each step end."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            if step_hook is not None:
                step_hook(0)
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            clock.stop()  # the interval since the previous step's end: the whole step
            if step_hook is not None:
                step_hook(state.global_step)
                clock.start()  # the hook's own time is not the next step's

    return Clock()


def build_trainer(
    spec: Spec,
    output_dir: str,
    clock: StepClock | None = None,
    tokens: list | None = None,
    step_hook: Any = None,
) -> tuple:
    """(trainer, loaded, cfg): GRPOTrainer on a freshly loaded copy of the spec's model."""
    from trl import GRPOTrainer

    from ttrv.loading import load_model

    cfg = adapt_config(spec)
    loaded = load_model(cfg.model)
    suppress = suppress_ids(spec, loaded.tokenizer, loaded.model)
    trainer = GRPOTrainer(
        model=loaded.model,
        reward_funcs=make_trl_reward(cfg, tokens),
        args=grpo_args(cfg, spec, output_dir, suppress),
        train_dataset=trl_dataset(bench_items(spec.pool, spec.seed), cfg.task),
        processing_class=loaded.processor,
        peft_config=peft_config(cfg),
        callbacks=[_step_clock_callback(clock, step_hook)] if clock is not None else None,
    )
    return trainer, loaded, cfg


def run_trl(spec: Spec, step_hook: Any = None) -> dict[str, Any]:
    """`spec.steps` GRPOTrainer steps; timing per step from the trainer's step-end callback
    (`step_hook(steps_done)` as in `bench.speed.run_ours`)."""
    setup_torch(spec)
    device = resolved_device(spec)
    clock, tokens = StepClock(device), []
    with tempfile.TemporaryDirectory() as out:
        trainer, loaded, _ = build_trainer(spec, out, clock, tokens, step_hook)
        rss_loaded = rss_mib()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    return {
        "engine": "trl",
        "label": spec.label,
        "params": loaded.info["total_params"],
        "step_wall": clock.wall,
        "step_cpu": clock.cpu,
        "tokens": tokens,
        "groups_skipped": [0] * spec.steps,  # TRL trains every group
        "reward_mean": [],
        **memory_report(device, rss_loaded),
    }


# ---- loss / gradient equivalence ------------------------------------------------------------


def fixed_rollouts(policy: Any, items: list[Any], cfg: Any, seed: int) -> tuple:
    """Sampled completions per image, plus seeded advantages [B] and old log-prob offsets."""
    from ttrv.rollout import rollout_group

    groups = [rollout_group(policy, item, cfg.task, cfg.rollout, [None]) for item in items]
    gen = torch.Generator().manual_seed(seed)
    b = sum(len(g.completions) for g in groups)
    advantages = torch.randn(b, generator=gen)
    t = max(len(c) for g in groups for c in g.completions)
    old_offset = (torch.rand(b, t, generator=gen) - 0.5) * 0.6  # +-0.3 nats: clipping acts
    return groups, advantages, old_offset


def perturb_lora(model: Any, seed: int, scale: float = 0.05) -> None:
    """Non-zero LoRA B (a fresh adapter is a no-op, which would hide KL and A-gradients)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def ours_loss(
    policy: Any, groups: list, advantages: torch.Tensor, old_offset: torch.Tensor, cfg: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our batched path (per image: cached features, logits_to_keep): (loss, logp [B, T])."""
    from ttrv.grpo import clipped_surrogate, kl_k3
    from ttrv.scoring import sequence_logprobs

    model, temp = policy.model, cfg.rollout.temperature
    total = sum(len(c) for g in groups for c in g.completions)
    b, t = old_offset.shape
    all_logp = torch.zeros(b, t)
    loss, row = torch.zeros(()), 0
    for g in groups:
        k = len(g.completions)
        logp, mask = sequence_logprobs(model, g.encoded[0], g.completions, policy.pad, temp)
        width = logp.shape[1]
        old = (logp.detach() + old_offset[row : row + k, :width]) * mask
        part = clipped_surrogate(logp, old, advantages[row : row + k], mask, cfg.optim.clip_eps)
        if cfg.optim.beta > 0:
            with torch.no_grad(), model.disable_adapter():
                ref, _ = sequence_logprobs(model, g.encoded[0], g.completions, policy.pad, temp)
            part = part + cfg.optim.beta * (kl_k3(logp, ref) * mask).sum()
        loss = loss + part / total
        all_logp[row : row + k, :width] = logp.detach()
        row += k
    return loss, all_logp


def trl_inputs(
    trainer: Any,
    groups: list,
    advantages: torch.Tensor,
    old_offset: torch.Tensor,
    ours_logp: torch.Tensor,
    cfg: Any,
) -> dict[str, Any]:
    """The dict `_generate_and_score_completions` hands to `_compute_loss`, for fixed rollouts,
    built with TRL's own prompt tokenisation and image processing."""
    from trl.data_utils import apply_chat_template, prepare_multimodal_messages
    from trl.trainer.utils import pad

    pad_id = trainer._tokenizer.pad_token_id
    prompts, images, completions = [], [], []
    for g in groups:
        for c in g.completions:
            prompts.append([{"role": "user", "content": g.encoded[0].prompt.text}])
            images.append([g.item.image])
            completions.append(c)
    prompts = [
        prepare_multimodal_messages(p, images=i) for p, i in zip(prompts, images, strict=True)
    ]
    prompt_ids, _, _ = trainer._tokenize_prompts(prompts)
    texts = [
        apply_chat_template({"prompt": p}, trainer.processing_class)["prompt"] for p in prompts
    ]
    processed = trainer.processing_class(
        images=images, text=texts, padding=True, return_tensors="pt"
    )
    prompt_t = [torch.tensor(p) for p in prompt_ids]
    completion_ids = pad(completions, padding_value=pad_id, padding_side="right")
    completion_mask = pad(
        [torch.ones_like(c) for c in completions], padding_value=0, padding_side="right"
    )
    t = completion_ids.shape[1]
    old = (ours_logp[:, :t] + old_offset[:, :t]) * completion_mask
    inputs = {
        "prompt_ids": pad(prompt_t, padding_value=pad_id, padding_side="left"),
        "prompt_mask": pad(
            [torch.ones_like(p) for p in prompt_t], padding_value=0, padding_side="left"
        ),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "num_items_in_batch": completion_mask.sum(),
        "old_per_token_logps": old,
        "pixel_values": processed["pixel_values"],
        "num_images": [1] * len(completions),
    }
    for key in ("image_sizes", "image_grid_thw", "pixel_attention_mask", "token_type_ids"):
        if key in processed:
            inputs[key] = processed[key]
    return inputs


def loss_equivalence(
    model_dir: str,
    *,
    beta: float = 0.04,
    temperature: float = 0.8,
    images: int = 2,
    n: int = 4,
    max_new_tokens: int = 4,
    seed: int = 0,
) -> dict:
    """Max differences between our loss path and TRL's `_compute_loss` on the same rollouts."""
    from trl.trainer.utils import use_adapter

    from bench.speed import load_ours
    from ttrv.lora import adapter_state, load_adapter_state

    spec = Spec(
        model_dir=model_dir,
        label="equivalence",
        n=n,
        max_new_tokens=max_new_tokens,
        images_per_step=images,
        pool=images,
        steps=1,
        beta=beta,
        temperature=temperature,
        seed=seed,
    )
    setup_torch(spec)
    cfg = adapt_config(spec)
    _, policy, params, _ = load_ours(spec, cfg)
    perturb_lora(policy.model, seed)
    groups, advantages, old_offset = fixed_rollouts(policy, bench_items(images, seed), cfg, seed)

    policy.model.train()
    loss_ours, logp_ours = ours_loss(policy, groups, advantages, old_offset, cfg)
    loss_ours.backward()
    names = [n_ for n_, p in policy.model.named_parameters() if p.requires_grad]
    grads_ours = {
        n_: p.grad.clone() for n_, p in policy.model.named_parameters() if p.requires_grad
    }

    with tempfile.TemporaryDirectory() as out:
        trainer, _, _ = build_trainer(spec, out)
    model = trainer.model
    load_adapter_state(model, adapter_state(policy.model))
    inputs = trl_inputs(trainer, groups, advantages, old_offset, logp_ours, cfg)
    prompt_ours = torch.cat([g.encoded[0].input_ids[0] for g in groups])
    prompt_trl = torch.cat(
        [
            inputs["prompt_ids"][i][inputs["prompt_mask"][i].bool()]  # left padding removed
            for i in range(0, len(advantages), n)
        ]
    )
    mask = inputs["completion_mask"]
    full_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    full_mask = torch.cat([inputs["prompt_mask"], mask], 1)
    forward = {"pixel_values": inputs["pixel_values"], "num_images": inputs["num_images"]}
    if beta > 0:
        with torch.no_grad(), use_adapter(model, adapter_name=None):
            inputs["ref_per_token_logps"], _, _ = trainer._get_per_token_logps_and_entropies(
                model, full_ids, full_mask, mask.shape[1], **forward
            )
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    with torch.no_grad():
        logp_trl, _, _ = trainer._get_per_token_logps_and_entropies(
            model, full_ids, full_mask, mask.shape[1], **forward
        )
    loss_trl = trainer._compute_loss(model, inputs)
    loss_trl.backward()
    grads_trl = {n_: p.grad for n_, p in model.named_parameters() if p.requires_grad}

    t = mask.shape[1]
    ratio = torch.exp(-old_offset[:, :t])  # pi / pi_old at the (unchanged) current weights
    eps = cfg.optim.clip_eps
    outside = (ratio > 1 + eps) | (ratio < 1 - eps)
    scale = max(float(g.abs().max()) for g in grads_ours.values())
    grad_diff = max(float((grads_ours[k] - grads_trl[k]).abs().max()) for k in names)
    return {
        "prompts_identical": bool(torch.equal(prompt_ours, prompt_trl)),
        "tokens": int(mask.sum()),
        "tokens_outside_clip_range": int((outside * mask).sum()),
        "logp_max_abs_diff": float(((logp_ours[:, :t] - logp_trl) * mask).abs().max()),
        "loss_ours": float(loss_ours.detach()),
        "loss_trl": float(loss_trl.detach()),
        "loss_abs_diff": abs(float(loss_ours.detach()) - float(loss_trl.detach())),
        "grad_max_abs": scale,
        "grad_max_rel_diff": grad_diff / scale,
        "lora_tensors": len(names),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.trl_compare", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--beta", type=float, nargs="+", default=[0.0, 0.04])
    args = p.parse_args(argv)
    folder = args.model or str(bundled_model_dir()[0])
    ok = True
    for beta in args.beta:
        r = loss_equivalence(folder, beta=beta)
        good = (
            r["prompts_identical"]
            and r["logp_max_abs_diff"] <= LOGP_ATOL
            and r["loss_abs_diff"] <= LOSS_ATOL
            and r["grad_max_rel_diff"] <= GRAD_RTOL
        )
        ok &= good
        print(f"beta={beta}: {'OK' if good else 'MISMATCH'} {r}")
    print(f"tolerances: logp {LOGP_ATOL}, loss {LOSS_ATOL}, grad (relative to max) {GRAD_RTOL}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
