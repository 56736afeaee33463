"""The results people came for, as a CSV: every image's answer before and after adapting,
the votes of its latest rollouts and their consensus. Read from the store only.
"""

from __future__ import annotations

import csv
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from sessions.store import Store

from . import charts

COLUMNS = ["image", "image_id", "label", "before", "after", "after_phase", "flipped",
           "correct_before", "correct_after", "votes", "consensus", "rollouts", "step",
           "before_response", "after_response"]  # fmt: skip


def _cell(value: Any) -> Any:
    return "" if value is None else value


def votes_text(rollouts: list[dict[str, Any]]) -> str:
    """'7:15; 1:1' — each answer of the rollouts with its count, most votes first."""
    counts = Counter(r.get("answer") or charts.INVALID for r in rollouts)
    return "; ".join(f"{a}:{n}" for a, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def answer_rows(store: Store, session_id: str) -> list[dict[str, Any]]:
    """One dict per image, in the session's order, keyed by `COLUMNS`."""
    rows = []
    for a in store.answers(session_id):
        rollouts = store.rollouts(session_id, a["image_id"])
        stats = charts.image_stats(rollouts)
        rows.append(
            {
                "image": a["name"],
                "image_id": a["image_id"],
                "label": a["label"],
                "before": a["before"],
                "after": a["after"],
                "after_phase": a["after_phase"],
                "flipped": a["flipped"],
                "correct_before": a["correct_before"],
                "correct_after": a["correct_after"],
                "votes": votes_text(rollouts) if rollouts else None,
                "consensus": None if stats["consensus"] is None else round(stats["consensus"], 4),
                "rollouts": stats["n"],
                "step": rollouts[0]["step"] if rollouts else None,
                "before_response": a["before_response"],
                "after_response": a["after_response"],
            }
        )
    return rows


def write_answers_csv(store: Store, session_id: str, folder: Path | None = None) -> Path:
    """Write the session's answers CSV into `folder` (default: a fresh temporary folder)
    and return its path, named after the session."""
    session = store.get_session(session_id)
    safe = re.sub(r"[^A-Za-z0-9_]+", "-", session["name"]).strip("-")[:40] or "session"
    folder = Path(folder or tempfile.mkdtemp(prefix="ttrv-answers-"))
    path = folder / f"{safe}-{session_id}-answers.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in answer_rows(store, session_id):
            writer.writerow({k: _cell(v) for k, v in row.items()})
    return path


def image_args(draft: list[dict[str, Any]], demo_dir: Path) -> tuple[list[str], str | None]:
    """(image arguments, labels CSV) that reproduce the draft on the command line: the
    demo folder (with its labels) when every image comes from it, else the folders that
    hold the files, else a placeholder for uploads (their files are temporary copies)."""
    paths = [Path(d["path"]) for d in draft if d.get("path")]
    if not paths:
        return ["IMAGES/"], None
    demo = demo_dir.resolve()
    if all(p.resolve().parent == demo for p in paths):
        labels = demo / "labels.csv"
        return [str(demo)], str(labels) if labels.is_file() else None
    temp = Path(tempfile.gettempdir()).resolve()
    if any(p.resolve().is_relative_to(temp) for p in paths):
        return ["IMAGES/"], None  # uploaded through the browser: name your own folder
    folders = sorted({str(p.parent) for p in paths})
    return folders if len(folders) <= 3 else ["IMAGES/"], None


def cli_command(config: Any, images: list[str], labels: str | None = None) -> str:
    """The `python -m ttrv adapt` command that runs `config` headless: one flag per setting
    that differs from the defaults (flag names from `ttrv.cli.flag_name`)."""
    import shlex

    from ttrv.cli import flag_name
    from ttrv.config import AdaptConfig

    defaults = AdaptConfig().to_dict()
    parts = ["python -m ttrv adapt", *(shlex.quote(i) for i in images)]
    if labels:
        parts.append(f"--labels {shlex.quote(labels)}")
    for section, values in config.to_dict().items():
        for name, value in values.items():
            if defaults.get(section, {}).get(name) == value:
                continue
            flag = flag_name(section, name)
            if isinstance(value, bool):
                parts.append(f"--{flag}" if value else f"--no-{flag}")
            else:
                parts.append(f"--{flag} {shlex.quote(str(value))}")
    return " \\\n    ".join(parts)
