"""The narrow protocol between the engine and whoever watches it.

The engine calls `sink(kind, data)` with a JSON-able dict; it never knows who listens.
The CLI writes JSON lines (`JsonlSink`), the worker writes SQLite (`sessions.store`).

Kinds and their data (all keys always present):
- "run_start":  {"config": AdaptConfig.to_dict(), "images": [{"image_id", "name"}], "model": info,
                 "split": {"adapt": int, "watch": int, "watch_ids": [str], "note": str},
                 "processes": int (data-parallel processes; events come from the main one)}
- "answers":    {"phase": "before" | "after" | "round-<k>",
                 "answers": [{"image_id", "response", "answer"}]}
- "step":       StepRecord fields
- "rollouts":   {"step": int, "rollouts": [RolloutRecord fields]}
- "checkpoint": {"round": int, "step": int, "path": str}
- "forecast":   `ttrv.forecast.Forecast` fields + "set" ("watch" | "adapted") + "votes"
                 ({image_id: the answers its samples favoured}), before step 0
- "guard":      one per guard check: {"step": int, "phase": "round-<k>" | "step-<n>",
                 "action": "keep" | "rollback", "reason": str, "tripped": bool,
                 "healthy": bool, "near": str, "signals": {set: Signals},
                 "base_signals": {set: Signals}, "rolled_back_to": str | None,
                 "target_step": int, "checkpoint": str | None}
- "run_end":    {"status": "done" | "stopped" | "guard_stopped", "steps": int, "reason": str}
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Sink = Callable[[str, dict[str, Any]], None]


def null_sink(kind: str, data: dict[str, Any]) -> None:
    """A sink that drops everything."""


@dataclass
class StepRecord:
    step: int
    round: int
    reward_mean: float
    reward_std: float
    consensus: float  # mean share of the top answer per image
    entropy: float  # mean entropy (nats) of each image's answer distribution
    invalid_rate: float
    kl: float
    loss: float
    grad_norm: float
    lr: float
    tokens: int  # response tokens that took part in the backward pass
    seconds: float
    groups: int  # images in the step
    groups_skipped: int  # images whose advantages were all zero (no forward/backward)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RolloutRecord:
    step: int
    image_id: str
    index: int
    response: str
    answer: str
    reward: float
    components: dict[str, float] = field(default_factory=dict)
    advantage: float = 0.0
    trained: bool = False
    option_order: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class JsonlSink:
    """Appends one JSON object per event to a file; safe to call from several threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        line = json.dumps({"kind": kind, **data}, ensure_ascii=False)
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


def rewind_jsonl(path: str | Path, checkpoint: str | Path) -> int:
    """Cut an events file back to the "checkpoint" event of `checkpoint`, for a run that
    resumes from it in the same folder: what the interrupted run logged after that point
    is logged again by the resumed run, so it would appear twice. Returns the number of
    lines dropped (0 when the file or the event is not there: nothing is cut)."""
    path, target = Path(path), Path(checkpoint).resolve()
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = None
    for i, line in enumerate(lines):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("kind") == "checkpoint" and Path(event.get("path", "")).resolve() == target:
            cut = i + 1
    if cut is None:
        return 0
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(lines[:cut]), encoding="utf-8")
    tmp.replace(path)
    return len(lines) - cut


def fanout(*sinks: Sink) -> Sink:
    """One sink that forwards every event to several."""

    def sink(kind: str, data: dict[str, Any]) -> None:
        for s in sinks:
            s(kind, data)

    return sink
