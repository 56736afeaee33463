"""Config validation and the CLI flags derived from it."""

import dataclasses
import subprocess
import sys
import time

import pytest

from ttrv.cli import build_parser, config_from_args, flag_name
from ttrv.config import SECTIONS, AdaptConfig, ConfigError, OptimConfig, RolloutConfig, TaskConfig


@pytest.mark.parametrize(
    ("cls", "kwargs", "needle"),
    [
        (RolloutConfig, {"n_rollouts": 1, "n_train": 1}, "N must be >= 2"),
        (RolloutConfig, {"n_rollouts": 4, "n_train": 5}, r"K \(n_train=5\)"),
        (RolloutConfig, {"temperature": 0.0}, "temperature must be > 0"),
        (OptimConfig, {"learning_rate": -1e-3}, "learning_rate must be > 0"),
        (TaskConfig, {"question": "  "}, "question is empty"),
        (TaskConfig, {"kind": "classes", "options": "cat"}, "at least 2 options"),
        (TaskConfig, {"kind": "classes", "options": "cat,Cat"}, "duplicates"),
    ],
)
def test_invalid_values_name_the_fix(cls, kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        cls(**kwargs)


def test_every_field_has_a_flag_and_help():
    """Guards against a config field that the CLI (and so the UI) silently lacks."""
    parser = build_parser()
    adapt = parser._subparsers._group_actions[0].choices["adapt"]
    dests = {a.dest for a in adapt._actions}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"{section}.{f.name}" in dests
            assert f.metadata.get("help")


def test_flags_override_and_roundtrip():
    args = build_parser().parse_args(
        ["adapt", "--n-rollouts", "8", "--n-train", "4", "--lora-alpha", "4", "--no-guard"]
    )
    cfg = config_from_args(args)
    assert cfg.rollout.n_rollouts == 8 and cfg.rollout.n_train == 4
    assert cfg.lora.alpha == 4 and cfg.guard.guard is False
    assert AdaptConfig.from_dict(cfg.to_dict()) == cfg
    assert flag_name("reward", "alpha") == "reward-alpha"


def test_cli_rejects_bad_hyperparameters_cleanly():
    proc = subprocess.run(
        [sys.executable, "-m", "ttrv", "adapt", "--n-rollouts", "4", "--n-train", "9"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "K (n_train=9)" in proc.stderr and "Traceback" not in proc.stderr


def test_help_is_fast():
    """--help must not import torch/transformers (seconds of start-up)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, ttrv.cli; ttrv.cli.build_parser(); "
         "print('torch' in sys.modules)"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.stdout.strip() == "False"
    assert time.perf_counter() - t0 < 5
