"""The session store at the scale people reach: every read the UI makes, timed.

    python -m bench.store_scale --data-dir /tmp/ttrv-scale            # build (once) + time
    python -m bench.store_scale --data-dir /tmp/ttrv-scale --label after \\
        --compare bench/results/store-scale-before.json                # before/after table

Builds, through the store's public API only (`Store.create_session`, `add_images`, the
`sink` with the events `ttrv/events.py` describes), session A: 10,000 distinct small
images, N = 16, three rounds of 4 images per step (480,000 rollouts, 7,500 steps, before /
round / after answers, a guard check every 10 steps, a checkpoint per round); session B:
the same images, one round (for Compare); and three small sessions (for the list). A data
directory that already holds them is reused, so the same file can be timed before and
after a change (opening it with newer code applies pending migrations, which is timed).

Then times each read the UI makes (`ui/*.py`: Sessions list and Compare, the Adapt tab's
redraw, Inspect's overview, filters and one image, the flip-review queue, export), median
of `--repeats` after one warm-up, and prints read -> ms and the database size. Results go
to `bench/results/store-scale-<label>.json`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ANSWERS = [str(d) for d in range(10)]
INVALID = "<invalid>"  # ttrv.answers.INVALID
UNCERTAIN = 0.5  # ui.charts.UNCERTAIN_CONSENSUS


# -- building the session ------------------------------------------------------------------


def _image(i: int) -> Any:
    """A distinct 32x32 grey image (its pixels encode `i`)."""
    from PIL import Image

    rng = random.Random(i)
    pixels = bytes(rng.randrange(256) for _ in range(32 * 32))
    return Image.frombytes("L", (32, 32), pixels)


def _config(n: int, rounds: int, per_step: int, seed: int) -> dict[str, Any]:
    from ttrv.config import AdaptConfig, OptimConfig, RolloutConfig

    cfg = AdaptConfig(
        rollout=RolloutConfig(n_rollouts=n, n_train=n),
        optim=OptimConfig(rounds=rounds, images_per_step=per_step, seed=seed),
    )
    return cfg.to_dict()


def _add_images(store: Any, sid: str, count: int, labels: dict[int, str]) -> list[str]:
    ids: list[str] = []
    chunk = 1000
    for start in range(0, count, chunk):
        items = [
            {"name": f"img_{i:05d}.png", "image": _image(i), "label": labels[i]}
            for i in range(start, min(count, start + chunk))
        ]
        ids += [r["image_id"] for r in store.add_images(sid, items)]
    return ids


def _rollouts(rng: random.Random, step: int, image_id: str, truth: str, n: int) -> list[dict]:
    """N rollouts of one image: mostly its answer, some others, a few invalid."""
    concentration = rng.random()
    out = []
    for _ in range(n):
        u = rng.random()
        if u < 0.05:
            answer, response = INVALID, ""
        elif u < 0.05 + 0.95 * concentration:
            answer, response = truth, f"The digit is {truth}."
        else:
            answer = rng.choice(ANSWERS)
            response = f"It looks like {answer}."
        out.append({"answer": answer, "response": response})
    counts = Counter(r["answer"] for r in out)
    freq = {a: c / n for a, c in counts.items()}
    neg_entropy = sum(p * math.log(p) for p in freq.values())
    rewards = [freq[r["answer"]] + 0.75 * neg_entropy if r["answer"] != INVALID else 0.0
               for r in out]  # fmt: skip
    mean = sum(rewards) / n
    return [
        {
            "step": step,
            "image_id": image_id,
            "index": index,
            "response": r["response"],
            "answer": r["answer"],
            "reward": rewards[index],
            "components": {"frequency": freq[r["answer"]], "neg_entropy": neg_entropy},
            "advantage": rewards[index] - mean,
            "trained": True,
            "option_order": None,
        }
        for index, r in enumerate(out)
    ]


def _answers(rng: random.Random, ids: list[str], truth: dict[str, str], flip: float) -> list:
    out = []
    for image_id in ids:
        answer = truth[image_id] if rng.random() > flip else rng.choice(ANSWERS + [INVALID])
        out.append({"image_id": image_id, "response": f"{answer}", "answer": answer})
    return out


def _guard(step: int, phase: str) -> dict[str, Any]:
    signals = {"diversity": 0.8, "letter_spread": 0.9, "invalid": 0.02, "changed": 0.1,
               "kl": 0.001}  # fmt: skip
    return {
        "step": step,
        "phase": phase,
        "action": "keep",
        "reason": "every signal within its bounds",
        "tripped": False,
        "healthy": True,
        "near": "",
        "signals": {"adapted": signals, "watch": signals},
        "base_signals": {"adapted": signals, "watch": signals},
        "rolled_back_to": None,
        "target_step": step,
        "checkpoint": None,
    }


def build_session(
    store: Any, name: str, count: int, n: int, rounds: int, per_step: int, seed: int
) -> str:
    """One synthetic adaptation written as the engine writes it; returns the session id."""
    rng = random.Random(seed)
    config = _config(n, rounds, per_step, seed)
    sid = store.create_session(name, config, config["model"]["model"], config["task"]["kind"])
    labels = {i: rng.choice(ANSWERS) for i in range(count)}
    ids = _add_images(store, sid, count, labels)
    truth = {image_id: labels[i] for i, image_id in enumerate(ids)}
    sink = store.sink(sid)
    sink("run_start", {
        "config": config,
        "images": [{"image_id": i, "name": i[:12]} for i in ids],
        "model": {"name": "synthetic"},
        "split": {"adapt": count, "watch": 0, "watch_ids": [], "note": "synthetic"},
    })  # fmt: skip
    sink("answers", {"phase": "before", "answers": _answers(rng, ids, truth, 0.3)})
    step = 0
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(rounds):
            for start in range(0, count, per_step):
                batch = ids[start : start + per_step]
                rows = [r for i in batch for r in _rollouts(rng, step, i, truth[i], n)]
                sink("rollouts", {"step": step, "rollouts": rows})
                rewards = [r["reward"] for r in rows]
                sink("step", {
                    "step": step, "round": rnd, "reward_mean": statistics.fmean(rewards),
                    "reward_std": statistics.pstdev(rewards), "consensus": rng.random(),
                    "entropy": rng.random(), "invalid_rate": 0.05, "kl": 0.0,
                    "loss": rng.random(), "grad_norm": rng.random(), "lr": 2e-4,
                    "tokens": 16 * n, "seconds": 0.05, "groups": len(batch),
                    "groups_skipped": 0,
                })  # fmt: skip
                if step % 10 == 9:
                    sink("guard", _guard(step, f"step-{step + 1}"))
                step += 1
            sink("answers", {"phase": f"round-{rnd + 1}",
                             "answers": _answers(rng, ids, truth, 0.2)})  # fmt: skip
            sink("guard", _guard(step - 1, f"round-{rnd + 1}"))
            adapter = Path(tmp) / f"adapter-{rnd}.safetensors"
            adapter.write_bytes(b"\0" * 1024)
            sink("checkpoint", {"round": rnd, "step": step - 1, "path": str(adapter)})
    sink("answers", {"phase": "after", "answers": _answers(rng, ids, truth, 0.2)})
    sink("run_end", {"status": "done", "steps": step, "reason": "all rounds done"})
    return sid


def build(store: Any, images: int, n: int, rounds: int, per_step: int) -> dict[str, str]:
    t0 = time.perf_counter()
    a = build_session(store, "scale A", images, n, rounds, per_step, seed=0)
    print(f"  session A: {time.perf_counter() - t0:.1f} s", flush=True)
    b = build_session(store, "scale B", images, n, 1, per_step, seed=1)
    for k in range(3):
        build_session(store, f"small {k}", 20, n, 2, per_step, seed=10 + k)
    print(f"  all sessions: {time.perf_counter() - t0:.1f} s", flush=True)
    return {"a": a, "b": b}


# -- the reads the UI makes ----------------------------------------------------------------


def _image_stats(rollouts: list[dict]) -> dict[str, Any]:
    """ui.charts.image_stats (not imported: the bench must not pull in gradio/plotly)."""
    if not rollouts:
        return {"consensus": None, "invalid": None, "n": 0}
    answers = [r.get("answer") or INVALID for r in rollouts]
    valid = Counter(a for a in answers if a != INVALID)
    n = len(answers)
    return {"consensus": max(valid.values()) / n if valid else 0.0,
            "invalid": sum(a == INVALID for a in answers) / n, "n": n}  # fmt: skip


def _all_image_stats(store: Any, sid: str, rows: list[dict]) -> dict[str, dict]:
    """Per-image consensus/invalid at the latest step, as Inspect's overview gets them."""
    if hasattr(store, "rollout_stats"):  # one query (since migration 0004)
        return store.rollout_stats(sid)
    return {r["image_id"]: _image_stats(store.rollouts(sid, r["image_id"])) for r in rows}


def inspect_overview(store: Any, sid: str, which: str = "all") -> int:
    """ui/inspect_tab.py `refresh`: overview, filter, gallery, guard events."""
    store.get_session(sid)
    rows = store.answers(sid)
    images = {i["image_id"]: i for i in store.images(sid)}
    stats = _all_image_stats(store, sid, rows)
    empty = {"consensus": None, "invalid": None, "n": 0}
    shown = [r for r in rows if _matches(r, stats.get(r["image_id"], empty), which)]
    store.events(sid)
    return len([r for r in shown if images.get(r["image_id"], {}).get("thumb")])


def _matches(row: dict, stats: dict, which: str) -> bool:
    if which == "changed":
        return bool(row.get("flipped"))
    if which == "uncertain":
        return stats.get("consensus") is not None and stats["consensus"] < UNCERTAIN
    return True


def inspect_image(store: Any, sid: str, image_id: str) -> int:
    """ui/inspect_tab.py `show_image`: one image's answers, file, rollouts, config."""
    if hasattr(store, "rollout_stats"):  # answers/images take an image_id since 0004
        row = store.answers(sid, image_id)[0]
        image = store.images(sid, image_id)[0]
    else:
        row = next(r for r in store.answers(sid) if r["image_id"] == image_id)
        image = next(i for i in store.images(sid) if i["image_id"] == image_id)
    rollouts = store.rollouts(sid, image_id)
    store.get_session(sid)
    return len(rollouts) + bool(row) + bool(image)


def adapt_redraw(store: Any, sid: str, active: bool) -> int:
    """ui/adapt_tab.py `redraw` (every 2 s tick while a run is active)."""
    session = store.get_session(sid)
    steps = store.metrics(sid)
    store.converged_images(sid)
    if active and hasattr(store, "answer_phases"):  # has the baseline / final pass run?
        store.answer_phases(sid)
    elif active:
        store.answers(sid)
    else:
        store.events(sid)
    return len(steps) + bool(session)


def compare(store: Any, a: str, b: str) -> int:
    """ui/sessions_tab.py `compare`: both sessions, answers side by side, both curves."""
    data = store.compare(a, b)
    store.metrics(a)
    store.metrics(b)
    return len(data["images"])


def reads(store: Any, ids: dict[str, str], tmp: Path) -> list[tuple[str, Callable[[], Any]]]:
    from sessions import review

    a, b = ids["a"], ids["b"]
    listed = store.images(a)
    one = listed[len(listed) * 43 // 100]["image_id"]
    named = [
        ("Sessions: list_sessions", lambda: store.list_sessions()),
        ("header: get_session(A)", lambda: store.get_session(a)),
        *(
            [("tick: session_state(A)", lambda: store.session_state(a))]
            if hasattr(store, "session_state")
            else []
        ),  # fmt: skip
        ("curves: metrics(A)", lambda: store.metrics(a)),
        ("progress: converged_images(A)", lambda: store.converged_images(a)),
        ("events(A)", lambda: store.events(a)),
        ("events(A, review_applied)", lambda: store.events(a, kind="review_applied")),
        ("answers(A)", lambda: store.answers(a)),
        ("images(A)", lambda: store.images(a)),
        ("rollouts(A, one image)", lambda: store.rollouts(a, one)),
        ("Adapt: redraw, run active", lambda: adapt_redraw(store, a, True)),
        ("Adapt: redraw, run ended", lambda: adapt_redraw(store, a, False)),
        ("Inspect: overview (all)", lambda: inspect_overview(store, a)),
        ("Inspect: filter changed", lambda: inspect_overview(store, a, "changed")),
        ("Inspect: filter uncertain", lambda: inspect_overview(store, a, "uncertain")),
        ("Inspect: one image", lambda: inspect_image(store, a, one)),
        ("Review: queue(A)", lambda: review.queue(store, a)),
        ("Compare: A vs B", lambda: compare(store, a, b)),
        ("Export: dump(A)", lambda: store.dump(a)),
        ("Export: export_session(A)", lambda: store.export_session(a, tmp / "a.zip")),
    ]
    if hasattr(store, "rollout_stats"):  # pages since migration 0004
        named.insert(9, ("answers(A, limit=300)", lambda: store.answers(a, limit=300, offset=300)))
    return named


def time_reads(
    named: list[tuple[str, Callable[[], Any]]], repeats: int
) -> dict[str, dict[str, float]]:
    out = {}
    for name, fn in named:
        t0 = time.perf_counter()
        fn()  # warm-up
        first = time.perf_counter() - t0
        times = []
        for _ in range(1 if first > 2.0 else repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = {"ms": statistics.median(times) * 1000, "first_ms": first * 1000}
        print(f"  {name:34s} {out[name]['ms']:9.1f} ms", flush=True)
    return out


def db_size(store: Any) -> dict[str, int]:
    db = store._db()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    counts = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
              for t in ("rollouts", "steps", "answers", "events", "session_images")}  # fmt: skip
    return {"bytes": store.db_path.stat().st_size, **counts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "ttrv-scale",
                        help="data directory; reused when it already holds the sessions")  # fmt: skip
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--n-rollouts", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images-per-step", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--label", default="run", help="results file: store-scale-<label>.json")
    parser.add_argument("--compare", type=Path, help="an earlier results file to put beside")
    parser.add_argument("--no-export", action="store_true", help="skip the (long) export read")
    args = parser.parse_args(argv)

    from sessions import Store

    manifest = args.data_dir / "bench-sessions.json"
    t0 = time.perf_counter()
    store = Store(args.data_dir)
    opened_s = time.perf_counter() - t0
    if manifest.exists():
        ids = json.loads(manifest.read_text())
        print(f"reusing {args.data_dir} (opened in {opened_s:.2f} s)")
    else:
        print(f"building in {args.data_dir} ...", flush=True)
        ids = build(store, args.images, args.n_rollouts, args.rounds, args.images_per_step)
        manifest.write_text(json.dumps(ids))
    size = db_size(store)
    print(f"database: {size['bytes'] / 2**20:.1f} MiB, "
          + ", ".join(f"{k} {v:,}" for k, v in size.items() if k != "bytes"))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        named = reads(store, ids, Path(tmp))
        if args.no_export:
            named = [(name, fn) for name, fn in named if name != "Export: export_session(A)"]
        timed = time_reads(named, args.repeats)
    store.close()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = {"label": args.label, "open_s": opened_s, "load": load, "db": size, "reads": timed}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"store-scale-{args.label}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    if args.compare:
        print_table(json.loads(args.compare.read_text()), result)
    return 0


def print_table(before: dict, after: dict) -> None:
    buf = io.StringIO()
    buf.write(f"| read | {before['label']} ms | {after['label']} ms |\n| --- | --- | --- |\n")
    for name, row in after["reads"].items():
        old = before["reads"].get(name, {}).get("ms")
        old_text = "-" if old is None else f"{old:,.1f}"
        buf.write(f"| {name} | {old_text} | {row['ms']:,.1f} |\n")
    mib = (before["db"]["bytes"] / 2**20, after["db"]["bytes"] / 2**20)
    buf.write(f"| database size (MiB) | {mib[0]:.1f} | {mib[1]:.1f} |\n")
    sys.stdout.write(buf.getvalue())


if __name__ == "__main__":
    raise SystemExit(main())
