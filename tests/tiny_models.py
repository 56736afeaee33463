"""Tiny randomly initialised vision-language models, built from config, offline.

`build_tiny_model(family, folder)` writes a folder laid out like a hub checkpoint
(config.json, model.safetensors, generation_config.json, tokenizer files, processor
files; the processor files name the family's *stock* processor class, as real checkpoints
do) and returns it. `ttrv.loading.load_model(ModelConfig(model=str(folder)))` loads it
through the same code path as a real checkpoint. Like their hub counterparts, llava,
qwen2_5_vl and smolvlm keep the image processor in preprocessor_config.json, the others in
processor_config.json; the Qwen, InternVL and SmolVLM folders also ship a
video_preprocessor_config.json (which needs torchvision, so the loader must ignore it).

Every model has ~0.1-0.25 M parameters: text hidden 64, 2 layers, 4 heads (2 KV),
MLP 128 (multiples of 64, so the language model can be quantised to 4 bit with
bitsandbytes); vision hidden 32, 2 layers; 32x32 images give 4-16 image tokens. The
tokenizer is a byte-level BPE trained on a fixed English corpus, with the family's special
tokens and chat template, so any text encodes. Building is deterministic (fixed seed, the
global torch RNG is left untouched) and takes well under a second per family.

In tests use the `tiny_model_dir` fixture from `tests/conftest.py`, which caches folders
per session.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAMILIES: tuple[str, ...] = (
    "llava",
    "gemma3",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "internvl",
    "idefics3",
    "smolvlm",
)

SEED = 1234
IMAGE_SIZE = 32
VOCAB_SIZE = 384  # BPE target; byte alphabet (256) + merges + special tokens

TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
)
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # sum = 16 / 2
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)

_CORPUS = [
    "Which digit is shown? Answer with a single digit.",
    "What is in the image? Answer yes or no. The answer is A, B, C or D.",
    "Choose the correct answer from the options below and respond with only the "
    "corresponding option letter. Do not include any explanation or extra text. Options:",
    "0 1 2 3 4 5 6 7 8 9 zero one two three four five six seven eight nine",
    "a cat, a dog, a bird, a car, a red apple, a green tree, the sky is blue.",
    "user assistant system model USER ASSISTANT User Assistant",
]

_CHATML_BODY = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}IMAGE"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_TEMPLATE = _CHATML_BODY.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>")
INTERNVL_TEMPLATE = _CHATML_BODY.replace("IMAGE", "<IMG_CONTEXT>\n")
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}"
    "{{ message['role'] | upper }}: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


@dataclass(frozen=True)
class _Family:
    """What differs between families: tokens, template, configs, processor."""

    specials: list[str]
    roles: dict[str, str]  # bos/eos/pad/unk -> token
    named: dict[str, str]  # tokenizer attributes, e.g. image_token
    template: str
    eos: list[str]  # generation stops on any of these (first = tokenizer eos)
    config: Callable[[Callable[[str], int], int], Any]  # (token -> id, vocab) -> config
    processor: Callable[[Any], Any]  # tokenizer -> processor
    processor_class: str  # the stock class name real checkpoints record
    extra_files: dict[str, dict] = field(default_factory=dict)
    legacy_layout: bool = False  # image processor in preprocessor_config.json, as on the hub


def _tokenizer(fam: _Family) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=fam.specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        chat_template=fam.template,
        extra_special_tokens=fam.named,
        **{f"{role}_token": token for role, token in fam.roles.items()},
    )


# ---- configs -----------------------------------------------------------------------------


def _llava_config(tid: Callable[[str], int], vocab: int) -> Any:
    from transformers import LlavaConfig

    return LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=vocab, **TEXT),
        vision_config=dict(
            model_type="clip_vision_model",
            image_size=IMAGE_SIZE,
            patch_size=8,
            projection_dim=32,
            **VISION,
        ),
        image_token_index=tid("<image>"),
        image_seq_length=16,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def _gemma3_config(tid: Callable[[str], int], vocab: int) -> Any:
    from transformers import Gemma3Config

    text = dict(TEXT, num_attention_heads=4, num_key_value_heads=2)
    return Gemma3Config(
        text_config=dict(
            model_type="gemma3_text",
            vocab_size=vocab,
            query_pre_attn_scalar=16,
            sliding_window=64,
            layer_types=["sliding_attention", "full_attention"],
            pad_token_id=tid("<pad>"),
            bos_token_id=tid("<bos>"),
            eos_token_id=tid("<eos>"),
            **text,
        ),
        vision_config=dict(
            model_type="siglip_vision_model", image_size=IMAGE_SIZE, patch_size=8, **VISION
        ),
        mm_tokens_per_image=4,
        boi_token_index=tid("<start_of_image>"),
        eoi_token_index=tid("<end_of_image>"),
        image_token_index=tid("<image_soft_token>"),
    )


def _qwen_ids(tid: Callable[[str], int]) -> dict[str, int]:
    return dict(
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
    )


def _qwen_text(tid: Callable[[str], int], vocab: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab,
        rope_parameters=dict(MROPE),
        bos_token_id=None,
        eos_token_id=tid("<|im_end|>"),
        pad_token_id=tid("<|endoftext|>"),
        **TEXT,
    )


def _qwen2_vl_config(tid: Callable[[str], int], vocab: int) -> Any:
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=_qwen_text(tid, vocab),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=TEXT["hidden_size"],
            mlp_ratio=2,
            num_heads=2,
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        **_qwen_ids(tid),
    )


def _qwen2_5_vl_config(tid: Callable[[str], int], vocab: int) -> Any:
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=_qwen_text(tid, vocab),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=TEXT["hidden_size"],
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=32,
            fullatt_block_indexes=[1],
        ),
        **_qwen_ids(tid),
    )


def _qwen3_vl_config(tid: Callable[[str], int], vocab: int) -> Any:
    from transformers import Qwen3VLConfig

    text = _qwen_text(tid, vocab)
    text["rope_parameters"] = dict(MROPE, mrope_interleaved=True)
    return Qwen3VLConfig(
        text_config=text,
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=TEXT["hidden_size"],
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=16,  # 4 x 4 patches
            deepstack_visual_indexes=[0],
        ),
        **_qwen_ids(tid),
    )


def _internvl_config(tid: Callable[[str], int], vocab: int) -> Any:
    from transformers import InternVLConfig

    return InternVLConfig(
        text_config=dict(
            model_type="qwen2",
            vocab_size=vocab,
            eos_token_id=tid("<|im_end|>"),
            pad_token_id=tid("<|endoftext|>"),
            **TEXT,
        ),
        vision_config=dict(
            image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=[8, 8], **VISION
        ),  # 16 patches -> pixel shuffle 0.5 -> 4 tokens
        image_token_id=tid("<IMG_CONTEXT>"),
        image_seq_length=4,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )


def _idefics3_like_config(cls_name: str) -> Callable[[Callable[[str], int], int], Any]:
    def build(tid: Callable[[str], int], vocab: int) -> Any:
        import transformers

        return getattr(transformers, cls_name)(
            text_config=dict(
                model_type="llama",
                vocab_size=vocab,
                bos_token_id=tid("<|im_start|>"),
                eos_token_id=tid("<end_of_utterance>"),
                pad_token_id=tid("<|endoftext|>"),
                **TEXT,
            ),
            vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, **VISION),
            image_token_id=tid("<image>"),
            scale_factor=2,  # 16 patches -> 4 tokens
            pad_token_id=tid("<|endoftext|>"),
        )

    return build


# ---- processors --------------------------------------------------------------------------


def _llava_processor(tok: Any) -> Any:
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    images = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        images,
        tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )


def _gemma3_processor(tok: Any) -> Any:
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    images = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return Gemma3Processor(images, tok, chat_template=tok.chat_template, image_seq_length=4)


def _qwen_processor(model_type: str) -> Callable[[Any], Any]:
    def build(tok: Any) -> Any:
        from transformers import Qwen2VLImageProcessorPil

        from ttrv.processors import IMAGE_ONLY_PROCESSORS

        area = IMAGE_SIZE * IMAGE_SIZE
        images = Qwen2VLImageProcessorPil(
            patch_size=8,
            merge_size=2,
            temporal_patch_size=2,
            size={"shortest_edge": area, "longest_edge": area},
        )
        cls = IMAGE_ONLY_PROCESSORS[model_type][2]
        return cls(images, tok, chat_template=tok.chat_template)

    return build


def _internvl_processor(tok: Any) -> Any:
    from transformers import GotOcr2ImageProcessorPil

    from ttrv.processors import ImageOnlyInternVLProcessor

    images = GotOcr2ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, max_patches=1, crop_to_patches=False
    )
    return ImageOnlyInternVLProcessor(
        images, tok, image_seq_length=4, chat_template=tok.chat_template
    )


def _idefics3_processor(tok: Any) -> Any:
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    images = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
    )
    return Idefics3Processor(images, tok, image_seq_len=4, chat_template=tok.chat_template)


def _smolvlm_processor(tok: Any) -> Any:
    from transformers import SmolVLMImageProcessorPil

    from ttrv.processors import ImageOnlySmolVLMProcessor

    images = SmolVLMImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
    )
    return ImageOnlySmolVLMProcessor(images, tok, image_seq_len=4, chat_template=tok.chat_template)


# What a real Qwen-family checkpoint ships next to its image processor config; the loader
# must not trip over it when torchvision (and so every video processor) is missing.
_QWEN_VIDEO = {
    "video_preprocessor_config.json": {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "patch_size": 8,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "size": {"shortest_edge": 1024, "longest_edge": 4096},
    }
}

_QWEN_ROLES = {"eos": "<|im_end|>", "pad": "<|endoftext|>"}
_QWEN_NAMED = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
}
_IDEFICS3_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<global-img>",
    "<image>",
]

_FAMILIES: dict[str, _Family] = {
    "llava": _Family(
        specials=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        roles={"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"},
        named={"image_token": "<image>"},
        template=LLAVA_TEMPLATE,
        eos=["</s>"],
        config=_llava_config,
        processor=_llava_processor,
        processor_class="LlavaProcessor",
        legacy_layout=True,
    ),
    "gemma3": _Family(
        specials=[
            "<pad>",
            "<eos>",
            "<bos>",
            "<unk>",
            "<start_of_turn>",
            "<end_of_turn>",
            "<start_of_image>",
            "<end_of_image>",
            "<image_soft_token>",
        ],
        roles={"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>"},
        named={
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
        template=GEMMA3_TEMPLATE,
        eos=["<eos>", "<end_of_turn>"],
        config=_gemma3_config,
        processor=_gemma3_processor,
        processor_class="Gemma3Processor",
    ),
    "qwen2_vl": _Family(
        specials=QWEN_SPECIALS,
        roles=_QWEN_ROLES,
        named=_QWEN_NAMED,
        template=QWEN_TEMPLATE,
        eos=["<|im_end|>", "<|endoftext|>"],
        config=_qwen2_vl_config,
        processor=_qwen_processor("qwen2_vl"),
        processor_class="Qwen2VLProcessor",
        extra_files=_QWEN_VIDEO,
    ),
    "qwen2_5_vl": _Family(
        specials=QWEN_SPECIALS,
        roles=_QWEN_ROLES,
        named=_QWEN_NAMED,
        template=QWEN_TEMPLATE,
        eos=["<|im_end|>", "<|endoftext|>"],
        config=_qwen2_5_vl_config,
        processor=_qwen_processor("qwen2_5_vl"),
        processor_class="Qwen2_5_VLProcessor",
        legacy_layout=True,
        extra_files=_QWEN_VIDEO,
    ),
    "qwen3_vl": _Family(
        specials=QWEN_SPECIALS,
        roles=_QWEN_ROLES,
        named=_QWEN_NAMED,
        template=QWEN_TEMPLATE,
        eos=["<|im_end|>", "<|endoftext|>"],
        config=_qwen3_vl_config,
        processor=_qwen_processor("qwen3_vl"),
        processor_class="Qwen3VLProcessor",
        extra_files={
            "video_preprocessor_config.json": dict(
                _QWEN_VIDEO["video_preprocessor_config.json"],
                video_processor_type="Qwen3VLVideoProcessor",
            )
        },
    ),
    "internvl": _Family(
        specials=[
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<img>",
            "</img>",
            "<IMG_CONTEXT>",
            "<video>",
        ],
        roles={"eos": "<|im_end|>", "pad": "<|endoftext|>"},
        named={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        template=INTERNVL_TEMPLATE,
        eos=["<|im_end|>"],
        config=_internvl_config,
        processor=_internvl_processor,
        processor_class="InternVLProcessor",
        extra_files={
            "video_preprocessor_config.json": {
                "video_processor_type": "InternVLVideoProcessor",
                "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            }
        },
    ),
    "idefics3": _Family(
        specials=_IDEFICS3_SPECIALS,
        roles={"bos": "<|im_start|>", "eos": "<end_of_utterance>", "pad": "<|endoftext|>"},
        named={"image_token": "<image>"},
        template=IDEFICS3_TEMPLATE,
        eos=["<end_of_utterance>"],
        config=_idefics3_like_config("Idefics3Config"),
        processor=_idefics3_processor,
        processor_class="Idefics3Processor",
    ),
    "smolvlm": _Family(
        specials=_IDEFICS3_SPECIALS,
        roles={"bos": "<|im_start|>", "eos": "<end_of_utterance>", "pad": "<|endoftext|>"},
        named={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
        template=IDEFICS3_TEMPLATE,
        eos=["<end_of_utterance>"],
        config=_idefics3_like_config("SmolVLMConfig"),
        processor=_smolvlm_processor,
        processor_class="SmolVLMProcessor",
        legacy_layout=True,
        extra_files={
            "video_preprocessor_config.json": {
                "video_processor_type": "SmolVLMVideoProcessor",
                "size": {"longest_edge": IMAGE_SIZE},
            }
        },
    ),
}


def _split_legacy_layout(folder: Path, stock: str) -> None:
    """Move the image processor out of processor_config.json into preprocessor_config.json
    (the layout of most hub checkpoints, e.g. Qwen2.5-VL and SmolVLM)."""
    path = folder / "processor_config.json"
    data = json.loads(path.read_text())
    image = dict(data.pop("image_processor"), processor_class=stock)
    (folder / "preprocessor_config.json").write_text(json.dumps(image, indent=2) + "\n")
    if set(data) <= {"processor_class"}:
        path.unlink()
    else:
        path.write_text(json.dumps(data, indent=2) + "\n")


def build_tiny_model(family: str, folder: Path) -> Path:
    """Build the tiny `family` model and save model + processor + tokenizer to `folder`.

    Returns `folder`. Deterministic: the same family always gives the same weights and
    tokenizer. Raises ValueError for a family not in `FAMILIES`.
    """
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    if family not in _FAMILIES:
        raise ValueError(f"Unknown tiny family {family!r}; choose from {', '.join(FAMILIES)}.")
    fam = _FAMILIES[family]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    tok = _tokenizer(fam)
    tid = tok.convert_tokens_to_ids
    config = fam.config(tid, len(tok))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    eos = [tid(t) for t in fam.eos]
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=eos if len(eos) > 1 else eos[0],
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(folder)
    fam.processor(tok).save_pretrained(folder)
    if fam.legacy_layout:
        _split_legacy_layout(folder, fam.processor_class)
    for name, content in fam.extra_files.items():
        (folder / name).write_text(
            json.dumps(dict(content, processor_class=fam.processor_class), indent=2) + "\n"
        )
    return folder
