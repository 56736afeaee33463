"""Named settings presets: the whole settings form saved under a name and loaded back.

A preset is `<data_dir>/presets/<name>.json`, the nested config dict of
`AdaptConfig.to_dict()`. Saving and loading both go through `AdaptConfig.from_dict`, so a
preset holds only valid settings and a hand-edited or outdated file is refused with the
dataclass's own message. Names are sanitised into file names (letters, digits, space,
`-`, `_`, `.`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ttrv.config import SECTIONS, AdaptConfig, ConfigError

FOLDER = "presets"
MAX_NAME = 60


def folder(data_dir: str | Path) -> Path:
    return Path(data_dir) / FOLDER


def clean_name(name: str | None) -> str:
    """The file-safe form of a preset name; ValueError when nothing usable is left."""
    cleaned = re.sub(r"[^\w .-]+", "-", (name or "").strip(), flags=re.ASCII)
    cleaned = re.sub(r"\s+", " ", cleaned).strip(" .-")[:MAX_NAME].strip(" .-")
    if not cleaned:
        raise ValueError("Give the preset a name (letters, digits, spaces, '-', '_' or '.').")
    return cleaned


def names(data_dir: str | Path) -> list[str]:
    """The saved presets, by name."""
    where = folder(data_dir)
    return sorted((p.stem for p in where.glob("*.json")), key=str.lower) if where.is_dir() else []


def save(data_dir: str | Path, name: str, config: AdaptConfig) -> tuple[str, bool]:
    """Write `config` as preset `name`; (the name used, whether it replaced one)."""
    cleaned = clean_name(name)
    path = folder(data_dir) / f"{cleaned}.json"
    replaced = path.is_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise OSError(f"Cannot save the preset {cleaned!r} in {path.parent}: {exc}.") from exc
    return cleaned, replaced


def load(data_dir: str | Path, name: str | None) -> dict[str, Any]:
    """The nested config dict of preset `name`, validated; ValueError saying what is wrong
    with a missing or bad file."""
    if not name:
        raise ValueError("Pick a preset to load.")
    cleaned = clean_name(name)
    path = folder(data_dir) / f"{cleaned}.json"
    if not path.is_file():
        raise ValueError(f"There is no preset {cleaned!r} (looked for {path}).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"The preset file {path} cannot be read as JSON ({exc}).") from exc
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(
            f"The preset file {path} is not a settings file: it should hold one object per "
            f"section ({', '.join(SECTIONS)}) as Save preset writes it."
        )
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ValueError(
            f"The preset {cleaned!r} has unknown sections {unknown}; known: "
            f"{', '.join(SECTIONS)}. Fix or delete {path}."
        )
    try:
        return AdaptConfig.from_dict(data).to_dict()
    except (ConfigError, TypeError) as exc:
        raise ValueError(
            f"The preset {cleaned!r} holds settings this version refuses: {exc} "
            f"Fix or delete {path}."
        ) from exc
