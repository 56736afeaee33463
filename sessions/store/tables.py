"""What a session's rows are: the tables that hold them, and how values are encoded.

`SESSION_TABLES` is the one declarative list of the tables holding one session's rows:
`Store.delete_session` deletes from them, `Store.dump` reads them, and `sessions.archive`
exports and imports them. A table added to the schema for a session's rows is added here.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from ..schema import JSON_COLUMNS

# Tables holding one session's rows, in the order they are written and deleted, each with
# the order its rows are dumped in (delete, dump and the archive all read this one list).
SESSION_TABLES: dict[str, str] = {
    "session_images": "position",
    "steps": "step",
    "rollouts": 'step, image_id, "index"',
    "answers": "phase, image_id",
    "checkpoints": "id",
    "events": "id",
    "reviews": "image_id",
}
STEP_COLUMNS = (
    "step",
    "round",
    "reward_mean",
    "reward_std",
    "consensus",
    "entropy",
    "invalid_rate",
    "kl",
    "loss",
    "grad_norm",
    "lr",
    "tokens",
    "seconds",
    "groups",
    "groups_skipped",
)
ROLLOUT_COLUMNS = (
    "step",
    "image_id",
    "index",
    "response",
    "answer",
    "reward",
    "components",
    "advantage",
    "trained",
    "option_order",
)


def now() -> str:
    """UTC timestamp, ISO 8601 with milliseconds (every `created`/`updated` column)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def to_json(value: Any) -> str:
    """The one JSON encoding used for JSON columns (the archive relies on it round-tripping)."""
    return json.dumps(value, ensure_ascii=False)


def parse_json_columns(table: str, row: dict[str, Any]) -> dict[str, Any]:
    """Parse `row`'s JSON columns (`schema.JSON_COLUMNS`) in place; returns `row`."""
    for col in JSON_COLUMNS.get(table, ()):
        if row.get(col) is not None:
            row[col] = json.loads(row[col])
    return row
