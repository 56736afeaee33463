"""Configuration dataclasses: one per concern, each field with a help string.

CLI flags (`ttrv.cli`) and UI forms (`ui/`) are derived from these fields, never copied by
hand. This module is the one config contract: every bound is declared once, in a field's
metadata (`minimum` / `maximum` inclusive, `greater_than` / `less_than` exclusive, `why`
appended to the message), and enforced by `__post_init__` (`validate_fields`), together
with the field's type (choices of a Literal, whole numbers for int fields: never rounded).
The front ends only convert text to the field's type (`convert_value`) and show the
`ConfigError` message as it is, so the CLI and the UI refuse the same values with the same
words.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import string
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .rewards import REWARDS

BUNDLED_MODEL = str(Path(__file__).resolve().parent.parent / "models" / "ttrv-digits-llava")

TaskKind = Literal["open", "classes", "multiple_choice", "yes_no", "per_image"]
# The reward names are the registry's (ttrv.rewards.REWARDS): a new reward is one entry there.
RewardKind = Literal[tuple(REWARDS)]  # type: ignore[valid-type]


class ConfigError(ValueError):
    """A configuration value is invalid; the message says how to fix it."""


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# (metadata key, how the message says it, the test the value must pass)
_BOUNDS: tuple[tuple[str, str, Callable[[Any, Any], bool]], ...] = (
    ("minimum", ">=", operator.ge),
    ("greater_than", ">", operator.gt),
    ("maximum", "<=", operator.le),
    ("less_than", "<", operator.lt),
)


def bounds_text(meta: Mapping[str, Any]) -> str:
    """A field's declared range, for help texts: "0 .. 0.9", "> 0, < 1", ">= 1" or ""."""
    if meta.get("minimum") is not None and meta.get("maximum") is not None:
        return f"{meta['minimum']} .. {meta['maximum']}"
    return ", ".join(f"{op} {meta[k]}" for k, op, _ in _BOUNDS if meta.get(k) is not None)


def bound_error(where: str, value: float, meta: Mapping[str, Any]) -> str | None:
    """The message for a number outside its declared bounds, or None when inside."""
    for key, op, holds in _BOUNDS:
        limit = meta.get(key)
        if limit is not None and not holds(value, limit):
            why = f": {meta['why']}" if meta.get("why") else ""
            return f"{where} must be {op} {limit} (got {value}){why}."
    return None


def section_name(cls: type) -> str:
    """The name of a config section ("lora"), as messages, flags and forms use it."""
    return next((name for name, c in SECTIONS.items() if c is cls), cls.__name__)


def _number(where: str, value: Any, typ: type) -> int | float:
    """`value` as the field's number type: ints widen to floats, integral floats (JSON, a
    browser's number input) become ints; anything else is refused, never rounded."""
    _check(
        isinstance(value, int | float) and not isinstance(value, bool),
        f"{where} must be a number (got {value!r}).",
    )
    _check(math.isfinite(value), f"{where} must be a finite number (got {value}).")
    if typ is float:
        return float(value)
    _check(
        float(value).is_integer(),
        f"{where} must be a whole number (got {value}): enter it without a fraction.",
    )
    return int(value)


def validate_fields(obj: Any) -> None:
    """Check every field of a config section against its declaration: a Literal's
    choices, bool, str, numbers of the field's type and the metadata's bounds."""
    cls = type(obj)
    hints = typing.get_type_hints(cls)
    section = section_name(cls)
    for f in dataclasses.fields(obj):
        where, value, hint = f"{section}.{f.name}", getattr(obj, f.name), hints[f.name]
        if typing.get_origin(hint) is Literal:
            choices = typing.get_args(hint)
            _check(
                isinstance(value, str) and value in choices,
                f"{where} must be one of {', '.join(choices)} (got {value!r}).",
            )
        elif hint is bool:
            _check(isinstance(value, bool), f"{where} must be true or false (got {value!r}).")
        elif hint in (int, float):
            number = _number(where, value, hint)
            setattr(obj, f.name, number)
            error = bound_error(where, number, f.metadata)
            _check(error is None, error or "")
        elif hint is str:
            _check(isinstance(value, str), f"{where} must be text (got {value!r}).")


class _Section:
    """Base of the config sections: the declared checks first, then the section's rules."""

    def __post_init__(self) -> None:
        validate_fields(self)
        self._rules()

    def _rules(self) -> None:
        """Checks beyond one field's declaration (several fields, text contents)."""


_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def convert_value(cls: type, name: str, raw: Any) -> Any:
    """A form or flag value converted to the type of field `name` of section `cls`.

    Only the type: a number is not rounded or bounds-checked here (the dataclass does
    that, with the message that every front end shows). Empty or non-numeric text for a
    number is refused.
    """
    where = f"{section_name(cls)}.{name}"
    typ = field_type(cls, name)
    if typ is bool:
        if isinstance(raw, str):
            word = raw.strip().lower()
            _check(word in _BOOL_WORDS, f"{where} must be true or false (got {raw!r}).")
            return _BOOL_WORDS[word]
        return bool(raw)
    if typ in (int, float):
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            raise ConfigError(f"{where} is empty: enter a number.")
        if not isinstance(raw, str):
            return raw
        for parse in (int, float):
            try:
                return parse(raw.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number (got {raw!r}).")
    return "" if raw is None else str(raw)


@dataclass
class ModelConfig(_Section):
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
    gpus: str = field(
        default="",
        metadata=_help(
            "GPUs a run uses, as CUDA indices (e.g. 0,1); empty = one device, as device says. "
            "Several: see placement."
        ),
    )
    placement: Literal["replicate", "split"] = field(
        default="replicate",
        metadata=_help(
            "With several GPUs: replicate = one process per GPU, each with a whole copy "
            "(data parallel through accelerate launch); split = one copy spread over them "
            "(for a model that does not fit one GPU)."
        ),
    )
    max_memory_gib: float = field(
        default=0.0,
        metadata=_help(
            "With placement split: the most of the model each GPU may hold, GiB; 0 = what "
            "each has free, less a margin for activations.",
            minimum=0,
        ),
    )
    processes: int = field(
        default=1,
        metadata=_help(
            "Data-parallel processes (accelerate launch) when gpus is empty: on the CPU "
            "(gloo) with device cpu, else on the first GPUs; with gpus listed, one per GPU.",
            minimum=1,
            maximum=64,
        ),
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

    def _rules(self) -> None:
        _check(bool(self.model.strip()), "model is empty: give a hub id or a local folder.")
        gpus = self.gpu_list()  # raises on anything but distinct whole numbers
        _check(
            not gpus or self.device != "cpu",
            "model.gpus names GPUs but model.device is cpu: clear gpus, or set device to "
            "auto or cuda.",
        )
        _check(
            self.placement != "split" or len(gpus) >= 2,
            "model.placement split spreads one model over several GPUs: list at least two in "
            "model.gpus.",
        )
        _check(
            self.max_memory_gib == 0 or self.placement == "split",
            "model.max_memory_gib caps a split model's share of each GPU: set placement to "
            "split, or leave it at 0.",
        )
        _check(
            self.processes == 1 or not gpus,
            "model.processes and model.gpus both say how many processes run: with gpus "
            "listed each GPU runs one, so leave processes at 1.",
        )

    def gpu_list(self) -> list[int]:
        """The CUDA indices of `gpus`, in the order given ("0, 2" -> [0, 2])."""
        parts = [p.strip() for p in self.gpus.split(",") if p.strip()]
        _check(
            all(p.isdigit() for p in parts),
            f"model.gpus must list CUDA indices like 0,1 (got {self.gpus!r}).",
        )
        out = [int(p) for p in parts]
        _check(len(set(out)) == len(out), f"model.gpus names a GPU twice (got {self.gpus!r}).")
        return out

    def data_parallel(self) -> int:
        """How many processes a run starts: one per listed GPU when replicated, the CPU
        process count otherwise (1: the run stays in the calling process)."""
        gpus = self.gpu_list()
        if len(gpus) > 1 and self.placement == "replicate":
            return len(gpus)
        return self.processes


@dataclass
class LoraConfig(_Section):
    rank: int = field(default=8, metadata=_help("LoRA rank r.", minimum=1))
    alpha: float = field(
        default=16.0, metadata=_help("LoRA alpha (scale = alpha / r).", greater_than=0)
    )
    dropout: float = field(default=0.0, metadata=_help("LoRA dropout.", minimum=0, maximum=0.9))
    targets: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata=_help("Comma-separated projection names, adapted in the language model only."),
    )

    def _rules(self) -> None:
        _check(bool(self.target_list()), "LoRA targets is empty: name at least one projection.")

    def target_list(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]


# The paper's wording of each task kind: what `TaskConfig.template = ""` stands for.
# {letters} reads "A, B, C, or D" ("A or B" for two options).
DEFAULT_TEMPLATES: dict[str, str] = {
    "open": "{question}",
    "per_image": "{question}",
    "classes": "{question} Answer with one of: {classes}.",
    "yes_no": "{question} Answer yes or no.",
    "multiple_choice": "{question} Choose the correct answer from the options below and "
    "respond with only the corresponding option letter ({letters}). Do not include any "
    "explanation or extra text. Options: {options}",
}
# What a template may name, per kind: {options} are the lettered options as shown (each by
# `option_format`, joined by `option_separator`), {classes} the class list ("cat, dog").
TEMPLATE_PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "open": ("question",),
    "per_image": ("question",),
    "classes": ("question", "classes"),
    "yes_no": ("question",),
    "multiple_choice": ("question", "options", "letters"),
}
OPTION_PLACEHOLDERS = ("letter", "option")


def template_placeholders(where: str, text: str, allowed: tuple[str, ...]) -> set[str]:
    """The placeholders `text` names; a ConfigError for one outside `allowed`, for a format
    spec or conversion ("{question!r}") and for a stray brace."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ConfigError(
            f"{where} has a stray brace ({exc}): write {{{{ or }}}} for a literal brace."
        ) from None
    names = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in allowed or spec or conversion:
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            usable = ", ".join(f"{{{a}}}" for a in allowed)
            raise ConfigError(f"{where} has an unknown placeholder {{{shown}}}: use {usable}.")
        names.add(name)
    return names


@dataclass
class TaskConfig(_Section):
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
    template: str = field(
        default="",
        metadata=_help(
            "The prompt's wording, to match the wording a model was trained on: {question}; "
            "multiple_choice: {options} (required) and {letters} ('A, B, C, or D'); classes: "
            "{classes}. \\n is a line break. Empty = the paper's wording for the kind "
            "(the preview shows it)."
        ),
    )
    option_format: str = field(
        default="{letter}. {option}",
        metadata=_help("multiple_choice: how each option is shown, with {letter} and {option}."),
    )
    option_separator: str = field(
        default=" ",
        metadata=_help("multiple_choice: what separates the shown options (\\n: line break)."),
    )

    def _rules(self) -> None:
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
        for pair in self.synonym_pairs():
            _check(all(pair), f"Bad synonym entry {pair!r}: write alias=canonical.")
        named = template_placeholders(
            f"task.template ({self.kind})", self.template, TEMPLATE_PLACEHOLDERS[self.kind]
        )
        if self.template and self.kind == "multiple_choice":
            _check(
                "options" in named,
                "task.template must show the options: put {options} in it (the model answers "
                "with their letters).",
            )
        if self.template and self.kind == "per_image":
            _check(
                "question" in named,
                "task.template must hold {question}: each image's own question goes there.",
            )
        shown = template_placeholders("task.option_format", self.option_format, OPTION_PLACEHOLDERS)
        _check(
            "option" in shown,
            "task.option_format must show the option: put {option} in it (e.g. {letter}. {option}).",
        )

    def wording(self) -> str:
        """The template in effect: the person's own, or the paper's wording for the kind."""
        return self.template or DEFAULT_TEMPLATES[self.kind]

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
class RolloutConfig(_Section):
    n_rollouts: int = field(
        default=16,
        metadata=_help(
            "N: sampled answers per image that vote.", minimum=2, why="N answers vote, so N >= 2"
        ),
    )
    n_train: int = field(
        default=16, metadata=_help("K <= N: rollouts per image trained on.", minimum=1)
    )
    temperature: float = field(
        default=1.0,
        metadata=_help(
            "Sampling temperature for rollouts.",
            greater_than=0,
            why="at 0 every rollout is the same and no answer can be rewarded over another",
        ),
    )
    top_p: float = field(
        default=1.0, metadata=_help("Nucleus sampling top-p.", greater_than=0, maximum=1)
    )
    # The one answer length: rollouts, the answers before and after a run (evaluate), and
    # `python -m ttrv answer` and Ask (a session's own value, else this default), so that an
    # adapter answers the same way wherever it is asked.
    max_new_tokens: int = field(
        default=8,
        metadata=_help(
            "Longest response, in tokens: rollouts, the answers before and after a run, "
            "`answer` and Ask.",
            minimum=1,
            maximum=4096,
        ),
    )
    batch_tokens: int = field(
        default=131072,
        metadata=_help(
            "Most tokens (prompts + responses) one generate call holds in its KV cache; "
            "a step's rollouts are split over more calls above it.",
            minimum=1,
        ),
    )

    def _rules(self) -> None:
        _check(
            self.n_train <= self.n_rollouts,
            f"K (n_train={self.n_train}) must be between 1 and N (n_rollouts={self.n_rollouts}).",
        )


@dataclass
class RewardConfig(_Section):
    reward: RewardKind = field(
        default="ttrv",
        metadata=_help("; ".join(f"{name} = {r.summary}" for name, r in REWARDS.items()) + "."),
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
            "auto = the reward's own: batch for "
            + ", ".join(name for name, r in REWARDS.items() if r.scope == "batch")
            + " (whose entropy term per-image normalisation would cancel), group for the others."
        ),
    )

    def scope(self) -> Literal["group", "batch"]:
        if self.advantage_scope != "auto":
            return self.advantage_scope
        return REWARDS[self.reward].scope


@dataclass
class OptimConfig(_Section):
    learning_rate: float = field(
        default=3e-3,
        metadata=_help(
            "AdamW learning rate for the LoRA weights.",
            greater_than=0,
            less_than=1,
            why="nothing learns at 0, and LoRA learning rates are about 1e-4 to 1e-2",
        ),
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


@dataclass
class GuardConfig(_Section):
    guard: bool = field(
        default=True,
        metadata=_help("Watch unsupervised signals and stop / roll back before harm."),
    )
    max_marginal_entropy_drop: float = field(
        default=0.05,
        metadata=_help(
            "Stop when the entropy of greedy answers across images falls by this share "
            "of its value before adaptation.",
            minimum=0,
            maximum=1,
        ),
    )
    max_invalid_rise: float = field(
        default=0.05,
        metadata=_help(
            "Stop when the share of invalid greedy answers rises by this much.", minimum=0
        ),
    )
    max_kl: float = field(
        default=0.5, metadata=_help("Stop when mean KL to the base exceeds this.", greater_than=0)
    )
    max_changed_answers: float = field(
        default=0.05,
        metadata=_help(
            "Stop when more than this share of the images (all of them) now give another "
            "valid answer than their valid greedy answer before adaptation (1 = never).",
            minimum=0,
            maximum=1,
        ),
    )

    max_unexplained_flips: float = field(
        default=0.1,
        metadata=_help(
            "Stop when more than this share of the sampled images (forecast_images) with a "
            "valid answer before adaptation now give another answer that their samples "
            "before adaptation did not favour (1 = never).",
            minimum=0,
            maximum=1,
        ),
    )
    max_letter_share: float = field(
        default=0.6,
        metadata=_help(
            "Multiple choice: stop when more than this share of the images choose the same "
            "option letter (and more than before adaptation); the benchmark's definition of "
            "a letter collapse. Needs no reference, so it also guards a model whose answers "
            "were mostly invalid before (1 = never).",
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
            "Guard check every this many steps, besides each round's end (0 = round ends only).",
            minimum=0,
        ),
    )
    healthy_margin: float = field(
        default=0.75,
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


def config_diff(a: Any, b: Any, prefix: str = "") -> list[dict[str, Any]]:
    """Where two configs (nested dicts, e.g. `AdaptConfig.to_dict()`) differ:
    [{"key": "optim.rounds", "a": 2, "b": 3}], keys in a's order then b's new ones."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in list(a) + [k for k in b if k not in a]:
            out += config_diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [{"key": prefix.rstrip("."), "a": a, "b": b}]
