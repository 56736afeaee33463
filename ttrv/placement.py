"""Where a model sits: the devices of this machine, the device of one process, and a model
split over several GPUs.

Three ways to run (`ModelConfig`):

- one device (the default): the whole model on the CPU or one GPU (`gpus` empty or one);
- replicate (`gpus` lists several, `placement="replicate"`, or `processes` > 1 on the CPU):
  one process per device, each with a whole copy, started by `accelerate launch`
  (`ttrv.launch`); inside such a process the launcher has already chosen the GPU, so the
  process uses its current device;
- split (`placement="split"`): one process, one copy spread over the listed GPUs. The
  plan is accelerate's (`get_balanced_memory` + `infer_auto_device_map`, as transformers'
  `device_map="auto"` computes it) restricted to those GPUs and their budgets; it is
  computed on the meta device before any weight is read, so a model that does not fit is
  refused with its size instead of spilling to disk, and the same plan can be checked on
  a machine without GPUs.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from .config import ModelConfig
from .distributed import launched

GIB = 2**30
# Share of a GPU's free memory a split may fill with weights; the rest is for activations,
# the KV cache of the rollouts and the LoRA optimiser state.
FREE_SHARE = 0.8


class PlacementError(ValueError):
    """The devices a config names are not on this machine, or the model does not fit."""


def gpu_table() -> list[dict[str, Any]]:
    """This machine's CUDA GPUs as this process sees them: index, name and memory (GiB);
    [] without any. Read from the device properties: asking for free memory would open a
    CUDA context (~0.5 GiB) on every GPU for the life of the app, GPUs its runs need."""
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": props.name, "total_gib": props.total_memory / GIB})
    return out


def check_gpus(cfg: ModelConfig, available: int | None = None) -> None:
    """Refuse GPUs this machine does not have (`available`: how many it has; default: ask
    torch), with a message that says which it has; and device cuda on a machine without
    one. Checked before anything is loaded or launched."""
    count = torch.cuda.device_count() if available is None else available
    if cfg.device == "cuda" and count == 0:
        raise PlacementError(
            "model.device is cuda but this machine has no CUDA GPU: set device to cpu or auto."
        )
    gpus = cfg.gpu_list()
    on_gpus = cfg.device != "cpu" and count > 0
    if not gpus and on_gpus and cfg.processes > count:
        raise PlacementError(
            f"model.processes is {cfg.processes} but this machine has {count} GPU(s), one per "
            "process: lower processes, or set device to cpu for CPU processes."
        )
    if not gpus:
        return
    if count == 0:
        raise PlacementError(
            f"model.gpus lists {cfg.gpus}, but this machine has no CUDA GPU: clear gpus to "
            "run on the CPU."
        )
    missing = [g for g in gpus if g >= count]
    if missing:
        have = ", ".join(str(i) for i in range(count))
        raise PlacementError(
            f"GPU {', '.join(map(str, missing))} is not on this machine; it has {count} ({have})."
        )


def process_device(cfg: ModelConfig) -> torch.device:
    """The device this process loads the model onto (for a split model: where its inputs
    go, the first listed GPU)."""
    gpus = cfg.gpu_list()
    if gpus and launched():
        # `ttrv.launch` made only the listed GPUs visible, and accelerate set this
        # process's own: cuda:<local rank>, its current device.
        return torch.device("cuda", torch.cuda.current_device())
    check_gpus(cfg)  # listed GPUs this machine lacks, device cuda without CUDA
    if gpus:
        return torch.device("cuda", gpus[0])
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def is_split(cfg: ModelConfig) -> bool:
    """One model over several GPUs in this process (not inside a data-parallel launch)."""
    return cfg.placement == "split" and len(cfg.gpu_list()) > 1 and not launched()


def gpu_budgets(cfg: ModelConfig, free_gib: dict[int, float] | None = None) -> dict[int, int]:
    """Bytes of weights each listed GPU may take: `max_memory_gib`, else `FREE_SHARE` of
    what it has free now (`free_gib` given for planning without the GPUs)."""
    gpus = cfg.gpu_list()
    if cfg.max_memory_gib > 0:
        return {g: int(cfg.max_memory_gib * GIB) for g in gpus}
    if free_gib is None:
        free_gib = {g: torch.cuda.mem_get_info(g)[0] / GIB for g in gpus}
    return {g: int(free_gib[g] * FREE_SHARE * GIB) for g in gpus}


def quantized_weights(model: Any, quantization: str, skip: list[str]) -> dict[str, Any]:
    """{parameter name: its size class} for the weights bitsandbytes quantises: the
    `nn.Linear` weights outside the `skip` modules (vision tower, projector, lm_head:
    `ttrv.loading.non_language_modules`). Embeddings, norms, biases and skipped modules
    keep the load dtype."""
    from accelerate.utils import CustomDtype

    if quantization == "none":
        return {}
    kind = CustomDtype.INT4 if quantization == "4bit" else torch.int8
    skipped = tuple(f"{m}." for m in skip)
    return {
        f"{name}.weight": kind
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not f"{name}.".startswith(skipped)
    }


def split_plan(
    config: Any,
    quantization: str,
    dtype: torch.dtype,
    budgets: dict[int, int],
    skip: list[str] | None = None,
) -> dict[str, int]:
    """The device of every top-level block of the model built from `config` over the
    GPUs of `budgets` ({index: bytes of weights}), balanced as `device_map="auto"`
    balances, tied weights (embeddings and lm_head) kept together.

    Each weight is counted at the size it will have: quantised linear weights of the
    language model (`quantized_weights`, not in `skip`) at one byte (8-bit) or half a
    byte (4-bit), everything else at `dtype`. Raises PlacementError when the model does
    not fit.
    """
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes, get_balanced_memory, infer_auto_device_map
    from transformers import AutoModelForImageTextToText

    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.tie_weights()  # as loading ties them: one matrix, planned on one device
    special = quantized_weights(model, quantization, skip or [])
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    sizing = {"no_split_module_classes": no_split, "dtype": dtype, "special_dtypes": special}
    balanced = get_balanced_memory(model, max_memory=dict(budgets), **sizing)
    plan = infer_auto_device_map(model, max_memory=balanced, **sizing)
    if any(not isinstance(d, int) for d in plan.values()):
        need = compute_module_sizes(model, dtype=dtype, special_dtypes=special)[""]
        have = sum(budgets.values())
        gpus = ", ".join(map(str, budgets))
        if need > have:
            raise PlacementError(
                f"The model needs about {need / GIB:.1f} GiB of weights and GPUs {gpus} may "
                f"hold {have / GIB:.1f} GiB of it: add GPUs, raise model.max_memory_gib, or "
                "load in 4-bit."
            )
        raise PlacementError(
            f"The model's {need / GIB:.1f} GiB of weights do not divide into GPUs {gpus} at "
            f"{have / GIB:.1f} GiB in all: its blocks (whole layers, a vision tower) are too "
            "large for the room each GPU has left. Raise model.max_memory_gib or add GPUs."
        )
    return {name: int(device) for name, device in plan.items()}


_NUMBERED = re.compile(r"^(.*\.)(\d+)$")


def _ranges(names: list[str]) -> list[str]:
    """Consecutive numbered blocks written as one range: "layers.0" .. "layers.17" ->
    "layers.0-17"; other names as they are, in order."""
    out: list[str] = []
    run: tuple[str, int, int] | None = None  # prefix, first, last
    for name in [*names, ""]:
        m = _NUMBERED.match(name)
        if m and run and m.group(1) == run[0] and int(m.group(2)) == run[2] + 1:
            run = (run[0], run[1], int(m.group(2)))
            continue
        if run:
            out.append(f"{run[0]}{run[1]}" + (f"-{run[2]}" if run[2] != run[1] else ""))
            run = None
        if m:
            run = (m.group(1), int(m.group(2)), int(m.group(2)))
        elif name:
            out.append(name)
    return out


def placement_summary(model: Any) -> list[dict[str, Any]]:
    """Where the model sits: one entry per device, {"device", "parts", "mib"} with the
    blocks it holds (numbered layers as ranges) and the MiB of their weights and buffers,
    in device order. A model on one device is one entry, "parts": ["whole model"]."""
    sizes: dict[str, float] = {}
    where: dict[str, list[str]] = {}
    device_map = getattr(model, "hf_device_map", None) or {}
    for t in [*model.parameters(), *model.buffers()]:
        device = str(t.device)
        sizes[device] = sizes.get(device, 0.0) + t.numel() * t.element_size() / 2**20
    if len(sizes) <= 1 or not device_map:
        return [{"device": d, "parts": ["whole model"], "mib": round(m, 1)}
                for d, m in sizes.items()]  # fmt: skip
    for name, device in device_map.items():
        key = f"cuda:{device}" if isinstance(device, int) else str(device)
        where.setdefault(key, []).append(name or "whole model")
    order = sorted(sizes, key=lambda d: (d.split(":")[0], int(d.split(":")[1]) if ":" in d else 0))
    return [{"device": d, "parts": _ranges(where.get(d, [])), "mib": round(sizes[d], 1)}
            for d in order]  # fmt: skip


def input_device(model: Any, fallback: torch.device) -> torch.device:
    """Where a split model takes its inputs: the device of its input embeddings."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return fallback
