"""Sampling keyed by rollout: a row's randomness is a function of its key alone.

`generate(do_sample=True)` draws from one global generator, so a row's tokens depend on
which rows share the call: the images of a step, and so the process count under data
parallelism. Keyed sampling makes each rollout row's randomness a function of its key
(seed, step, image, row) and the token position alone: Gumbel-max with counter-based
noise. argmax(logits / T + g), g = -log(-log u), u uniform, is a draw from
softmax(logits / T), so generate runs greedy (do_sample=False) over the scores below.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

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
