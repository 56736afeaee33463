"""Image-only processors for VLM families whose stock processor needs torchvision.

Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL and SmolVLM processors take a video processor, and
every video processor in transformers needs torchvision (which this project must not
install). transformers derives a processor's sub-processors from its `__init__` signature,
so a subclass whose `__init__` has no `video_processor` parameter loads and saves as an
image + text processor. Videos are not supported by these classes; images behave exactly
as with the stock processor.

Nothing here runs at import time; `register_image_only_processors()` is called by
`ttrv.loading.load_model` when torchvision is not importable.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any

from transformers import AutoProcessor as _AutoProcessor
from transformers import (
    InternVLConfig,
    InternVLProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
    SmolVLMConfig,
    SmolVLMProcessor,
)


class _SavesAsStock:
    """`save_pretrained` records the stock class name (as hub checkpoints do), so a saved
    folder loads anywhere, with or without these classes."""

    def save_pretrained(self, save_directory, *args: Any, **kwargs: Any) -> Any:
        result = super().save_pretrained(save_directory, *args, **kwargs)
        own = type(self).__name__
        stock = next(
            c.__name__ for c in type(self).__mro__ if c.__module__.startswith("transformers.")
        )
        for path in Path(save_directory).glob("*.json"):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and data.get("processor_class") == own:
                data["processor_class"] = stock
                path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        return result


class ImageOnlyQwen2VLProcessor(_SavesAsStock, Qwen2VLProcessor):
    """Qwen2-VL processor without a video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen2_5_VLProcessor(_SavesAsStock, Qwen2_5_VLProcessor):  # noqa: N801 (mirrors the stock name)
    """Qwen2.5-VL processor without a video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen3VLProcessor(_SavesAsStock, Qwen3VLProcessor):
    """Qwen3-VL processor without a video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyInternVLProcessor(_SavesAsStock, InternVLProcessor):
    """InternVL (HF-native) processor without a video processor."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_seq_length=256,
        chat_template=None,
        **kwargs,
    ):
        super().__init__(
            image_processor,
            tokenizer,
            None,
            image_seq_length=image_seq_length,
            chat_template=chat_template,
            **kwargs,
        )


class ImageOnlySmolVLMProcessor(_SavesAsStock, SmolVLMProcessor):
    """SmolVLM processor without a video processor.

    The stock `apply_chat_template` reads `self.video_processor.num_frames` even for image
    conversations, so it is replaced by the generic one (no video frame sampling).
    """

    def __init__(self, image_processor, tokenizer, image_seq_len=169, chat_template=None, **kwargs):
        super().__init__(
            image_processor,
            tokenizer,
            None,
            image_seq_len=image_seq_len,
            chat_template=chat_template,
            **kwargs,
        )

    def apply_chat_template(self, conversation, chat_template=None, **kwargs: Any):
        conversations, _ = self._normalize_conversations(conversation)
        parts = [
            part
            for conv in conversations
            for message in conv
            for part in message.get("content") or []
            if isinstance(part, dict)
        ]
        if any(part.get("type") == "video" for part in parts):
            raise ValueError("This SmolVLM processor is image-only (torchvision is not installed).")
        # Skip SmolVLMProcessor.apply_chat_template (video defaults) and use the generic one.
        return super(SmolVLMProcessor, self).apply_chat_template(
            conversation, chat_template, **kwargs
        )


# model_type -> (config class, stock processor class, image-only processor class)
IMAGE_ONLY_PROCESSORS: dict[str, tuple[type, type, type]] = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLProcessor, ImageOnlyQwen2VLProcessor),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLProcessor, ImageOnlyQwen2_5_VLProcessor),
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLProcessor, ImageOnlyQwen3VLProcessor),
    "internvl": (InternVLConfig, InternVLProcessor, ImageOnlyInternVLProcessor),
    "smolvlm": (SmolVLMConfig, SmolVLMProcessor, ImageOnlySmolVLMProcessor),
}


@functools.cache
def torchvision_available() -> bool:
    """True when torchvision can really be imported (a broken install counts as absent)."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def image_only_processor_class(model_type: str) -> type | None:
    """The image-only processor to use for `model_type`, or None when the stock one works."""
    if model_type not in IMAGE_ONLY_PROCESSORS or torchvision_available():
        return None
    return IMAGE_ONLY_PROCESSORS[model_type][2]


def register_image_only_processors() -> None:
    """Map the families' configs to the image-only processors in `AutoProcessor`.

    Only without torchvision; idempotent.
    """
    if torchvision_available():
        return
    for config_cls, _, processor_cls in IMAGE_ONLY_PROCESSORS.values():
        _AutoProcessor.register(config_cls, processor_cls, exist_ok=True)
