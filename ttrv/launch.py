"""The `accelerate launch` command that runs `python -m ttrv ...` data parallel.

Used by the CLI (a run whose config asks for several processes starts itself again under
the launcher) and by the app's worker (which starts the run as a child and waits for it),
so both start the same processes the README documents. Nothing here forms process groups
or talks between processes: that is accelerate's (`ttrv.distributed`).
"""

from __future__ import annotations

import os
import socket
import sys

from .config import ModelConfig

# Set by the app's worker to its own pid: the run stops after its current step once that
# process is gone (an app killed, or closed without shutting down, leaves no run behind).
WATCH_PID_ENV = "TTRV_WATCH_PID"


def watched_process_gone() -> bool:
    """True once the process named by WATCH_PID_ENV has ended (False when none is named)."""
    pid = os.environ.get(WATCH_PID_ENV, "")
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, not ours to signal
        return False
    return False


def free_port() -> int:
    """A TCP port nothing listens on now, for the process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def visible_devices(gpus: list[int], visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for the launched processes: the listed indices of this
    process's view, mapped through its own CUDA_VISIBLE_DEVICES (ids or UUIDs) when set."""
    if visible is None or not visible.strip():
        return ",".join(map(str, gpus))
    seen = [v.strip() for v in visible.split(",") if v.strip()]
    return ",".join(seen[g] for g in gpus)


def on_cpu(cfg: ModelConfig, cuda_available: bool) -> bool:
    """Whether the processes run on the CPU: device cpu, or auto on a machine without
    CUDA (listed GPUs never run on the CPU)."""
    if cfg.gpu_list():
        return False
    return cfg.device == "cpu" or (cfg.device == "auto" and not cuda_available)


def launch_command(
    cfg: ModelConfig,
    args: list[str],
    *,
    cuda_available: bool,
    port: int | None = None,
    cpu_count: int | None = None,
) -> tuple[list[str], dict[str, str]]:
    """(argv, environment additions) that start `python -m ttrv <args>` in
    `cfg.data_parallel()` processes on one machine: one per listed GPU (only those
    visible, so each sees its own as cuda:<local rank>), or CPU processes joined through gloo
    (`ACCELERATE_USE_CPU=1`, each given its share of the cores)."""
    n = cfg.data_parallel()
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(n), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(port or free_port())]  # fmt: skip
    env: dict[str, str] = {}
    gpus = cfg.gpu_list()
    if gpus:
        # The indices are this process's view of the GPUs. accelerate's --gpu_ids would
        # write them into CUDA_VISIBLE_DEVICES as they are, i.e. as physical ids: under a
        # CUDA_VISIBLE_DEVICES=2,3 (a scheduler's share) "0,1" would land on GPUs 0 and 1.
        env["CUDA_VISIBLE_DEVICES"] = visible_devices(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    elif on_cpu(cfg, cuda_available):
        env["ACCELERATE_USE_CPU"] = "1"
        # P processes that each used every core would fight over them.
        cores = cpu_count or os.cpu_count() or 1
        env["OMP_NUM_THREADS"] = str(max(1, cores // n))
    return [*argv, "-m", "ttrv", *args], env
