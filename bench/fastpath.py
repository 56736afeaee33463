"""Exact evaluation of single-token answers with batched forward passes instead of `generate`.

Evaluating 797 test images after every benchmark run through `ttrv.rollout.greedy_answers`
(one `generate` per image) and sampling (N `generate` rows per image) would be most of the
benchmark's cost. When an answer is one token followed by the end of turn (a letter, a
digit), the whole answer distribution at temperature T comes from the first position:

    p(answer) = sum of softmax((logits with suppressed tokens at -inf) / T) over the tokens
                whose one-token response `extract_answer` maps to that answer;
    p(INVALID) includes the end-of-turn tokens (an empty response) and junk tokens;
    greedy answer = the answer of the argmax token.

This is what `rollout_group` / `greedy_answers` sample (same rendered prompt, same
suppressed tokens, top_p = 1, top_k off) *provided the response stops after that first
token*. The assumption is checked in the same pass: the prompt's KV cache is reused for one
more position after each of the `check_top` likeliest non-EOS first tokens, giving
P(end of turn next). Images whose greedy continuation does not stop at once are re-scored
through `greedy_answers` itself, so greedy answers are always exact; the probability mass
whose continuation may not stop (checked tokens times P(not stop), plus every unchecked
non-EOS token in full) is reported as `leak`, an upper bound on the error of the sampled
metrics. tests/test_benchmark.py checks both against the generate path.

Families whose processor outputs concatenate along dim 0 (LLaVA, Qwen-VL, ...) batch; the
prompts are grouped by token length, so no padding is ever needed.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any

import torch

from ttrv.answers import INVALID, canonical_label, extract_answer
from ttrv.config import RolloutConfig, TaskConfig
from ttrv.rollout import ImageCache, Policy, greedy_answers
from ttrv.tasks import Item, build_prompt, render_prompt

PROB_FLOOR = 1e-7  # tokens below this probability are lumped into INVALID (and into leak)


@dataclass
class Evaluation:
    """Per image (in item order): greedy answer, answer distribution, option position."""

    greedy: list[str]
    dists: list[dict[str, float]]
    positions: list[int | None]  # multiple choice: chosen option index (None: invalid / open)
    leak: float  # mean probability mass the single-token assumption does not cover
    fallback: int  # images whose greedy answer came from `greedy_answers`


class FirstTokenEvaluator:
    """Encodes `items` once; `evaluate(model)` scores any LoRA state of the same base."""

    def __init__(
        self,
        policy: Policy,
        items: list[Item],
        task: TaskConfig,
        rollout: RolloutConfig,
        batch_size: int = 128,
    ) -> None:
        if rollout.top_p != 1.0:
            raise NotImplementedError("The fast path is exact for top_p = 1 only.")
        self.policy = policy
        self.items = items
        self.task = task
        self.rollout = rollout
        self.batch_size = batch_size
        self.prompts = [build_prompt(task, item) for item in items]
        self.options = [tuple(canonical_label(o, task) for o in p.options) for p in self.prompts]
        tok = policy.tokenizer
        vocab = policy.model.get_output_embeddings().weight.shape[0]
        self.token_text = [tok.decode([t], skip_special_tokens=True).strip() for t in range(vocab)]
        self.eos = torch.tensor(policy.eos, dtype=torch.long)
        self.suppress = torch.tensor(
            [t for t in policy.suppress if 0 <= t < vocab], dtype=torch.long
        )
        self._answers: dict[tuple[str, tuple[str, ...]], str] = {}
        self.rows = [self._encode(p, it) for p, it in zip(self.prompts, items, strict=True)]
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, row in enumerate(self.rows):
            buckets[int(row["input_ids"].shape[1])].append(i)
        self.batches = [
            idx[s : s + batch_size]
            for _, idx in sorted(buckets.items())
            for s in range(0, len(idx), batch_size)
        ]

    def _encode(self, prompt: Any, item: Item) -> dict[str, torch.Tensor]:
        p = self.policy
        text = render_prompt(p.processor, prompt)
        batch = p.processor(text=[text], images=[item.image], return_tensors="pt")
        out = {}
        for k, v in batch.items():
            if not isinstance(v, torch.Tensor):
                continue
            if k == "token_type_ids" and not p.keep_token_type_ids:
                continue
            if k in ("pixel_values", "pixel_values_images") and v.is_floating_point():
                v = v.to(p.dtype)
            out[k] = v.to(p.device)
        return out

    def _mask(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if len(self.suppress):
            logits[:, self.suppress.to(logits.device)] = float("-inf")
        return logits

    @torch.no_grad()
    def _batch(
        self, model: Any, idx: list[int], check_top: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masked first-token logits [B, V]; the checked tokens [B, C], P(stop) after each
        [B, C], and whether the greedy next token after each ends the turn [B, C]."""
        kw = {k: torch.cat([self.rows[i][k] for i in idx]) for k in self.rows[idx[0]]}
        out = model(**kw, logits_to_keep=1, use_cache=check_top > 0)
        logits = self._mask(out.logits[:, -1])  # [B, V]
        b = len(idx)
        if check_top == 0:
            empty = torch.empty((b, 0))
            return logits.cpu(), empty.long(), empty, empty.bool()
        eos = self.eos.to(logits.device)
        ranked = logits.clone()
        ranked[:, eos] = float("-inf")
        cand = ranked.topk(check_top, -1).indices  # [B, C]
        cache = out.cache
        cache.batch_repeat_interleave(check_top)
        mask = kw["attention_mask"].repeat_interleave(check_top, 0)  # [B*C, P]
        step: dict[str, Any] = {
            "input_ids": cand.reshape(-1, 1),  # [B*C, 1]
            "attention_mask": torch.cat([mask, torch.ones_like(mask[:, :1])], 1),
            "cache": cache,
            "use_cache": True,
        }
        if "token_type_ids" in kw:
            step["token_type_ids"] = torch.zeros_like(step["input_ids"])
        nxt = self._mask(model(**step, logits_to_keep=1).logits[:, -1])  # [B*C, V]
        probs = torch.softmax(nxt / self.rollout.temperature, -1)
        p_stop = probs[:, eos].sum(-1).reshape(b, check_top)
        greedy_stop = torch.isin(nxt.argmax(-1), eos).reshape(b, check_top)
        return logits.cpu(), cand.cpu(), p_stop.cpu(), greedy_stop.cpu()

    def answer_of(self, token: int, i: int) -> str:
        """The canonical answer of the one-token response `token` to item i."""
        if token in self.policy.eos:
            return INVALID
        key = (self.token_text[token], self.prompts[i].options)
        if key not in self._answers:
            self._answers[key] = extract_answer(key[0], self.task, key[1])
        return self._answers[key]

    @torch.no_grad()
    def evaluate(self, model: Any | None = None, check_top: int = 4) -> Evaluation:
        """Greedy answers and answer distributions of every item under `model` (default: the
        policy's model), e.g. a LoRA-wrapped model in its current state."""
        model = model if model is not None else self.policy.model
        was_training = model.training
        model.eval()
        n = len(self.items)
        greedy: list[str] = [INVALID] * n
        dists: list[dict[str, float]] = [{} for _ in range(n)]
        leak = [0.0] * n
        redo = []
        eos = set(self.policy.eos)
        for idx in self.batches:
            logits, cand, p_stop, g_stop = self._batch(model, idx, check_top)
            probs = torch.softmax(logits / self.rollout.temperature, -1)  # [B, V]
            top = logits.argmax(-1)  # [B]
            keep = (probs > PROB_FLOOR).nonzero().tolist()  # [[row, token], ...]
            values = probs[probs > PROB_FLOOR].tolist()
            by_row: dict[int, list[tuple[int, float]]] = defaultdict(list)
            for (r, t), p in zip(keep, values, strict=True):
                by_row[r].append((t, p))
            p_eos = probs[:, self.eos].sum(-1).tolist()
            p_cand = probs.gather(1, cand).tolist() if check_top else []
            p_go = (1 - p_stop).tolist() if check_top else []
            for r, i in enumerate(idx):
                dist: dict[str, float] = defaultdict(float)
                for t, p in by_row[r]:
                    dist[self.answer_of(t, i)] += p
                rest = max(0.0, 1.0 - sum(dist.values()))  # the floor's mass
                if rest:
                    dist[INVALID] += rest
                dists[i] = dict(sorted(dist.items(), key=lambda kv: -kv[1]))
                t0 = int(top[r])
                greedy[i] = self.answer_of(t0, i)
                if check_top:
                    unchecked = max(0.0, 1.0 - p_eos[r] - sum(p_cand[r]))
                    leak[i] = (
                        sum(p * q for p, q in zip(p_cand[r], p_go[r], strict=True)) + unchecked
                    )
                    if t0 not in eos and not bool(g_stop[r, 0]):
                        redo.append(i)  # greedy goes on after the first token: use generate
        if redo:
            policy = self.policy_for(model)
            exact = greedy_answers(policy, [self.items[i] for i in redo], self.task, self.rollout)
            for i, a in zip(redo, exact, strict=True):
                greedy[i] = a["answer"]
        positions = [
            opts.index(a) if a in opts else None
            for a, opts in zip(greedy, self.options, strict=True)
        ]
        if was_training:
            model.train()
        return Evaluation(greedy, dists, positions, sum(leak) / n, len(redo))

    def policy_for(self, model: Any) -> Policy:
        """The policy with `model` in place of its own (no image cache: pixels are fine)."""
        if model is self.policy.model:
            return self.policy
        return replace(self.policy, model=model, cache=ImageCache(model, enabled=False))
