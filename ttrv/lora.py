"""LoRA on the language model of a VLM: attach, save / load (safetensors), in-memory state.

Vision towers (CLIP, SigLIP, InternViT, Qwen's ViT) also have `q_proj`, `v_proj`,
`down_proj`...; a bare list of names would adapt them too. `lora_target_regex` restricts
the targets to modules under `language_model` (LLaVA, Gemma3, Qwen*-VL, InternVL) or
`text_model` (Idefics3, SmolVLM).
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .config import LoraConfig
from .loading import LANGUAGE_MODULES

ADAPTER_FILE = "adapter_model.safetensors"


def lora_target_regex(cfg: LoraConfig) -> str:
    r"""A regex (peft full-match on module names) for `cfg.targets` inside the language model.

    >>> print(lora_target_regex(LoraConfig(targets="q_proj,v_proj")))
    (.*\.)?(language_model|text_model)\..*\.(q_proj|v_proj)
    """
    names = "|".join(re.escape(t) for t in cfg.target_list())
    scopes = "|".join(LANGUAGE_MODULES)
    return rf"(.*\.)?({scopes})\..*\.({names})"


def lora_target_modules(model: Any, cfg: LoraConfig) -> list[str]:
    """Names of the modules `lora_target_regex(cfg)` selects in `model`."""
    pattern = re.compile(lora_target_regex(cfg))
    return [name for name, _ in model.named_modules() if pattern.fullmatch(name)]


@contextmanager
def quiet_peft() -> Any:
    """Hide the FutureWarning peft triggers by reading transformers'
    deprecated `is_gradient_checkpointing` (peft 0.21 / transformers 5)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        yield


def _fork_rng() -> Any:
    """Context that restores the CPU (and current CUDA) RNG state on exit."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


def attach_lora(model: Any, cfg: LoraConfig, seed: int) -> Any:
    """Wrap `model` in a PeftModel with LoRA on the language-model projections.

    The LoRA init is seeded by `seed` without touching the global RNG; every non-LoRA
    weight is frozen. Raises ValueError when no target exists in the language model.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if not lora_target_modules(model, cfg):
        found = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, mod in model.named_modules()
                if _is_lm_linear(name, mod)
            }
        )
        raise ValueError(
            f"No LoRA target {cfg.target_list()} in the language model; its projections are "
            f"{found}. Set the LoRA targets to some of these."
        )
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=lora_target_regex(cfg),
        bias="none",
    )
    with _fork_rng(), quiet_peft():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, peft_cfg)
    for name, param in peft_model.named_parameters():
        param.requires_grad_("lora_" in name)
    return peft_model


def _is_lm_linear(name: str, module: Any) -> bool:
    scope = any(f"{s}." in name for s in LANGUAGE_MODULES)
    return scope and isinstance(module, torch.nn.Linear)


def lora_parameters(model: Any) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters (lora_A / lora_B weights) of a PeftModel."""
    return [p for name, p in model.named_parameters() if "lora_" in name and p.requires_grad]


def save_adapter(model: Any, folder: str | Path) -> Path:
    """Save the adapter (safetensors only) to `folder`; returns the adapter file's path."""
    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    path = folder / ADAPTER_FILE
    if not path.is_file():
        raise RuntimeError(
            f"peft did not write {path}; found {sorted(p.name for p in folder.iterdir())}."
        )
    return path


def load_adapter(base_model: Any, folder: str | Path, trainable: bool = False) -> Any:
    """Attach the adapter saved in `folder` to `base_model` (a fresh, un-wrapped model)."""
    from peft import PeftModel

    folder = Path(folder)
    if not (folder / ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"No {ADAPTER_FILE} in {folder}: not a saved adapter.")
    with quiet_peft():
        model = PeftModel.from_pretrained(base_model, str(folder), is_trainable=trainable)
    if not trainable:
        model.eval()
    return model


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """A detached copy of every LoRA weight, keyed by parameter name (for rollback)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def load_adapter_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (from `adapter_state`) back into the model's LoRA weights, in place."""
    params = {name: p for name, p in model.named_parameters() if "lora_" in name}
    missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
    if missing or unexpected:
        raise KeyError(
            f"Adapter state does not match the model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}."
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])
