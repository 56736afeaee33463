"""Checks Start runs before it queues anything: is the model there, can it take images,
and does the task fit it. Read-only (files and the hub cache), no weights loaded, so a
wrong model is a message at once instead of a failed session a second later.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ttrv.config import ModelConfig, TaskConfig
from ttrv.digits import MC_QUESTION

from .model_card import cached_snapshot, is_digits_model

# huggingface_hub's repo id rule: [namespace/]name, letters, digits, "-", "_", ".".
HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
TEMPLATE_CONFIGS = ("tokenizer_config.json", "processor_config.json")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path.name} in the model folder cannot be read ({exc}).") from exc
    return data if isinstance(data, dict) else {}


def _takes_images(model_type: str) -> bool:
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
    if not remote and not _takes_images(model_type):
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


def check_model(cfg: ModelConfig) -> str:
    """Raise ValueError saying what is wrong with the model setting; else a one-line note
    of where it will come from."""
    name = (cfg.model or "").strip()
    if not name:
        raise ValueError("No model chosen: pick the bundled model, or type a folder or hub id.")
    local = Path(name).expanduser()
    if local.is_dir():
        check_folder(local, f"The model folder {name}", cfg.trust_remote_code)
        return f"model folder {local.name}"
    if local.exists():
        raise ValueError(f"{name} is a file; the model is the folder that holds config.json.")
    if name.startswith(("/", ".", "~", "\\")) or local.parent.is_dir() and local.parent != Path():
        raise ValueError(
            f"The model folder {name} does not exist. Check the path, or pick a model from "
            "the list."
        )
    if not HUB_ID.match(name) or ".." in name:
        raise ValueError(
            f"The model {name!r} is neither an existing folder nor a Hugging Face hub id "
            "(like Qwen/Qwen2.5-VL-3B-Instruct). Check the path, or pick one from the list."
        )
    snapshot = cached_snapshot(name)
    if snapshot is not None and (snapshot / "config.json").is_file():
        check_folder(snapshot, f"The cached model {name}", cfg.trust_remote_code)
        return f"hub model {name} (cached)"
    if hub_offline():
        raise ValueError(
            f"The hub model {name} is not in the local Hugging Face cache, and the hub is "
            "switched off here (HF_HUB_OFFLINE=1), so it cannot be downloaded. Download it on "
            "a connected machine, or pick a local folder."
        )
    return f"hub model {name} (downloaded when the run starts)"


def task_notes(model: str, task: TaskConfig) -> list[str]:
    """Warnings (not errors) about asking this model this task: the digits model knows
    only the prompts it was trained on."""
    if not is_digits_model(model):
        return []
    trained = {"open": TaskConfig().question, "multiple_choice": MC_QUESTION}
    if task.kind not in trained:
        return [
            f"The digits model was trained on open and multiple-choice prompts only; a "
            f"{task.kind.replace('_', ' ')} task gets digit-like answers or junk."
        ]
    if task.question.strip() != trained[task.kind]:
        return [
            f"The digits model was trained on the question {trained[task.kind]!r} for this "
            "task kind; other wording gets digit-like answers or junk."
        ]
    return []
