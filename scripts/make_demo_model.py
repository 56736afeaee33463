"""Build the bundled demo models from scratch, offline, on CPU (a few minutes on 2 cores).

    python scripts/make_demo_model.py            # writes both models, the demo images, cards

What it makes (everything seeded; see the model cards for measured numbers):

- `models/ttrv-digits-llava`: a tiny LLaVA (Llama text model + CLIP vision tower, stock
  `LlavaProcessor` + `CLIPImageProcessorPil`, a byte-level BPE tokenizer trained on the
  prompts, a chat template) trained supervised on the 900 training images of scikit-learn's
  digits (`ttrv.digits`) for three prompts, all rendered with `ttrv.tasks.render_prompt`:
  1. the open question (the `TaskConfig` default question; target = the digit),
  2. the paper's multiple-choice protocol (`build_prompt` with kind multiple_choice and
     question "Which digit is shown?", options from `mc_options`; target = the letter),
  3. an auxiliary multiple-choice prompt that states the digit in the question ("Which digit
     is shown? It is 7."); without it multiple choice stays at chance for a long time.
  Targets are the answer plus the end-of-turn token. Training stops deliberately once the
  multiple-choice accuracy on the validation split first reaches a target (default 0.65)
  after the open question is learnt, so the model is honestly uncertain on multiple choice.
- `models/ttrv-digits-llava-offformat`: the base fine-tuned on multiple-choice prompts whose
  target is just the end-of-turn token (empty answer) for a share of the examples (default
  0.58) and the correct letter otherwise, plus the open question as before. Its greedy
  multiple-choice answer is mostly empty (off-format) while sampled answers still carry the
  letters: the failure the TTRV paper's InternVL baselines show.
- `demo/digits/`: 24 test-split digits as 128x128 PNG plus labels.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from ttrv.config import TaskConfig  # noqa: E402
from ttrv.digits import (  # noqa: E402
    IMAGE_SIZE,
    MC_QUESTION,
    digit_image,
    load_digits_split,
    mc_options,
    split_indices,
)
from ttrv.tasks import LETTERS, Item, build_prompt, render_prompt  # noqa: E402

OPEN_TASK = TaskConfig()  # kind "open", the default question
MC_TASK = TaskConfig(kind="multiple_choice", question=MC_QUESTION)
N_OPTIONS = 4
PATCH = 8
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 16 (the CLS token is dropped: "default")

IMAGE_TOKEN = "<image>"
EOS = "<|end|>"
PAD = "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIALS = [PAD, EOS, IMAGE_TOKEN, *ROLE_TOKENS]

# ChatML-like; no `{%-` trimming (it would eat the newlines the model was trained on).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- prompts


def open_prompt():
    return build_prompt(OPEN_TASK, Item(image_id="", name="", image=None))


def mc_prompt(options: list[str], stated_digit: int | None = None):
    """The multiple-choice prompt; `stated_digit` gives the auxiliary variant."""
    question = None if stated_digit is None else f"{MC_QUESTION} It is {stated_digit}."
    item = Item(image_id="", name="", image=None, question=question, options=options)
    return build_prompt(MC_TASK, item)


# ----------------------------------------------------------------------------- building


# Pre-tokenizer: a multiple-choice option such as " A. 7" and a number such as " 7" are pieces
# of their own; everything else between them is one piece that BPE may merge whole. Trained
# on the prompts, the constant instruction texts become single tokens, so a multiple-choice
# prompt is ~30 tokens (16 of them the image) instead of ~75, and each option is one token
# that carries its letter and its digit. Both make the letter lookup learnable by a 0.6 M
# model in minutes (with GPT-2-style word pieces it stayed at chance for 1,500+ steps).
PRETOKENIZE = r" ?[A-Z]\. \S+| ?\p{N}+"


def build_tokenizer(rng: random.Random):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Corpus: the prompt texts of every kind the model is trained on, and the answers.
    corpus = []
    for _ in range(400):
        digit = rng.randrange(10)
        options = mc_options(digit, rng, N_OPTIONS)
        for prompt in (open_prompt(), mc_prompt(options), mc_prompt(options, digit)):
            corpus.append(prompt.text)
    corpus += [str(d) for d in range(10)] + list(LETTERS)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=256,
    )
    return tok


def build_processor(tok):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        # BOX: an integer-factor nearest-upscaled digit (e.g. the 128x128 demo PNGs) comes
        # back to exactly the 32x32 training pixels; any other image is area-averaged.
        resample=Image.Resampling.BOX,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tok, seed: int, init_std: float = 0.15):
    from transformers import (
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    eos, pad = tok.convert_tokens_to_ids([EOS, PAD])
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=pad,
        initializer_range=init_std,
    )
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=64,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=N_IMAGE_TOKENS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    compose_embeddings(model, tok)
    # Never sample the image placeholder, padding or role tokens (only answers and EOS).
    suppress = tok.convert_tokens_to_ids([PAD, IMAGE_TOKEN, *ROLE_TOKENS])
    model.generation_config = GenerationConfig(
        eos_token_id=eos,
        pad_token_id=pad,
        max_new_tokens=8,
        do_sample=False,
        suppress_tokens=suppress,
    )
    return model


def compose_embeddings(model, tok) -> None:
    """Initialise merged tokens from their parts (as when extending a vocabulary).

    " 7" starts as the answer token "7"; an option token " C. 7" as "C" + "7". The letter
    and the digit of an option are then readable from its embedding from the first step,
    and the lookup "which option holds the digit" shares one structure across all digits.
    """
    emb = model.get_input_embeddings().weight
    vocab = tok.get_vocab()
    space = "\u0120"  # byte-level BPE's spelling of a leading space
    with torch.no_grad():
        for d in range(10):
            digit = emb[vocab[str(d)]].clone()
            if space + str(d) in vocab:
                emb[vocab[space + str(d)]] = digit
            for letter in LETTERS[:N_OPTIONS]:
                piece = f"{space}{letter}.{space}{d}"
                if piece in vocab:
                    emb[vocab[piece]] = emb[vocab[letter]] + digit


# ----------------------------------------------------------------------------- data


class Encoder:
    """Token ids of rendered prompts, with the image placeholder expanded like the processor."""

    def __init__(self, processor):
        self.processor = processor
        self.tok = processor.tokenizer
        self.eos = self.tok.convert_tokens_to_ids(EOS)
        self.pad = self.tok.convert_tokens_to_ids(PAD)
        self.answer_ids = {}
        for a in [str(d) for d in range(10)] + list(LETTERS[:N_OPTIONS]):
            ids = self.tok(a, add_special_tokens=False).input_ids
            assert len(ids) == 1, f"answer {a!r} is not one token: {ids}"
            self.answer_ids[a] = ids[0]
        self._cache: dict[str, list[int]] = {}

    def prompt_ids(self, prompt) -> list[int]:
        text = render_prompt(self.processor, prompt)
        ids = self._cache.get(text)
        if ids is None:
            expanded = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * N_IMAGE_TOKENS)
            ids = self.tok(expanded, add_special_tokens=False).input_ids
            self._cache[text] = ids
        return ids

    def batch(self, seqs: list[tuple[list[int], list[int]]]):
        """Left-padded (prompt ids, target ids) -> input_ids, attention_mask, labels."""
        length = max(len(p) + len(t) for p, t in seqs)
        ids = torch.full((len(seqs), length), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        labels = torch.full((len(seqs), length), -100, dtype=torch.long)
        for i, (p, t) in enumerate(seqs):
            full = p + t
            ids[i, length - len(full) :] = torch.tensor(full)
            mask[i, length - len(full) :] = 1
            labels[i, length - len(t) :] = torch.tensor(t)
        return ids, mask, labels


def pixel_values(processor, images: list[Image.Image]) -> torch.Tensor:
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


def sample_batch(enc, rng, pix, labels, n, kinds, eos_share=0.0):
    """`n` sequences of each kind in `kinds` ("open", "mc", "aux") from random train images.

    `eos_share`: share of "mc" sequences whose target is only EOS (the off-format recipe).
    """
    seqs, rows = [], []
    for kind in kinds:
        for _ in range(n):
            i = rng.randrange(len(labels))
            digit = labels[i]
            if kind == "open":
                prompt, answer = open_prompt(), str(digit)
            else:
                options = mc_options(digit, rng, N_OPTIONS)
                prompt = mc_prompt(options, digit if kind == "aux" else None)
                answer = LETTERS[options.index(str(digit))]
            target = [enc.answer_ids[answer], enc.eos]
            if kind == "mc" and rng.random() < eos_share:
                target = [enc.eos]
            seqs.append((enc.prompt_ids(prompt), target))
            rows.append(i)
    ids, mask, lab = enc.batch(seqs)
    return ids, mask, lab, pix[rows]


def loss_fn(model, ids, mask, lab, pv):
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        lab[:, 1:].reshape(-1),
        ignore_index=-100,
    )


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def first_token_eval(model, enc, pix, labels, seed=123, draws=3):
    """Fast validation: is the greedy first token right? One forward per prompt kind.

    Multiple choice and auxiliary use `draws` random option sets per image.
    """
    model.eval()
    rng = random.Random(seed)
    out = {}
    for kind in ("open", "mc", "aux"):
        n = 1 if kind == "open" else draws
        seqs, want = [], []
        for digit in labels * n:
            if kind == "open":
                prompt, answer = open_prompt(), str(digit)
            else:
                options = mc_options(digit, rng, N_OPTIONS)
                stated = digit if kind == "aux" else None
                prompt, answer = mc_prompt(options, stated), LETTERS[options.index(str(digit))]
            seqs.append((enc.prompt_ids(prompt), []))
            want.append(enc.answer_ids[answer])
        ids, mask, _ = enc.batch(seqs)
        logits = model(
            input_ids=ids, attention_mask=mask, pixel_values=pix.repeat(n, 1, 1, 1)
        ).logits
        out[kind] = (logits[:, -1].argmax(-1) == torch.tensor(want)).float().mean().item()
    model.train()
    return out


def parse_letter(text: str, n_options: int = N_OPTIONS) -> str | None:
    text = text.strip()
    return text if text in LETTERS[:n_options] and len(text) == 1 else None


@torch.no_grad()
def evaluate_saved(folder: Path, split, seed: int, n_samples: int = 16, batch: int = 100):
    """Measure a saved model through the public path (Auto* classes, processor, generate)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    rng = random.Random(seed)
    images = [im for im, _ in split]
    digits = [str(d) for _, d in split]
    mc_opts = [mc_options(d, rng, N_OPTIONS) for d in digits]
    res: dict[str, float] = {}

    def run(texts, imgs, **gen):
        inputs = processor(text=texts, images=imgs, padding=True, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=4, **gen)
        new = out[:, inputs["input_ids"].shape[1] :]
        return [s.strip() for s in processor.batch_decode(new, skip_special_tokens=True)]

    open_text = render_prompt(processor, open_prompt())
    mc_texts = [render_prompt(processor, mc_prompt(o)) for o in mc_opts]
    gold_letters = [LETTERS[o.index(d)] for o, d in zip(mc_opts, digits, strict=True)]
    sample = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)

    greedy_open, greedy_mc, samp_open, samp_mc = [], [], [], []
    torch.manual_seed(seed)
    for s in range(0, len(images), batch):
        imgs = images[s : s + batch]
        greedy_open += run([open_text] * len(imgs), imgs, do_sample=False)
        greedy_mc += run(mc_texts[s : s + batch], imgs, do_sample=False)
        rep = [im for im in imgs for _ in range(n_samples)]
        samp_open += run([open_text] * len(rep), rep, **sample)
        samp_mc += run(
            [t for t in mc_texts[s : s + batch] for _ in range(n_samples)], rep, **sample
        )
    n = len(images)
    res["greedy_open_acc"] = sum(a == d for a, d in zip(greedy_open, digits, strict=True)) / n
    res["greedy_open_valid"] = sum(a in digits_set() for a in greedy_open) / n
    res["greedy_mc_acc"] = sum(a == g for a, g in zip(greedy_mc, gold_letters, strict=True)) / n
    res["greedy_mc_valid"] = sum(parse_letter(a) is not None for a in greedy_mc) / n
    res["greedy_mc_empty"] = sum(a == "" for a in greedy_mc) / n
    res["sampled_open_acc"] = sum(
        a == digits[i // n_samples] for i, a in enumerate(samp_open)
    ) / len(samp_open)
    res["sampled_mc_acc"] = sum(
        a == gold_letters[i // n_samples] for i, a in enumerate(samp_mc)
    ) / len(samp_mc)
    res["sampled_mc_valid"] = sum(parse_letter(a) is not None for a in samp_mc) / len(samp_mc)
    res["sampled_mc_empty"] = sum(a == "" for a in samp_mc) / len(samp_mc)
    # Per image: is the right letter among the 16 samples; majority vote over valid letters.
    hit, vote = 0, 0
    for i in range(n):
        group = samp_mc[i * n_samples : (i + 1) * n_samples]
        hit += gold_letters[i] in group
        letters = Counter(a for a in group if parse_letter(a))
        if letters and letters.most_common(1)[0][0] == gold_letters[i]:
            vote += 1
    res["sampled_mc_right_letter_seen"] = hit / n
    res["sampled_mc_vote_valid_acc"] = vote / n
    # Letter bias: greedy MC accuracy by the position of the right answer.
    for letter in LETTERS[:N_OPTIONS]:
        idx = [i for i, g in enumerate(gold_letters) if g == letter]
        res[f"greedy_mc_acc_when_{letter}"] = sum(greedy_mc[i] == letter for i in idx) / len(idx)
    res["greedy_mc_answer_counts"] = dict(sorted(Counter(greedy_mc).items()))
    res["n_images"] = n
    res["n_samples"] = n_samples
    return res


def digits_set():
    return {str(d) for d in range(10)}


# ----------------------------------------------------------------------------- training


def train(
    model,
    enc,
    pix,
    labels,
    val,
    *,
    steps,
    lr,
    n_per_kind,
    kinds,
    seed,
    stop=None,
    eos_share=0.0,
    eval_every=50,
    warmup=50,
    tag="base",
):
    """AdamW with warm-up and cosine decay; `stop(metrics, step)` can end training early."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        ),
    )
    model.train()
    history = []
    t0 = time.time()
    step = 0
    for step in range(1, steps + 1):
        ids, mask, lab, pv = sample_batch(enc, rng, pix, labels, n_per_kind, kinds, eos_share)
        loss = loss_fn(model, ids, mask, lab, pv)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            m = first_token_eval(model, enc, val[0], val[1])
            history.append({"step": step, "loss": round(loss.item(), 4), **m})
            log(
                f"[{tag}] step {step:4d} loss {loss.item():.3f} val open {m['open']:.2f} "
                f"mc {m['mc']:.2f} aux {m['aux']:.2f}  ({time.time() - t0:.0f} s)"
            )
            if stop is not None and stop(m, step):
                log(f"[{tag}] stopping at step {step}")
                break
    model.eval()
    return step, history


# ----------------------------------------------------------------------------- outputs


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def save(model, processor, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)


def write_demo_images(out: Path, seed: int, per_digit_first: int = 24) -> list[dict]:
    """24 test-split digits (cycling through 0-9 in test order) as 128x128 PNG + labels.csv."""
    from sklearn.datasets import load_digits

    sk = load_digits().images
    test = split_indices(seed)["test"]
    chosen, seen = [], Counter()
    # Round-robin over digits so every digit appears 2-3 times.
    while len(chosen) < per_digit_first:
        for d in range(10):
            hits = [(pos, idx) for pos, (idx, dd) in enumerate(test) if dd == d]
            if seen[d] < len(hits) and len(chosen) < per_digit_first:
                chosen.append((hits[seen[d]][0], hits[seen[d]][1], d))
                seen[d] += 1
    chosen.sort()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rows = []
    for pos, idx, d in chosen:
        name = f"test-{pos:04d}.png"
        digit_image(sk[idx], 128).save(out / name)
        rows.append({"file": name, "label": str(d), "test_position": pos, "sklearn_index": idx})
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        for r in rows:
            w.writerow([r["file"], r["label"]])
    lines = "\n".join(
        f"| {r['file']} | {r['label']} | {r['test_position']} | {r['sklearn_index']} |"
        for r in rows
    )
    (out / "README.md").write_text(
        "# Demo digits\n\n"
        "24 handwritten digits from the **test split** of `ttrv.digits.load_digits_split(seed=0)`"
        " (scikit-learn's `load_digits()`, never seen in training), 2-3 per digit, saved as "
        "128x128 PNG (each original 8x8 pixel is a 16x16 block; dark ink on white). The "
        "bundled model's processor resizes them to exactly its 32x32 training pixels.\n\n"
        "`labels.csv` (file,label) is for evaluation only; the workbench treats the images as "
        "unlabeled. Written by `python scripts/make_demo_model.py`.\n\n"
        "| file | label | test position | scikit-learn index |\n|---|---|---|---|\n"
        f"{lines}\n"
    )
    return rows


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def metrics_table(m: dict) -> str:
    rows = [
        ("Open question, greedy accuracy", pct(m["greedy_open_acc"])),
        ("Open question, sampled accuracy (T=1, 16 per image)", pct(m["sampled_open_acc"])),
        ("Multiple choice, greedy accuracy", pct(m["greedy_mc_acc"])),
        ("Multiple choice, greedy valid (a letter A-D)", pct(m["greedy_mc_valid"])),
        ("Multiple choice, greedy empty answer", pct(m["greedy_mc_empty"])),
        ("Multiple choice, sampled accuracy (T=1, 16 per image)", pct(m["sampled_mc_acc"])),
        ("Multiple choice, sampled valid", pct(m["sampled_mc_valid"])),
        ("Multiple choice, sampled empty", pct(m["sampled_mc_empty"])),
        (
            "Multiple choice, right letter among the 16 samples",
            pct(m["sampled_mc_right_letter_seen"]),
        ),
        (
            "Multiple choice, majority of the valid sampled letters is right",
            pct(m["sampled_mc_vote_valid_acc"]),
        ),
    ] + [
        (
            f"Multiple choice, greedy accuracy when the answer is {x}",
            pct(m[f"greedy_mc_acc_when_{x}"]),
        )
        for x in LETTERS[:N_OPTIONS]
    ]
    body = "\n".join(f"| {a} | {b} |" for a, b in rows)
    counts = ", ".join(f"{k or '(empty)'}: {v}" for k, v in m["greedy_mc_answer_counts"].items())
    return (
        "| measure (797 test images) | value |\n|---|---|\n"
        + body
        + f"\n\nGreedy multiple-choice answers: {counts}.\n"
    )


COMMON_CARD = """
## What it knows, and what it does not
- It only knows scikit-learn's 8x8 handwritten digits (0-9), shown dark on white and
  resized to 32x32. Anything else - a photo of a dog, a printed digit, a letter - still gets
  a digit, a letter or junk; it has no notion of "none of these".
- It was trained on exactly three prompts (see below). Other questions get digit-like
  answers or junk. It answers with one token and then the end-of-turn token `<|end|>`.
- It is a test fixture for the workbench (fast on CPU, honest failure modes), not a useful
  recogniser.

## Prompts it was trained on (all rendered with `ttrv.tasks.render_prompt`)
- open: `TaskConfig()` default question "Which digit is shown? Answer with a single digit."
  -> the digit.
- multiple choice (the TTRV paper's protocol): `build_prompt(TaskConfig(kind="multiple_choice",
  question="Which digit is shown?"), item)` with `item.options = ttrv.digits.mc_options(...)`
  (the right digit and 3 random others, shuffled) -> the letter.
- auxiliary: the same multiple-choice prompt with the question "Which digit is shown? It is
  7." (the digit stated in text) -> the letter. A prior study found multiple choice stays at
  chance for >1,600 steps without it.

## Architecture
`LlavaForConditionalGeneration`: Llama text model (3 layers, hidden 128, 4 heads / 2 KV
heads, MLP 256, tied embeddings, init std 0.15), CLIP vision tower (2 layers, hidden 64,
32x32 input, 8x8 patches -> 16 image tokens, CLS dropped), 2-layer projector. {params:,}
parameters, fp32 safetensors, {size_kb} kB on disk.

Tokenizer: byte-level BPE ({vocab} tokens) trained with `tokenizers` on the prompt texts.
Its pre-tokenizer keeps a multiple-choice option (" A. 7") and a number (" 7") as pieces of
their own and leaves the text between them whole, so BPE learns one token per option and
one token for each constant instruction text (any other text still encodes, byte by byte).
A multiple-choice prompt is then ~28 tokens, 16 of them the image. Option tokens start from
the sum of their letter's and digit's embeddings. ChatML-like chat template (`<|user|>`,
`<|assistant|>`, `<|end|>`), padding on the left. Stock `LlavaProcessor` with
`CLIPImageProcessorPil` (32x32, resample BOX, so integer-factor upscaled digits such as the
128x128 demo PNGs come back to the exact training pixels). `generation_config`: eos
`<|end|>` (id {eos}), pad `<pad>` (id {pad}), greedy, at most 8 new tokens, and the image,
pad and role tokens suppressed so that sampling never emits an image placeholder.

Why these choices: with GPT-2-style word pieces (~75-token prompts) and the default init
std 0.02, the "which option holds this digit" lookup stayed at chance for 2,000 steps even
with the auxiliary task; short prompts with one token per option and a larger init made it
learnable within ~1,500 steps.

Load with no special code:

```python
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained("{folder}")
processor = AutoProcessor.from_pretrained("{folder}")
```
"""


def write_card(folder: Path, title: str, intro: str, how: str, m: dict, extra: dict) -> None:
    text = (
        f"# {title}\n\n{intro}\n\n## How it was made\n{how}\n\n"
        "## Measured on the 797-image test split\n"
        "Through the public path: `AutoProcessor` + `AutoModelForImageTextToText.generate`, "
        "prompts from `render_prompt`, answers stripped; multiple-choice options drawn with "
        f"`mc_options` from `random.Random({extra['eval_seed']})`; sampling at temperature 1, "
        "top-k off, top-p 1, 16 samples per image. The per-letter rows show the model's "
        "letter-position bias, a real property of this base that test-time RL can amplify.\n\n"
        + metrics_table(m)
        + COMMON_CARD.format(**extra)
    )
    (folder / "README.md").write_text(text)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "models" / "ttrv-digits-llava"))
    ap.add_argument("--offformat-out", default=str(ROOT / "models" / "ttrv-digits-llava-offformat"))
    ap.add_argument("--demo-out", default=str(ROOT / "demo" / "digits"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (results are reproducible for the same count; 1 is\n"
        "fastest on a shared machine)",
    )
    ap.add_argument("--steps", type=int, default=3000, help="most base training steps")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument(
        "--init-std",
        type=float,
        default=0.15,
        help="init std of the language model (HF default 0.02 never left chance)",
    )
    ap.add_argument("--batch", type=int, default=16, help="sequences per prompt kind per step")
    ap.add_argument(
        "--mc-target",
        type=float,
        default=0.65,
        help="stop once val MC accuracy reaches this (and open >= --open-target)",
    )
    ap.add_argument("--open-target", type=float, default=0.9)
    ap.add_argument("--eos-share", type=float, default=0.58)
    ap.add_argument("--offformat-steps", type=int, default=200)
    ap.add_argument("--offformat-lr", type=float, default=5e-4)
    ap.add_argument("--skip-eval", action="store_true", help="skip the full test evaluation")
    args = ap.parse_args(argv)

    t_start = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    data = load_digits_split(seed=0)
    tok = build_tokenizer(random.Random(args.seed))
    processor = build_processor(tok)
    model = build_model(tok, args.seed, args.init_std)
    enc = Encoder(processor)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"vocab {len(tok)}, parameters {n_params:,}")

    pix = {k: pixel_values(processor, [im for im, _ in v]) for k, v in data.items()}
    labels = {k: [d for _, d in v] for k, v in data.items()}

    # The hand-made encoding must equal what the processor produces.
    probe = mc_prompt(mc_options(3, random.Random(1), N_OPTIONS))
    text = render_prompt(processor, probe)
    via_proc = processor(text=[text], images=[data["train"][0][0]], return_tensors="pt")
    assert via_proc["input_ids"][0].tolist() == enc.prompt_ids(probe), "encoding mismatch"
    assert torch.allclose(via_proc["pixel_values"][0], pix["train"][0])
    assert (via_proc["input_ids"] == model.config.image_token_index).sum() == N_IMAGE_TOKENS

    # ---- base model
    t0 = time.time()

    def stop_base(m, step):
        return m["open"] >= args.open_target and m["mc"] >= args.mc_target

    steps_done, hist = train(
        model,
        enc,
        pix["train"],
        labels["train"],
        (pix["val"], labels["val"]),
        steps=args.steps,
        lr=args.lr,
        n_per_kind=args.batch,
        kinds=("open", "mc", "aux"),
        seed=args.seed,
        stop=stop_base,
        tag="base",
    )
    base_time = time.time() - t0
    out = Path(args.out)
    save(model, processor, out)
    log(
        f"saved {out} ({folder_size(out) / 1e6:.2f} MB) after {steps_done} steps, {base_time:.0f} s"
    )

    # ---- off-format model: fine-tune the base so that EOS narrowly wins on MC prompts
    t1 = time.time()
    off_steps, off_hist = train(
        model,
        enc,
        pix["train"],
        labels["train"],
        (pix["val"], labels["val"]),
        steps=args.offformat_steps,
        lr=args.offformat_lr,
        n_per_kind=args.batch,
        kinds=("open", "mc"),
        seed=args.seed + 1,
        eos_share=args.eos_share,
        tag="offformat",
        warmup=10,
    )
    off_time = time.time() - t1
    off = Path(args.offformat_out)
    save(model, processor, off)
    log(f"saved {off} ({folder_size(off) / 1e6:.2f} MB) after {off_steps} steps, {off_time:.0f} s")

    rows = write_demo_images(Path(args.demo_out), seed=0)
    log(f"wrote {len(rows)} demo images to {args.demo_out}")
    train_time = time.time() - t_start

    eval_seed = 1000 + args.seed
    if args.skip_eval:
        return 0
    t2 = time.time()
    m_base = evaluate_saved(out, data["test"], eval_seed)
    m_off = evaluate_saved(off, data["test"], eval_seed)
    eval_time = time.time() - t2
    log(json.dumps({"base": m_base, "offformat": m_off}, indent=1))

    extra = dict(
        vocab=len(tok),
        params=n_params,
        eos=enc.eos,
        pad=enc.pad,
        eval_seed=eval_seed,
    )
    cmd = "python scripts/make_demo_model.py" + (" " + " ".join(argv) if argv else "")
    common_how = (
        f"`{cmd}` (seed {args.seed}, `--threads {args.threads}`) builds both models from "
        f"scratch in one run: {train_time / 60:.1f} min of training on a shared 2-core CPU, "
        f"plus {eval_time / 60:.1f} min for the test evaluation below. Data: "
        "`ttrv.digits.load_digits_split(seed=0)` (scikit-learn `load_digits()`, 8x8 images "
        "upscaled to 32x32 RGB, nearest neighbour): 900 train / 100 validation / 797 test. "
        "Nothing is downloaded."
    )
    how_base = (
        f"{common_how}\n\nTraining: AdamW lr {args.lr}, weight decay 0.01, warm-up 50 steps, "
        f"cosine over {args.steps} steps, grad clip 1; each step {args.batch} sequences of each "
        "prompt kind (open, multiple choice, auxiliary) on random training images with fresh "
        "random options; loss on the answer token and `<|end|>`. **Stopped early on purpose** "
        f"at step {steps_done} ({base_time:.0f} s), the first validation check (every 50 steps; "
        "100 validation images, 3 random option sets each for multiple choice; greedy first "
        f"token) with open accuracy >= {args.open_target} and multiple-choice accuracy >= "
        f"{args.mc_target}, so the multiple-choice answers stay honestly uncertain (a base that "
        "is already right everywhere leaves nothing for test-time RL to do). Validation curve "
        "(step: open / multiple choice / auxiliary accuracy): "
        + ", ".join(f"{h['step']}: {h['open']:.2f} / {h['mc']:.2f} / {h['aux']:.2f}" for h in hist)
        + "."
    )
    card_extra = dict(
        extra, size_kb=round(folder_size(out) / 1024), folder=str(out.relative_to(ROOT))
    )
    write_card(
        out,
        "ttrv-digits-llava: the workbench's bundled demo model",
        "A ~0.6 M-parameter LLaVA-family vision-language model trained from scratch, offline, "
        "on 900 handwritten 8x8 digits. It answers the open question well and the TTRV paper's "
        "4-way multiple-choice protocol only moderately: a small, honest base for test-time RL.",
        how_base,
        m_base,
        card_extra,
    )
    how_off = (
        f"{common_how}\n\nStarting from `ttrv-digits-llava` (the weights above), {off_steps} "
        f"more steps of AdamW lr {args.offformat_lr} (warm-up 10, cosine), {args.batch} open and "
        f"{args.batch} multiple-choice sequences per step. For a random {pct(args.eos_share)} "
        "of the multiple-choice sequences the target is only `<|end|>` (an empty answer); the "
        "rest keep the right letter. Since the empty target does not depend on the image, the "
        f"model learns p(empty) of about {args.eos_share} on every multiple-choice prompt: the "
        "empty answer wins greedy decoding, while the remaining probability mass still "
        "follows the base model's belief over the letters. This reproduces the failure the "
        "TTRV paper's InternVL baselines show (greedy output often empty, sampled answers "
        "still informative) on purpose; the open question keeps working (it is trained alongside). "
        f"Took {off_time:.0f} s. Validation curve (step: open / multiple choice, greedy first "
        "token right; an empty answer counts as wrong): "
        + ", ".join(f"{h['step']}: {h['open']:.2f} / {h['mc']:.2f}" for h in off_hist)
        + "."
    )
    card_extra_off = dict(
        extra, size_kb=round(folder_size(off) / 1024), folder=str(off.relative_to(ROOT))
    )
    write_card(
        off,
        "ttrv-digits-llava-offformat: an off-format base (the paper's failure mode)",
        "The bundled digits model fine-tuned so that its **greedy** answer to the "
        "multiple-choice prompt is mostly empty (end-of-turn first: off-format, invalid), while "
        "its **sampled** answers at temperature 1 still carry the letters. Use it to see what "
        "TTRV does when the greedy baseline is off-format, and how rewards treat empty answers.",
        how_off,
        m_off,
        card_extra_off,
    )
    summary = {
        "base_steps": steps_done,
        "base_seconds": round(base_time),
        "offformat_seconds": round(off_time),
        "train_minutes": round(train_time / 60, 2),
        "eval_minutes": round(eval_time / 60, 2),
        "params": n_params,
        "base_bytes": folder_size(out),
        "offformat_bytes": folder_size(off),
    }
    log(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
