"""Load a Hugging Face image-text-to-text model and its processor, ready for LoRA.

`load_model(ModelConfig)` takes a hub id or a local folder and returns a `LoadedModel`
with every base weight frozen. It never degrades silently: a missing model, a folder
whose processor cannot be built, or a "processor" that turns out to be only a tokenizer
raise `ModelLoadError` with a message that says what to fix.

Families whose stock processor needs torchvision (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL,
SmolVLM) load through the image-only processors in `ttrv.processors` when torchvision is
not importable, also for real hub checkpoints that name the stock class.

4-bit / 8-bit loading uses bitsandbytes on the language model only: the vision tower,
projector and lm_head stay in the model dtype.

Base weights: safetensors when the folder has them (`use_safetensors=True`, so a pickle
beside them is never read). A model with only pickle weights (`pytorch_model.bin`) still
loads, through torch's weights-only unpickler (which refuses to run code), but says so:
`info["weights_format"]` is "pickle" and `info["warnings"]` carries a message the worker
records as a session warning.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    PretrainedConfig,
)

from .config import ModelConfig
from .placement import (
    gpu_budgets,
    input_device,
    is_split,
    placement_summary,
    process_device,
    split_plan,
)
from .processors import image_only_processor_class, register_image_only_processors

# Submodules of `model.model` that hold the language model (everything else is vision side).
LANGUAGE_MODULES = ("language_model", "text_model")
# Tokens that end a chat turn in common templates; they stop generation like EOS does.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<end_of_turn>",
    "<end_of_utterance>",
    "<|eot_id|>",
    "<|end|>",
)


log = logging.getLogger(__name__)

# The weight files `from_pretrained` looks for (no variants), safest first.
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class ModelLoadError(RuntimeError):
    """The model or its processor could not be loaded; the message says what to fix."""


@dataclass
class LoadedModel:
    model: Any  # a PreTrainedModel (AutoModelForImageTextToText)
    processor: Any  # a ProcessorMixin with an image processor and a tokenizer
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    family: str  # config.model_type, e.g. "qwen2_5_vl"
    info: dict[str, Any] = field(default_factory=dict)


# ---- device, dtype, source -------------------------------------------------------------


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, choice)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _not_found(name: str, cause: BaseException | None = None) -> ModelLoadError:
    where = "the offline Hugging Face cache" if _offline() else "the Hugging Face hub and its cache"
    detail = f" ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})" if cause else ""
    return ModelLoadError(
        f"Model {name!r} not found: it was looked for as a local folder "
        f"({Path(name).expanduser().resolve()} does not exist) and as a hub id in {where}. "
        "Give an existing folder with config.json, or a hub id that has been downloaded "
        f"before.{detail}"
    )


def _load_config(name: str, trust_remote_code: bool) -> PretrainedConfig:
    """The model config; a missing folder / unknown hub id becomes a ModelLoadError."""
    from huggingface_hub.errors import HFValidationError

    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"Folder {str(local)!r} has no config.json: it is not a model.")
    elif local.exists():
        raise ModelLoadError(f"{name!r} is a file; give the model's folder or a hub id.")
    try:
        return AutoConfig.from_pretrained(
            str(local) if local.is_dir() else name, trust_remote_code=trust_remote_code
        )
    except (OSError, HFValidationError) as exc:
        if local.is_dir():
            raise ModelLoadError(f"Cannot read the config of {name!r}: {exc}") from exc
        raise _not_found(name, exc) from exc
    except ValueError as exc:  # unknown model_type, remote code refused, ...
        raise ModelLoadError(f"Cannot read the config of {name!r}: {exc}") from exc


def _is_safetensors(name: str) -> bool:
    return name.endswith((".safetensors", ".safetensors.index.json"))


def weights_format(source: str, config: PretrainedConfig | None = None) -> tuple[str, str | None]:
    """("safetensors" | "pickle" | "unknown", file name) of the base weights that
    `from_pretrained(source)` reads: a local folder's files (or the file its config names
    in `transformers_weights`), else, for a hub id, the files in the local cache."""
    explicit = getattr(config, "transformers_weights", None)
    if explicit:
        return ("safetensors" if _is_safetensors(str(explicit)) else "pickle"), str(explicit)
    local = Path(source).expanduser()
    if local.is_dir():
        found = [n for n in (*SAFETENSORS_FILES, *PICKLE_FILES) if (local / n).is_file()]
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            found = [
                n
                for n in (*SAFETENSORS_FILES, *PICKLE_FILES)
                if isinstance(try_to_load_from_cache(source, n), str)
            ]
        except ValueError:  # not a valid hub id
            found = []
    if not found:
        return "unknown", None
    return ("safetensors" if _is_safetensors(found[0]) else "pickle"), found[0]


def pickle_warning(model: str, weights_file: str) -> str:
    return (
        f"{model!r} has only pickle weights ({weights_file}), no safetensors. They were "
        "loaded with torch's weights-only unpickler, which refuses to run code, but pickle "
        "is not the safe format the workbench expects: prefer a safetensors copy "
        "(`save_pretrained` writes one)."
    )


# ---- processor ---------------------------------------------------------------------------


def load_processor(source: str, model_type: str, trust_remote_code: bool = False) -> Any:
    """The processor of `source`; raises ModelLoadError unless it has an image processor."""
    register_image_only_processors()
    image_only = image_only_processor_class(model_type)
    try:
        if image_only is not None:
            # Real checkpoints name the stock class, which would need torchvision.
            processor = image_only.from_pretrained(source)
        else:
            processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError, ValueError, ImportError, TypeError from sub-loaders
        raise ModelLoadError(
            f"Cannot build the processor of {source!r} ({model_type}): "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}. The folder needs "
            "the tokenizer files and the image processor config (processor_config.json or "
            "preprocessor_config.json) saved by `processor.save_pretrained`."
        ) from exc
    if getattr(processor, "image_processor", None) is None or not hasattr(processor, "tokenizer"):
        raise ModelLoadError(
            f"The processor of {source!r} is a {type(processor).__name__} without an image "
            "processor, so images cannot be given to the model. Add the image processor config "
            "(preprocessor_config.json / processor_config.json) to the folder."
        )
    return processor


# ---- quantization ------------------------------------------------------------------------


def non_language_modules(config: PretrainedConfig) -> list[str]:
    """Module names outside the language model ("model.visual", ..., "lm_head").

    Found by building the model on the meta device, so each family's own names are used.
    """
    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(config)
    inner = getattr(skeleton, "model", None)
    names = []
    if inner is not None:
        names = [
            f"model.{name}"
            for name, _ in inner.named_children()
            if name not in LANGUAGE_MODULES and not name.startswith("embed")
        ]
    names += [name for name, _ in skeleton.named_children() if name != "model"]
    return names


def bnb_config(kind: str, dtype: torch.dtype, skip_modules: list[str]) -> Any:
    """BitsAndBytesConfig for "4bit" (nf4, double quant) or "8bit"; None for "none"."""
    if kind == "none":
        return None
    try:
        from transformers import BitsAndBytesConfig
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelLoadError(
            f"{kind} loading needs bitsandbytes: pip install bitsandbytes"
        ) from exc
    if kind == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=skip_modules,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)


def _fix_cpu_4bit(model: Any) -> int:
    """Turn off bitsandbytes' AVX512-BF16 CPU repacking on every Linear4bit.

    After the first eval-mode forward (a generate) bitsandbytes repacks 4-bit weights on
    such CPUs; LoRA gradients then come back None (or bias layers fail). Returns the count.
    """
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def _prepare_kbit(model: Any, device: torch.device) -> Any:
    """peft's k-bit preparation (norms etc. in fp32) without gradient checkpointing, which
    would turn off the KV cache that rollouts need; the CPU 4-bit fix where it applies.

    Measured on CPU (bitsandbytes 0.50.2): with or without this call LoRA gradients are
    identical; the AVX512-BF16 fix is what makes them non-zero after a generate.
    """
    from peft import prepare_model_for_kbit_training

    if device.type == "cpu":
        _fix_cpu_4bit(model)
    with warnings.catch_warnings():  # peft reads transformers' deprecated attribute
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


# ---- the model ---------------------------------------------------------------------------


def parameter_counts(model: Any) -> tuple[int, int]:
    """(total, trainable) logical parameter counts; 4-bit packed weights count unpacked."""
    total = trainable = 0
    for param in model.parameters():
        shape = getattr(getattr(param, "quant_state", None), "shape", None)
        n = int(torch.Size(shape).numel()) if shape is not None else param.numel()
        total += n
        if param.requires_grad:
            trainable += n
    return total, trainable


def model_info(model: Any, model_id: str, quantization: str) -> dict[str, Any]:
    total, trainable = parameter_counts(model)
    param = next(model.parameters())
    return {
        "model_id": model_id,
        "total_params": total,
        "trainable_params": trainable,
        "device": str(param.device),
        "dtype": str(getattr(model, "dtype", param.dtype)).replace("torch.", ""),
        "quantization": quantization,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


def gpu_memory_mib(device: torch.device) -> float | None:
    """Memory the process holds on a CUDA device (MiB), None elsewhere."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.memory_allocated(device) / 2**20


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load model + processor from a hub id or local folder, base weights frozen, eval mode."""
    device = process_device(cfg)
    dtype = resolve_dtype(cfg.dtype, device)
    config = _load_config(cfg.model, cfg.trust_remote_code)
    source = (
        str(Path(cfg.model).expanduser()) if Path(cfg.model).expanduser().is_dir() else cfg.model
    )
    family = config.model_type
    processor = load_processor(source, family, cfg.trust_remote_code)

    if is_split(cfg):  # every block on the GPU the plan gives it, checked before loading
        skip = non_language_modules(config) if cfg.quantization != "none" else []
        device_map: dict[str, Any] = split_plan(
            config, cfg.quantization, dtype, gpu_budgets(cfg), skip
        )
    elif device.type == "cuda":
        # "cuda" without an index is the process's current GPU: under `accelerate launch`
        # each process has set its own (cuda:<local rank>), alone it is GPU 0.
        device_map = {"": device.index if device.index is not None else torch.cuda.current_device()}
    else:
        device_map = {"": "cpu"}
    kwargs: dict[str, Any] = {
        "config": config,
        "dtype": dtype,
        "trust_remote_code": cfg.trust_remote_code,
        "device_map": device_map,
        # Explicit, not left to a default that may change: a pickle is read with torch's
        # restricted unpickler, never with one that can run code.
        "weights_only": True,
    }
    fmt, weights_file = weights_format(source, config)
    if fmt == "safetensors" and not getattr(config, "transformers_weights", None):
        kwargs["use_safetensors"] = True  # never fall back to a pickle lying beside them
    if cfg.quantization != "none":
        kwargs["quantization_config"] = bnb_config(
            cfg.quantization, dtype, non_language_modules(config)
        )
    try:
        model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
    except ValueError as exc:
        raise ModelLoadError(
            f"{cfg.model!r} ({family}) cannot be loaded as an image-text-to-text model: {exc}"
        ) from exc
    except OSError as exc:
        raise ModelLoadError(f"Cannot load the weights of {cfg.model!r}: {exc}") from exc
    if cfg.quantization != "none":
        model = _prepare_kbit(model, device)
    model.requires_grad_(False)
    model.eval()
    if fmt == "unknown":  # a hub id read for the first time: its files are cached now
        fmt, weights_file = weights_format(source, config)
    if is_split(cfg):
        device = input_device(model, device)
    info = model_info(model, cfg.model, cfg.quantization)
    info["placement"] = placement_summary(model)
    info["weights_format"] = fmt
    info["warnings"] = []
    if fmt == "pickle":
        message = pickle_warning(cfg.model, str(weights_file))
        log.warning(message)
        info["warnings"].append(message)
    return LoadedModel(
        model=model,
        processor=processor,
        tokenizer=processor.tokenizer,
        device=device,
        dtype=dtype,
        family=family,
        info=info,
    )


# ---- token ids for generation ------------------------------------------------------------


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value if v is not None]


def eos_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """Every id that ends a response: generation config EOS (int or list), the tokenizer's
    EOS, and the template's end-of-turn token where the tokenizer has one."""
    ids = _as_list(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    ids += _as_list(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids += [
        vocab[t] for t in END_OF_TURN_TOKENS if t in vocab and t in tokenizer.all_special_tokens
    ]
    return list(dict.fromkeys(ids))


def _config_token_ids(config: Any, seen: set[int] | None = None) -> list[int]:
    """All `*_token_id` / `*_token_index` values of a config and its sub-configs."""
    seen = set() if seen is None else seen
    if id(config) in seen:
        return []
    seen.add(id(config))
    ids: list[int] = []
    for key, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            ids += _config_token_ids(value, seen)
        elif key.lstrip("_").endswith(("token_id", "token_index", "token_ids")):
            ids += _as_list(value)
    return ids


def suppressed_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """Ids a rollout must never sample: special and added special tokens (image
    placeholders, boi/eoi, vision pad, bos, pad, ...) except those in `eos_token_ids`.

    A sampled image placeholder breaks the next forward pass ("Image features and image
    tokens do not match"); pass this list as `generate(suppress_tokens=...)`.
    """
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    ids |= set(_config_token_ids(model.config))
    vocab_size = model.get_output_embeddings().weight.shape[0]
    keep = set(eos_token_ids(tokenizer, model))
    return sorted(i for i in ids if 0 <= i < vocab_size and i not in keep)
