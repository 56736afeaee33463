"""The bundled demo models (models/ttrv-digits-llava*) and demo images load and behave as
their model cards say, through the public Auto* path, offline."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from ttrv.config import BUNDLED_MODEL, TaskConfig  # noqa: E402
from ttrv.tasks import LETTERS, Item, build_prompt, render_prompt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASE = Path(BUNDLED_MODEL)
OFFFORMAT = ROOT / "models" / "ttrv-digits-llava-offformat"
DEMO = ROOT / "demo" / "digits"
MC_TASK = TaskConfig(kind="multiple_choice", question="Which digit is shown?")
VALID = set(LETTERS[:4])  # a set: "" in "ABCD" would be True


def demo_rows() -> list[dict[str, str]]:
    with open(DEMO / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def load(folder: Path):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(min(2, torch.get_num_threads()))
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    return model, processor


@pytest.fixture(scope="module")
def base():
    return load(BASE)


@pytest.fixture(scope="module")
def offformat():
    return load(OFFFORMAT)


def generate(model, processor, texts, images, **kwargs) -> list[str]:
    import torch

    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, **kwargs)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [s.strip() for s in processor.batch_decode(new, skip_special_tokens=True)]


def mc_items(rows, seed=0):
    from ttrv.digits import mc_options

    rng = random.Random(seed)
    items = []
    for r in rows:
        image = Image.open(DEMO / r["file"]).convert("RGB")
        items.append(
            Item(
                image_id=r["file"],
                name=r["file"],
                image=image,
                label=r["label"],
                options=mc_options(r["label"], rng),
            )
        )
    return items


@pytest.mark.parametrize("folder", [BASE, OFFFORMAT], ids=["base", "offformat"])
def test_folder_is_small_safetensors_with_card(folder):
    files = {p.name: p for p in folder.rglob("*") if p.is_file()}
    assert "model.safetensors" in files
    assert not [n for n in files if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert sum(p.stat().st_size for p in files.values()) < 10 * 1024 * 1024
    card = files["README.md"].read_text()
    assert "797" in card and "scripts/make_demo_model.py" in card


def test_demo_images_and_labels():
    rows = demo_rows()
    assert len(rows) >= 20
    assert {r["label"] for r in rows} == {str(d) for d in range(10)}
    for r in rows:
        assert r["file"].startswith("test-")  # test split only, never trained on
        assert Image.open(DEMO / r["file"]).size == (128, 128)


def test_processor_maps_demo_png_to_training_pixels(base):
    import torch

    model, processor = base
    png = Image.open(DEMO / demo_rows()[0]["file"]).convert("RGB")
    small = png.resize((32, 32), Image.Resampling.NEAREST)  # the 32x32 training image
    a = processor.image_processor(png, return_tensors="pt")["pixel_values"]
    b = processor.image_processor(small, return_tensors="pt")["pixel_values"]
    assert a.shape == (1, 3, 32, 32)
    assert torch.allclose(a, b)
    text = render_prompt(processor, build_prompt(TaskConfig(), Item("x", "x", png)))
    ids = processor(text=[text], images=[png], return_tensors="pt")["input_ids"]
    assert int((ids == model.config.image_token_id).sum()) == 16


def test_generation_config(base):
    model, processor = base
    tok = processor.tokenizer
    gc = model.generation_config
    assert gc.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|end|>")
    assert gc.pad_token_id == tok.pad_token_id
    assert model.config.image_token_id in gc.suppress_tokens


def test_base_answers_default_open_question(base):
    model, processor = base
    rows = demo_rows()
    images = [Image.open(DEMO / r["file"]).convert("RGB") for r in rows]
    text = render_prompt(processor, build_prompt(TaskConfig(), Item("x", "x", images[0])))
    answers = generate(model, processor, [text] * len(rows), images, do_sample=False)
    correct = sum(a == r["label"] for a, r in zip(answers, rows, strict=True))
    assert correct >= 0.7 * len(rows), [(a, r["label"]) for a, r in zip(answers, rows, strict=True)]


def test_base_answers_multiple_choice_with_letters(base):
    model, processor = base
    items = mc_items(demo_rows())
    texts = [render_prompt(processor, build_prompt(MC_TASK, it)) for it in items]
    answers = generate(model, processor, texts, [it.image for it in items], do_sample=False)
    assert all(a in VALID for a in answers), answers
    gold = [LETTERS[it.options.index(it.label)] for it in items]
    assert sum(a == g for a, g in zip(answers, gold, strict=True)) > 0.25 * len(items)


def test_offformat_greedy_is_empty_but_samples_carry_letters(offformat):
    import torch

    model, processor = offformat
    items = mc_items(demo_rows()[:12])
    texts = [render_prompt(processor, build_prompt(MC_TASK, it)) for it in items]
    images = [it.image for it in items]
    greedy = generate(model, processor, texts, images, do_sample=False)
    invalid = sum(a not in VALID for a in greedy)
    assert invalid >= 0.6 * len(items), greedy

    torch.manual_seed(0)
    n = 16
    sampled = generate(
        model,
        processor,
        [t for t in texts for _ in range(n)],
        [im for im in images for _ in range(n)],
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
    )
    gold = [LETTERS[it.options.index(it.label)] for it in items]
    letters = sum(a in VALID for a in sampled)
    assert letters >= 0.2 * len(sampled)
    seen = sum(gold[i] in sampled[i * n : (i + 1) * n] for i in range(len(items)))
    assert seen >= 0.75 * len(items)


def test_digits_split_is_fixed():
    pytest.importorskip("sklearn")
    from ttrv.digits import digit_items, load_digits_split, mc_options

    split = load_digits_split(seed=0)
    assert {k: len(v) for k, v in split.items()} == {"train": 900, "val": 100, "test": 797}
    image, digit = split["test"][0]
    assert image.size == (32, 32) and image.mode == "RGB" and 0 <= digit <= 9
    items = digit_items("test", "multiple_choice", seed=0, limit=5)
    assert [it.name for it in items] == [f"test-{i:04d}" for i in range(5)]
    assert all(it.label in it.options and len(set(it.options)) == 4 for it in items)
    assert digit_items("test", "multiple_choice", seed=0, limit=5)[3].options == items[3].options
    assert digit_items("test", "open", limit=1)[0].options is None
    opts = mc_options(3, random.Random(0))
    assert "3" in opts and len(opts) == 4
