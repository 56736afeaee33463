"""A bad image never sinks a run: the model's own processor screens every image, encoding
isolates each image, and the CLI says what it skipped and why, by file name."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ttrv import images as images_mod
from ttrv.adapt import make_policy
from ttrv.cli import main
from ttrv.config import ModelConfig, RolloutConfig, TaskConfig
from ttrv.images import load_items
from ttrv.loading import load_model
from ttrv.rollout import greedy_answers, rollout_groups
from ttrv.screening import ImageEncodeError, screen_items

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
TASK = TaskConfig()
ROLLOUT = RolloutConfig(n_rollouts=4, n_train=2, max_new_tokens=3)
REPO = Path(__file__).resolve().parent.parent


def image_folder(root: Path, n_good: int = 3) -> Path:
    """`n_good` noise images plus thin.png, 4000 x 3 (1024 x 1 once shrunk)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_good):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"g{i}.png")
    Image.new("RGB", (4000, 3), (200, 10, 10)).save(root / "thin.png")
    return root


@pytest.fixture
def strips_pass_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let strips through `load_image`, as before its aspect check: stands for an image only
    the model's processor refuses (other processors have other limits)."""
    lenient = functools.partial(images_mod.load_image, max_aspect=None)
    monkeypatch.setattr(images_mod, "load_image", lenient)


def folder_items(root: Path) -> list:
    items, _ = load_items([image_folder(root)])
    assert [it.name for it in items] == ["g0.png", "g1.png", "g2.png", "thin.png"]
    return items


@pytest.mark.usefixtures("strips_pass_loading")
@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_processor_screening_rejects_the_strip_by_name(tiny_model_dir, tmp_path, family):
    items = folder_items(tmp_path / "imgs")
    loaded = load_model(ModelConfig(model=str(tiny_model_dir(family))))
    kept, rejected = screen_items(loaded.processor, items, TASK)
    assert [it.name for it in kept] == ["g0.png", "g1.png", "g2.png"]
    assert len(rejected) == 1
    (r,) = rejected
    assert r.image_id == items[3].image_id
    assert r.name == str(tmp_path / "imgs" / "thin.png")
    assert "aspect ratio must be smaller than 200" in r.reason
    assert r.message.startswith(f"{r.name}: the model's processor refuses this image (")


@pytest.mark.usefixtures("strips_pass_loading")
def test_screening_follows_the_processor_not_a_fixed_rule(tiny_model_dir, tmp_path):
    """LLaVA's processor squashes any image to a square: the strip is not its problem."""
    items = folder_items(tmp_path / "imgs")
    loaded = load_model(ModelConfig(model=str(tiny_model_dir("llava"))))
    kept, rejected = screen_items(loaded.processor, items, TASK)
    assert len(kept) == 4 and rejected == []


@pytest.mark.usefixtures("strips_pass_loading")
def test_policy_screening_encodes_as_rollouts_and_caches_the_features(tiny_model_dir, tmp_path):
    items = folder_items(tmp_path / "imgs")
    policy = make_policy(load_model(ModelConfig(model=str(tiny_model_dir("qwen2_vl")))))
    kept, rejected = screen_items(policy, items, TASK)
    assert [it.name for it in kept] == ["g0.png", "g1.png", "g2.png"]
    assert [Path(r.name).name for r in rejected] == ["thin.png"]
    assert policy.cache.misses == 3  # the vision tower ran once per kept image ...
    answers = greedy_answers(policy, kept, TASK, ROLLOUT)
    assert len(answers) == 3
    assert policy.cache.misses == 3 and policy.cache.hits >= 3  # ... and the run reuses it


@pytest.mark.usefixtures("strips_pass_loading")
def test_a_refused_image_does_not_take_down_its_batch(tiny_model_dir, tmp_path):
    good0, good1, good2, thin = folder_items(tmp_path / "imgs")
    policy = make_policy(load_model(ModelConfig(model=str(tiny_model_dir("qwen2_vl")))))
    with pytest.raises(ImageEncodeError, match=r"thin\.png: the model's processor refuses") as e:
        rollout_groups(policy, [good0, thin, good1], TASK, ROLLOUT, [[None]] * 3)
    assert e.value.image_ids == {thin.image_id}
    assert policy.cache.misses == 2  # the images after the bad one were encoded too
    with pytest.raises(ImageEncodeError, match=r"thin\.png") as e:
        greedy_answers(policy, [good2, thin], TASK, ROLLOUT)
    assert e.value.image_ids == {thin.image_id}
    # the caller drops what was named and goes on with the rest
    groups = rollout_groups(policy, [good0, good1], TASK, ROLLOUT, [[None]] * 2)
    assert [g.item.name for g in groups] == ["g0.png", "g1.png"]
    assert all(len(g.answers) == ROLLOUT.n_rollouts for g in groups)


def _poison(policy, item) -> None:
    """NaN image features: sampling from NaN logits fails for every row of a batch."""
    features, _ = policy.cache._cache[item.image_id]
    for output in features.values():
        for value in output.values():
            for t in value if isinstance(value, tuple | list) else [value]:
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    t.fill_(float("nan"))


def _count_generate(policy) -> list[int]:
    calls: list[int] = []
    generate = policy.model.generate

    def counted(*args, **kwargs):
        calls.append(int(kwargs["input_ids"].shape[0]))
        return generate(*args, **kwargs)

    policy.model.generate = counted
    return calls


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])  # full-sequence, shared-prefix
def test_batched_generate_failure_falls_back_image_by_image(tiny_model_dir, tmp_path, family):
    items, _ = load_items([image_folder(tmp_path / "imgs")])
    good0, bad, good1 = items[:3]
    policy = make_policy(load_model(ModelConfig(model=str(tiny_model_dir(family)))))
    calls = _count_generate(policy)
    rollout_groups(policy, [good0, bad, good1], TASK, ROLLOUT, [[None]] * 3)
    assert len(calls) == 1  # good images: the batched fast path, one generate call
    _poison(policy, bad)
    calls.clear()
    with pytest.raises(ImageEncodeError) as e:
        rollout_groups(policy, [good0, bad, good1], TASK, ROLLOUT, [[None]] * 3)
    assert e.value.image_ids == {bad.image_id}
    assert "g1.png: the model fails on this image in a batch and alone" in str(e.value)
    assert len(calls) == 4  # the batch, then each image alone: the others still sampled
    groups = rollout_groups(policy, [good0, good1], TASK, ROLLOUT, [[None]] * 2)
    assert len(groups) == 2


def test_a_failure_of_every_image_is_not_blamed_on_images(tiny_model_dir, tmp_path):
    items, _ = load_items([image_folder(tmp_path / "imgs")])
    policy = make_policy(load_model(ModelConfig(model=str(tiny_model_dir("qwen2_vl")))))
    rollout_groups(policy, items[:2], TASK, ROLLOUT, [[None]] * 2)
    for item in items[:2]:
        _poison(policy, item)
    with pytest.raises(RuntimeError, match="probability tensor") as e:
        rollout_groups(policy, items[:2], TASK, ROLLOUT, [[None]] * 2)
    assert not isinstance(e.value, ImageEncodeError)


@pytest.mark.usefixtures("strips_pass_loading")
def test_answer_skips_what_the_processor_refuses_and_answers_the_rest(
    tiny_model_dir, tmp_path, capsys
):
    folder = image_folder(tmp_path / "imgs")
    model = str(tiny_model_dir("qwen2_vl"))
    rc = main(["answer", str(folder), "--model", model, "--json", "--max-new-tokens", "2"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert [json.loads(line)["name"] for line in out.splitlines()] == ["g0.png", "g1.png", "g2.png"]
    assert f"warning: {folder / 'thin.png'}: the model's processor refuses this image" in err
    assert "aspect ratio must be smaller than 200" in err


def test_answer_on_only_rejected_files_says_so_before_importing_torch(tmp_path):
    """Also: Pillow's DecompressionBombWarning never reaches stderr before our message."""
    thin = tmp_path / "thin.png"
    Image.new("RGB", (4000, 3)).save(thin)
    bomb = tmp_path / "bomb.png"
    Image.new("L", (160, 160)).save(bomb)  # over a 20,000-pixel limit: Pillow warns
    script = (
        "import sys, PIL.Image\n"
        "PIL.Image.MAX_IMAGE_PIXELS = 20_000\n"
        "from ttrv.cli import main\n"
        f"rc = main(['answer', {str(thin)!r}, {str(bomb)!r}])\n"
        "print(rc, 'torch' in sys.modules)\n"
    )
    run = subprocess.run(
        [sys.executable, "-W", "default", "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.stdout.split() == ["1", "False"], run.stderr
    assert run.stderr.startswith("error: no usable images"), run.stderr
    assert f"{thin}: 4000 x 3 pixels is too elongated" in run.stderr
    assert f"{bomb}: 160 x 160 pixels is over the 20,000-pixel limit" in run.stderr
    assert "Warning" not in run.stderr
