"""Is a folder a loadable image-text-to-text model? Answered from its files alone (config,
weights, chat template), no weights loaded, so front ends can refuse a wrong model at once.

transformers is imported only inside `takes_images`, for its list of model types that
take images; front ends call `check_folder` and never import transformers themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
TEMPLATE_CONFIGS = ("tokenizer_config.json", "processor_config.json")


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path.name} in the model folder cannot be read ({exc}).") from exc
    return data if isinstance(data, dict) else {}


def takes_images(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def check_folder(folder: Path, shown: str, trust_remote_code: bool) -> None:
    """Raise ValueError when `folder` is not a loadable image-text-to-text model."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"The folder {shown} has no config.json, so it is not a Hugging Face model folder. "
            "Pick the folder that holds config.json and the weights."
        )
    config = _json(config_file)
    model_type = str(config.get("model_type") or "")
    remote = bool(config.get("auto_map"))
    if remote and not trust_remote_code:
        raise ValueError(
            f"{shown} ships its own Python code (auto_map in config.json): turn on "
            "trust remote code in the Model tab, only if you trust its author."
        )
    if not remote and not takes_images(model_type):
        raise ValueError(
            f"{shown} is a {model_type or 'model of unknown type'!r} model, which does not take "
            "images: pick an image-text-to-text model (LLaVA, Qwen2.5-VL, Gemma 3, SmolVLM, …)."
        )
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHTS):
        raise ValueError(f"{shown} has no weights (*.safetensors or *.bin files).")
    has_template = any((folder / f).is_file() for f in TEMPLATE_FILES) or any(
        "chat_template" in _json(folder / f) for f in TEMPLATE_CONFIGS if (folder / f).is_file()
    )
    if not has_template:
        raise ValueError(
            f"{shown} has no chat template, so the workbench cannot put an image and a "
            "question into a prompt for it. Use the instruction-tuned (chat) version."
        )
