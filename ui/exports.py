"""The results people came for: a CSV of every image's answer before and after adapting
(with the votes of its latest rollouts and their consensus), and the session's adapter
folder as a zip. Read from the store only; the merged model is a worker job
(`sessions.worker.Worker._job_export_model`).
"""

from __future__ import annotations

import csv
import re
import tempfile
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from sessions import review
from sessions.store import Store

from . import charts

# What a peft adapter folder holds (a checkpoint also has optimiser moments and loop state,
# which only resuming needs).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")

COLUMNS = ["image", "image_id", "label", "before", "after", "after_phase", "flipped",
           "correct_before", "correct_after", "votes", "consensus", "rollouts", "step",
           "before_response", "after_response"]  # fmt: skip


def _cell(value: Any) -> Any:
    return "" if value is None else value


def votes_text(counts: Counter) -> str:
    """'7:15; 1:1' — each answer of the rollouts with its count, most votes first."""
    return "; ".join(f"{a}:{n}" for a, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def safe_stem(session: dict[str, Any]) -> str:
    """A file-name form of a session's name."""
    return re.sub(r"[^A-Za-z0-9_]+", "-", session["name"]).strip("-")[:40] or "session"


def latest_votes(store: Store, session_id: str) -> dict[str, Counter]:
    """{image_id: Counter of answers} of each image's latest step with rollouts, in one
    query (not one per image: 10,000 of those took seconds)."""
    sql = (
        "SELECT r.image_id, r.answer, count(*) FROM rollouts r JOIN (SELECT image_id, "
        "max(step) AS step FROM image_steps WHERE session_id = ? GROUP BY image_id) m "
        "ON r.image_id = m.image_id AND r.step = m.step WHERE r.session_id = ? "
        "GROUP BY r.image_id, r.answer"
    )
    votes: dict[str, Counter] = {}
    with store.snapshot("reading the latest votes") as db:
        for image_id, answer, n in db.execute(sql, [session_id, session_id]):
            votes.setdefault(image_id, Counter())[answer or charts.INVALID] += n
    return votes


def answer_rows(store: Store, session_id: str) -> list[dict[str, Any]]:
    """One dict per image, in the session's order, keyed by `COLUMNS`."""
    rows = []
    stats_of = store.rollout_stats(session_id)
    votes_of = latest_votes(store, session_id)
    for a in store.answers(session_id):
        stats = stats_of.get(a["image_id"]) or {"n": 0, "consensus": None, "step": None}
        votes = votes_of.get(a["image_id"])
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
                "votes": votes_text(votes) if votes else None,
                "consensus": None if stats["consensus"] is None else round(stats["consensus"], 4),
                "rollouts": stats["n"],
                "step": stats["step"],
                "before_response": a["before_response"],
                "after_response": a["after_response"],
            }
        )
    return rows


def write_answers_csv(store: Store, session_id: str, folder: Path | None = None) -> Path:
    """Write the session's answers CSV into `folder` (default: a fresh temporary folder)
    and return its path, named after the session."""
    session = store.get_session(session_id)
    folder = Path(folder or tempfile.mkdtemp(prefix="ttrv-answers-"))
    path = folder / f"{safe_stem(session)}-{session_id}-answers.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in answer_rows(store, session_id):
            writer.writerow({k: _cell(v) for k, v in row.items()})
    return path


def adapter_zip(store: Store, session_id: str, folder: Path | None = None) -> tuple[Path, int]:
    """Zip the session's latest adapter (the peft files, as folder `<name>-adapter/`) into
    `folder` (default: a fresh temporary folder); (the zip, its step). ValueError when the
    session has none, or its flip review reverted it to the unadapted model."""
    session = store.get_session(session_id)
    reverted, ckpt = review.result_adapter(store, session_id)
    if reverted:
        raise ValueError(
            f"The flip review of {session['name']!r} reverted it to the unadapted model, so "
            "it has no adapter to download. Merged model exports the unadapted model."
        )
    if ckpt is None:
        raise ValueError(f"{session['name']!r} has no adapter saved yet: adapt first.")
    source = Path(ckpt["path"])
    files = [source] if source.is_file() else [source / n for n in ADAPTER_FILES]
    files = [f for f in files if f.is_file()]
    if not files:
        raise ValueError(f"The adapter folder {source} holds no adapter files.")
    stem = f"{safe_stem(session)}-{session_id}-adapter"
    path = Path(folder or tempfile.mkdtemp(prefix="ttrv-adapter-")) / f"{stem}.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            zf.write(f, f"{stem}/{f.name}")
    return path, ckpt["step"]


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
