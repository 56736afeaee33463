"""Checks Start runs before it queues anything: is the model there, can it take images,
and does the task fit it. Read-only (files and the hub cache), no weights loaded, so a
wrong model is a message at once instead of a failed session a second later.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ttrv.config import ModelConfig
from ttrv.digits import task_notes
from ttrv.model_check import check_folder

from .model_card import cached_snapshot

# huggingface_hub's repo id rule: [namespace/]name, letters, digits, "-", "_", ".".
HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


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


def check_devices(cfg: ModelConfig, gpus_here: int | None = None) -> str:
    """Raise ValueError when the config names GPUs this machine lacks (`gpus_here`: how
    many it has; default: ask torch); else a few words on where the run goes ("" for the
    default, one device)."""
    from ttrv.placement import check_gpus

    if gpus_here is None:
        import torch

        gpus_here = torch.cuda.device_count()
    check_gpus(cfg, gpus_here)  # a PlacementError is a ValueError, shown as it is
    gpus, n = cfg.gpu_list(), cfg.data_parallel()
    if len(gpus) > 1 and cfg.placement == "split":
        return f"one copy split over GPUs {', '.join(map(str, gpus))}"
    if gpus and n > 1:
        return f"{n} processes, one per GPU ({', '.join(map(str, gpus))})"
    if gpus:
        return f"GPU {gpus[0]}"
    if n > 1:
        where = "CPU" if cfg.device == "cpu" or not gpus_here else f"first {n} GPUs"
        return f"{n} data-parallel processes on the {where}"
    return ""


__all__ = ["check_devices", "check_model", "hub_offline", "task_notes"]
