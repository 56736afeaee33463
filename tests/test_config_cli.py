"""Config validation and the CLI flags derived from it."""

import dataclasses
import subprocess
import sys
import time

import pytest

from ttrv.cli import build_parser, config_from_args, flag_name
from ttrv.config import (
    SECTIONS,
    AdaptConfig,
    ConfigError,
    GuardConfig,
    LoraConfig,
    OptimConfig,
    RewardConfig,
    RolloutConfig,
    TaskConfig,
)


@pytest.mark.parametrize(
    ("cls", "kwargs", "needle"),
    [
        (
            RolloutConfig,
            {"n_rollouts": 1, "n_train": 1},
            "n_rollouts must be >= 2 .*N answers vote",
        ),
        (RolloutConfig, {"n_rollouts": 4, "n_train": 5}, r"K \(n_train=5\)"),
        (
            RolloutConfig,
            {"temperature": 0.0},
            "temperature must be > 0 .*every rollout is the same",
        ),
        (OptimConfig, {"learning_rate": -1e-3}, "learning_rate must be > 0"),
        (OptimConfig, {"learning_rate": 0.0}, "learning_rate must be > 0 .*nothing learns at 0"),
        (OptimConfig, {"learning_rate": 1.0}, "learning_rate must be < 1"),
        (LoraConfig, {"dropout": 0.95}, r"lora\.dropout must be <= 0\.9 \(got 0\.95\)"),
        (RolloutConfig, {"max_new_tokens": 5000}, "max_new_tokens must be <= 4096"),
        (OptimConfig, {"images_per_step": 2.5}, "images_per_step must be a whole number"),
        (OptimConfig, {"rounds": True}, "rounds must be a number"),
        (OptimConfig, {"beta": float("nan")}, "beta must be a finite number"),
        (RewardConfig, {"reward": "nope"}, "reward must be one of ttrv, ttrv_paper"),
        (GuardConfig, {"guard": "no"}, "guard must be true or false"),
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


def test_whole_numbers_are_kept_and_widened_not_rounded():
    """JSON and a browser's number input give 8.0 for an int field: that is 8, but 2.5 is
    refused (the UI once rounded it to 2). Ints given to float fields become floats."""
    assert OptimConfig(images_per_step=8.0).images_per_step == 8
    assert type(OptimConfig(images_per_step=8.0).images_per_step) is int
    assert type(LoraConfig(alpha=4).alpha) is float
    with pytest.raises(ConfigError, match=r"whole number \(got 2\.5\)"):
        AdaptConfig.from_dict({"optim": {"images_per_step": 2.5}})


def test_answer_command_takes_the_declared_answer_length():
    """`answer --max-new-tokens` is the RolloutConfig field (it was a flag of its own with
    default 16 and no bound): same default, same bound, same message."""
    parser = build_parser()
    args = parser.parse_args(["answer"])
    assert config_from_args(args).rollout.max_new_tokens == RolloutConfig().max_new_tokens
    args = parser.parse_args(["answer", "--max-new-tokens", "5"])
    assert config_from_args(args).rollout.max_new_tokens == 5
    for bad, needle in (("5000", "must be <= 4096"), ("2.5", "whole number")):
        args = parser.parse_args(["answer", "--max-new-tokens", bad])
        with pytest.raises(ConfigError, match=needle):
            config_from_args(args)
