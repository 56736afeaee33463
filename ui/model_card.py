"""What the app says about a model before it runs: its card summary and, for the bundled
digits model, whether the chosen images look like what it was trained on.

Pure reading of files (the model folder's README.md, or the cached hub snapshot's), no
weights and no processor: safe to call on every change of the model field.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Any

from PIL import Image

from ttrv.digits import is_digits_model, unlike_training_digits

# Checkpoints trained on the 8x8 digits only (the bundled model and its siblings in models/).
MAX_NUMBERS = 4  # accuracy rows shown from a card's tables
MAX_NAMED = 4  # images named in the domain warning


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub resolves it (without importing it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = (
        os.environ.get("HF_HOME")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    )
    return Path(home).expanduser() / "hub"


def cached_snapshot(hub_id: str) -> Path | None:
    """The newest cached snapshot folder of a hub model, or None when it is not cached."""
    folder = hf_cache_dir() / ("models--" + hub_id.replace("/", "--")) / "snapshots"
    if not folder.is_dir():
        return None
    snapshots = [p for p in folder.iterdir() if p.is_dir()]
    return max(snapshots, key=lambda p: p.stat().st_mtime) if snapshots else None


def card_file(model: str) -> Path | None:
    """README.md of a local model folder or of a cached hub model; None if there is none."""
    if not model:
        return None
    local = Path(model).expanduser()
    folder = local if local.is_dir() else cached_snapshot(model.strip())
    card = folder / "README.md" if folder else None
    return card if card and card.is_file() else None


def summarize_card(text: str) -> dict[str, Any]:
    """title, intro (first paragraph), knows (bullets of a "what it knows / limitations"
    section) and numbers ((measure, value) rows of tables whose measure mentions accuracy)."""
    text = re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.S)  # hub cards' YAML front matter
    lines = text.splitlines()
    title = next((ln[2:].strip() for ln in lines if ln.startswith("# ")), "")
    intro: list[str] = []
    knows: list[str] = []
    numbers: list[tuple[str, str]] = []
    section, intro_done = "", False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            if stripped[2:].strip() != title or not stripped.startswith("# "):
                section = stripped.lstrip("#").strip().lower()
                intro_done = intro_done or bool(intro)
            continue
        if not intro_done:  # the first paragraph of prose
            if stripped and not stripped.startswith(("|", "!", "<", "```")):
                intro.append(stripped)
            elif intro:
                intro_done = True
        if re.search(r"know|limitation|intended|out-of-scope", section):
            if stripped.startswith(("- ", "* ")):
                knows.append(stripped[2:])
            elif knows and stripped and not stripped.startswith("|"):
                knows[-1] += " " + stripped  # a wrapped bullet
        cells = [c.strip() for c in stripped.strip("|").split("|")] if stripped[:1] == "|" else []
        if len(cells) >= 2 and "accuracy" in cells[0].lower() and re.search(r"\d", cells[1]):
            numbers.append((cells[0], cells[1]))
    return {"title": title, "intro": " ".join(intro), "knows": knows, "numbers": numbers}


def card_markdown(model: str) -> str:
    """A short Markdown summary of the model's card, or a line saying there is none."""
    card = card_file(model)
    if card is None:
        return (
            f"No model card found for `{model or '-'}`: what this model knows "
            "and how accurate it is are not known to the workbench."
        )
    try:
        s = summarize_card(card.read_text(encoding="utf-8", errors="replace"))
    except OSError as exc:
        return f"The model card {card.name} cannot be read ({exc.strerror or exc})."
    # The card's own Markdown is kept (gr.Markdown sanitises any HTML in it).
    parts = [f"**{s['title'] or Path(model).name}** — {s['intro']}"]
    if s["knows"]:
        parts.append("\n".join(f"- {k}" for k in s["knows"]))
    if s["numbers"]:
        parts.append(
            "Measured: " + " · ".join(f"{m} **{v}**" for m, v in s["numbers"][:MAX_NUMBERS])
        )
    return "\n\n".join(parts)


def unlike_reasons(d: dict[str, Any]) -> list[str]:
    """A draft image's reasons (computed when it was added, else now from its thumbnail)."""
    if "unlike" in d:
        return list(d["unlike"])
    try:
        with Image.open(d["thumb"]) as im:
            size = tuple(d["size"]) if d.get("size") else None
            return unlike_training_digits(im, size)
    except (OSError, KeyError, TypeError, ValueError):
        return []


def domain_warning(model: str, draft: list[dict[str, Any]]) -> str:
    """For the digits model: a warning naming the images unlike its training data, else ""."""
    if not draft or not is_digits_model(model):
        return ""
    off = [(d["name"], reasons) for d in draft if (reasons := unlike_reasons(d))]
    if not off:
        return ""
    named = "; ".join(f"{html.escape(n)} ({', '.join(r)})" for n, r in off[:MAX_NAMED])
    more = f"; and {len(off) - MAX_NAMED} more" if len(off) > MAX_NAMED else ""
    return (
        f"⚠ **{len(off)} of {len(draft)} images do not look like what this model was trained "
        f"on** (8x8 grey handwritten digits, dark on white): {named}{more}. It only knows "
        "digits: it will still answer a digit (or junk) for anything else, and adapting on "
        "such images teaches it nothing useful. Use digit images, or pick another model."
    )
