"""Configuration dataclasses: one per concern, each field with a help string.

CLI flags (`ttrv.cli`) and UI forms (`ui/`) are derived from these fields, never copied by
hand. Every check in `__post_init__` raises `ConfigError` with a message that says how to
fix the value, so the CLI and the UI can show it as it is.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

BUNDLED_MODEL = str(Path(__file__).resolve().parent.parent / "models" / "ttrv-digits-llava")

TaskKind = Literal["open", "classes", "multiple_choice", "yes_no", "per_image"]
RewardKind = Literal["ttrv", "ttrv_paper", "frequency", "majority", "entropy", "random"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message says how to fix it."""


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    model: str = field(
        default=BUNDLED_MODEL,
        metadata=_help("Hugging Face hub id or local folder of an image-text-to-text model."),
    )
    quantization: Literal["none", "8bit", "4bit"] = field(
        default="none",
        metadata=_help("Load base weights in 8-bit or 4-bit (QLoRA) with bitsandbytes."),
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata=_help("Weight dtype; auto = bf16 on CUDA, fp32 on CPU.")
    )
    device: Literal["auto", "cpu", "cuda"] = field(
        default="auto", metadata=_help("Where the model runs; auto = CUDA when available.")
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=_help(
            "Recompute activations in the backward pass: less memory for long responses, "
            "about a third more compute per training pass."
        ),
    )
    trust_remote_code: bool = field(
        default=False,
        metadata=_help("Run Python code shipped with the model (only for models you trust)."),
    )

    def __post_init__(self) -> None:
        _check(bool(self.model.strip()), "model is empty: give a hub id or a local folder.")


@dataclass
class LoraConfig:
    rank: int = field(default=8, metadata=_help("LoRA rank r.", minimum=1))
    alpha: float = field(default=16.0, metadata=_help("LoRA alpha (scale = alpha / r).", minimum=0))
    dropout: float = field(default=0.0, metadata=_help("LoRA dropout.", minimum=0, maximum=0.9))
    targets: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata=_help("Comma-separated projection names, adapted in the language model only."),
    )

    def __post_init__(self) -> None:
        _check(self.rank >= 1, f"LoRA rank must be >= 1 (got {self.rank}).")
        _check(self.alpha > 0, f"LoRA alpha must be > 0 (got {self.alpha}).")
        _check(0 <= self.dropout < 1, f"LoRA dropout must be in [0, 1) (got {self.dropout}).")
        _check(bool(self.target_list()), "LoRA targets is empty: name at least one projection.")

    def target_list(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]


@dataclass
class TaskConfig:
    kind: TaskKind = field(
        default="open",
        metadata=_help(
            "open question, closed class list, multiple choice with option letters, "
            "yes/no, or a question per image."
        ),
    )
    question: str = field(
        default="Which digit is shown? Answer with a single digit.",
        metadata=_help("The question asked about every image (per_image: the fallback)."),
    )
    options: str = field(
        default="0,1,2,3,4,5,6,7,8,9",
        metadata=_help(
            "Comma-separated classes (classes) or options (multiple_choice; images may carry "
            "their own options); ignored for open and yes_no."
        ),
    )
    option_orders: int = field(
        default=4,
        metadata=_help(
            "multiple_choice: distinct option orders per image among the rollouts; >1 votes "
            "over option contents so letter-position bias does not vote.",
            minimum=1,
        ),
    )
    synonyms: str = field(
        default="",
        metadata=_help("Answer synonyms as 'alias=canonical;alias2=canonical2'."),
    )

    def __post_init__(self) -> None:
        _check(bool(self.question.strip()), "The question is empty: say what to ask.")
        if self.kind == "classes" or (self.kind == "multiple_choice" and self.options.strip()):
            n = len(self.option_list())
            _check(n >= 2, f"A {self.kind} task needs at least 2 options (got {n}).")
            _check(
                len(set(o.lower() for o in self.option_list())) == n,
                "Options contain duplicates: list each option once.",
            )
        if self.kind == "multiple_choice":
            _check(len(self.option_list()) <= 26, "multiple_choice allows at most 26 options.")
        _check(self.option_orders >= 1, f"option_orders must be >= 1 (got {self.option_orders}).")
        for pair in self.synonym_pairs():
            _check(all(pair), f"Bad synonym entry {pair!r}: write alias=canonical.")

    def option_list(self) -> list[str]:
        return [o.strip() for o in self.options.split(",") if o.strip()]

    def synonym_pairs(self) -> list[tuple[str, str]]:
        pairs = []
        for entry in self.synonyms.split(";"):
            if entry.strip():
                alias, _, canonical = entry.partition("=")
                pairs.append((alias.strip(), canonical.strip()))
        return pairs


@dataclass
class RolloutConfig:
    n_rollouts: int = field(
        default=16, metadata=_help("N: sampled answers per image that vote.", minimum=2)
    )
    n_train: int = field(
        default=16, metadata=_help("K <= N: rollouts per image trained on.", minimum=1)
    )
    temperature: float = field(
        default=1.0, metadata=_help("Sampling temperature for rollouts (> 0).", minimum=0.01)
    )
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling top-p.", minimum=0.01))
    max_new_tokens: int = field(
        default=8, metadata=_help("Longest response sampled.", minimum=1, maximum=4096)
    )
    batch_tokens: int = field(
        default=131072,
        metadata=_help(
            "Most tokens (prompts + responses) one generate call holds in its KV cache; "
            "a step's rollouts are split over more calls above it.",
            minimum=1,
        ),
    )

    def __post_init__(self) -> None:
        _check(self.batch_tokens >= 1, "batch_tokens must be >= 1.")
        _check(self.n_rollouts >= 2, f"N must be >= 2 to vote (got {self.n_rollouts}).")
        _check(
            1 <= self.n_train <= self.n_rollouts,
            f"K (n_train={self.n_train}) must be between 1 and N (n_rollouts={self.n_rollouts}).",
        )
        _check(
            self.temperature > 0,
            "Rollout temperature must be > 0: at 0 every rollout is the same and no answer "
            "can be rewarded over another.",
        )
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p}).")
        _check(self.max_new_tokens >= 1, "max_new_tokens must be >= 1.")


@dataclass
class RewardConfig:
    reward: RewardKind = field(
        default="ttrv",
        metadata=_help(
            "ttrv = frequency + alpha * negative entropy with batch-scope advantages (the "
            "entropy term reaches the gradient); ttrv_paper = the reference code's form "
            "(per-image normalisation, entropy cancels); frequency; majority (TTRL); "
            "entropy (TENT-like); random (control)."
        ),
    )
    alpha: float = field(
        default=0.75, metadata=_help("Weight of the negative-entropy term.", minimum=0)
    )
    normalize_entropy: bool = field(
        default=True, metadata=_help("Divide entropy by log M (M = distinct answers).")
    )
    advantage_scope: Literal["auto", "group", "batch"] = field(
        default="auto",
        metadata=_help(
            "Normalise advantages per image (group) or across the step's images (batch); "
            "auto = batch for ttrv and entropy (whose entropy term per-image normalisation "
            "would cancel), group for the others."
        ),
    )

    def __post_init__(self) -> None:
        _check(self.alpha >= 0, f"alpha must be >= 0 (got {self.alpha}).")

    def scope(self) -> Literal["group", "batch"]:
        if self.advantage_scope != "auto":
            return self.advantage_scope
        # The entropy term is constant within an image's group: only batch scope lets it act.
        return "batch" if self.reward in ("ttrv", "entropy") else "group"


@dataclass
class OptimConfig:
    learning_rate: float = field(
        default=3e-3, metadata=_help("AdamW learning rate for the LoRA weights.", minimum=0)
    )
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay.", minimum=0))
    schedule: Literal["constant", "cosine", "linear"] = field(
        default="cosine", metadata=_help("Learning-rate schedule after warm-up.")
    )
    warmup_ratio: float = field(
        default=0.03, metadata=_help("Share of steps spent warming up.", minimum=0, maximum=1)
    )
    grad_clip: float = field(
        default=1.0, metadata=_help("Clip the gradient norm (0 = off).", minimum=0)
    )
    clip_eps: float = field(
        default=0.2, metadata=_help("PPO clip range of the surrogate.", minimum=0)
    )
    beta: float = field(
        default=0.0,
        metadata=_help("KL weight against the base model (adapter disabled).", minimum=0),
    )
    images_per_step: int = field(default=4, metadata=_help("Images in one GRPO step.", minimum=1))
    rounds: int = field(default=2, metadata=_help("Passes over the images.", minimum=1))
    skip_converged: bool = field(
        default=True,
        metadata=_help("Drop images whose rollouts all agreed from later rounds."),
    )
    micro_batch_tokens: int = field(
        default=16384,
        metadata=_help(
            "Tokens per training forward/backward (prompt + rollouts): fewer saves memory, "
            "more saves time. The rollouts of one prompt are never split.",
            minimum=1,
        ),
    )
    adapt_images: int = field(
        default=0,
        metadata=_help(
            "How many of the session's images to adapt on (a seeded sample); 0 = all but the "
            "guard's watch pool. Every image still gets answers before and after.",
            minimum=0,
        ),
    )
    seed: int = field(default=0, metadata=_help("Seed for sampling, shuffling and LoRA init."))

    def __post_init__(self) -> None:
        _check(self.learning_rate > 0, f"learning_rate must be > 0 (got {self.learning_rate}).")
        _check(self.learning_rate < 1, f"learning_rate {self.learning_rate} is far too large.")
        _check(self.weight_decay >= 0, "weight_decay must be >= 0.")
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1).")
        _check(self.grad_clip >= 0, "grad_clip must be >= 0 (0 turns clipping off).")
        _check(self.clip_eps >= 0, "clip_eps must be >= 0.")
        _check(self.beta >= 0, f"beta must be >= 0 (got {self.beta}).")
        _check(self.images_per_step >= 1, "images_per_step must be >= 1.")
        _check(self.rounds >= 1, "rounds must be >= 1.")
        _check(self.micro_batch_tokens >= 1, "micro_batch_tokens must be >= 1.")
        _check(self.adapt_images >= 0, "adapt_images must be >= 0 (0 = all but the watch pool).")


@dataclass
class GuardConfig:
    guard: bool = field(
        default=True,
        metadata=_help("Watch unsupervised signals and stop / roll back before harm."),
    )
    max_marginal_entropy_drop: float = field(
        default=0.1,
        metadata=_help(
            "Stop when the entropy of greedy answers across images falls by this share "
            "of its value before adaptation.",
            minimum=0,
            maximum=1,
        ),
    )
    max_invalid_rise: float = field(
        default=0.10,
        metadata=_help("Stop when the invalid rate of rollouts rises by this much.", minimum=0),
    )
    max_kl: float = field(
        default=0.5, metadata=_help("Stop when mean KL to the base exceeds this.", minimum=0)
    )
    max_changed_answers: float = field(
        default=0.15,
        metadata=_help(
            "Stop when more than this share of the images with a valid greedy answer before "
            "adaptation now give another valid answer (1 = never).",
            minimum=0,
            maximum=1,
        ),
    )

    max_unexplained_flips: float = field(
        default=0.10,
        metadata=_help(
            "Stop when more than this share of the sampled watch images now answer "
            "something that neither their greedy answer nor their vote before adaptation "
            "favoured (1 = never).",
            minimum=0,
            maximum=1,
        ),
    )
    watch_share: float = field(
        default=0.2,
        metadata=_help(
            "Share of the session's images held out as a watch pool: never trained on, the "
            "guard checks them for harm (0 = no pool).",
            minimum=0,
            maximum=0.9,
        ),
    )
    max_watch_images: int = field(
        default=200, metadata=_help("Most images in the watch pool.", minimum=1)
    )
    min_watch_images: int = field(
        default=10,
        metadata=_help(
            "Fewest images a watch pool needs to say anything; with fewer the guard watches "
            "only the images it adapts on (and says so).",
            minimum=1,
        ),
    )
    check_every: int = field(
        default=10,
        metadata=_help(
            "Guard check every this many steps, besides each round's end (0 = round ends "
            "only).",
            minimum=0,
        ),
    )
    healthy_margin: float = field(
        default=0.5,
        metadata=_help(
            "A checkpoint becomes a rollback target only when every signal is within this "
            "share of its bound; otherwise a trip rolls back further, to the unadapted model.",
            minimum=0.05,
            maximum=1,
        ),
    )
    forecast_images: int = field(
        default=32,
        metadata=_help(
            "Images sampled N times before adapting, for the forecast and the unexplained-"
            "flips signal (0 = no forecast).",
            minimum=0,
        ),
    )

    def __post_init__(self) -> None:
        _check(0 <= self.max_marginal_entropy_drop <= 1, "max_marginal_entropy_drop in [0, 1].")
        _check(
            0 <= self.max_unexplained_flips <= 1,
            f"max_unexplained_flips must be in [0, 1] (got {self.max_unexplained_flips}).",
        )
        _check(
            0 <= self.watch_share <= 0.9,
            f"watch_share must be in [0, 0.9] (got {self.watch_share}): at least a tenth of "
            "the images must be left to adapt on.",
        )
        _check(self.max_watch_images >= 1, "max_watch_images must be >= 1.")
        _check(self.min_watch_images >= 1, "min_watch_images must be >= 1.")
        _check(self.check_every >= 0, "check_every must be >= 0 (0 = only at round ends).")
        _check(
            0.05 <= self.healthy_margin <= 1,
            f"healthy_margin must be in [0.05, 1] (got {self.healthy_margin}).",
        )
        _check(self.forecast_images >= 0, "forecast_images must be >= 0 (0 = no forecast).")
        _check(self.max_invalid_rise >= 0, "max_invalid_rise must be >= 0.")
        _check(self.max_kl > 0, "max_kl must be > 0.")
        _check(
            0 <= self.max_changed_answers <= 1,
            f"max_changed_answers must be in [0, 1] (got {self.max_changed_answers}).",
        )


@dataclass
class AdaptConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdaptConfig:
        """Build from a (possibly partial) nested dict; unknown keys are an error."""
        parts = {}
        for f in dataclasses.fields(cls):
            sub = dict(data.get(f.name) or {})
            sub_cls = SECTIONS[f.name]
            known = {sf.name for sf in dataclasses.fields(sub_cls)}
            unknown = set(sub) - known
            _check(not unknown, f"Unknown {f.name} settings: {sorted(unknown)}.")
            parts[f.name] = sub_cls(**sub)
        return cls(**parts)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "lora": LoraConfig,
    "task": TaskConfig,
    "rollout": RolloutConfig,
    "reward": RewardConfig,
    "optim": OptimConfig,
    "guard": GuardConfig,
}


def field_choices(cls: type, name: str) -> tuple[str, ...] | None:
    """The allowed values of a Literal-typed field, or None."""
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    return None


def field_type(cls: type, name: str) -> type:
    hint = typing.get_type_hints(cls)[name]
    return str if typing.get_origin(hint) is Literal else hint
