"""A benchmark results file (JSON): runs without what can be rebuilt (`compact`), configs
kept once per model, variant and setting, floats rounded, and a small copy of the
aggregated table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench.summary import MODES


def write_json(path: Path, head: dict[str, Any], records: list[dict[str, Any]]) -> None:
    runs, configs = compact(records)
    payload = {**head, "configs": configs, "runs": runs}
    path.with_suffix(".json").write_text(json.dumps(_jsonable(payload), separators=(",", ":")))


def compact(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Runs without what can be rebuilt: a guarded outcome's metrics when they are those of
    the unguarded end or of a stored round, and each run's full config (kept once per
    model, variant and setting). Returns (runs, configs)."""
    configs: dict[str, Any] = {}
    out = []
    for r in records:
        r = dict(r)
        cfg = r.pop("config", None)
        if cfg is not None:
            configs.setdefault(f"{r['model']}|{r['variant']}|{r['setting']}", cfg)
            r["guard_on"] = cfg["guard"]["guard"]
        if "guarded" in r and "metrics" in r["guarded"]:
            entry = dict(r["guarded"])
            if entry["round"] == r["unguarded"]["round"] or str(entry["round"]) in r.get(
                "trajectory", {}
            ):
                entry.pop("metrics")
            r["guarded"] = entry
        out.append(r)
    return out, configs


def small_table(table: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "all.greedy_acc",
        "all.expected_acc",
        "all.maj_acc",
        "all.invalid_greedy",
        "all.entropy",
        "heldout.greedy_acc",
    )
    out = {}
    for k, row in table.items():
        if not isinstance(row, dict) or "variant" not in row:
            out[k] = row
            continue
        small = {x: row[x] for x in row if x not in MODES}
        for mode in MODES:
            if mode in row:
                st = row[mode]
                small[mode] = {
                    m: st[m]
                    for m in st
                    if m in keep
                    or m.removesuffix(".delta") in keep
                    or m
                    in ("collapsed", "worst_delta", "trips", "caught", "collapse_flags", "reasons")
                }
        out[k] = small
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return None if math.isnan(obj) else round(obj, 4)
    return obj
