"""`python -m ttrv adapt | answer`: the headless front end of the engine.

Flags are derived from the config dataclasses (`ttrv.config.SECTIONS`); nothing heavy is
imported until a command runs, so `--help` returns fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .config import (
    SECTIONS,
    AdaptConfig,
    ConfigError,
    config_diff,
    convert_value,
    field_choices,
    field_type,
)

# Field names shared by several sections get the section as a prefix (--lora-alpha).
_ALL_NAMES = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]


def flag_name(section: str, name: str) -> str:
    bare = name.replace("_", "-")
    return f"{section}-{bare}" if _ALL_NAMES.count(name) > 1 else bare


def add_config_flags(
    parser: argparse.ArgumentParser,
    sections: list[str] | None = None,
    only: tuple[str, ...] | None = None,
) -> None:
    """One flag per config field (`only`: just these field names). Numbers stay text here:
    `config_from_args` converts them and the dataclass checks them, so a flag is refused
    with the same message as the UI's field."""
    for section in sections or list(SECTIONS):
        cls = SECTIONS[section]
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            if only is not None and f.name not in only:
                continue
            flag = "--" + flag_name(section, f.name)
            dest = f"{section}.{f.name}"
            help_text = f.metadata.get("help", "") + f" (default: {f.default})"
            typ = field_type(cls, f.name)
            if typ is bool:
                group.add_argument(
                    flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                    help=help_text,
                )  # fmt: skip
            else:
                group.add_argument(
                    flag, dest=dest, choices=field_choices(cls, f.name), default=None,
                    help=help_text, metavar=None if field_choices(cls, f.name) else typ.__name__.upper(),
                )  # fmt: skip


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> AdaptConfig:
    """Flags override a base config (e.g. from --config JSON); unset flags keep it."""
    data: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (base or {}).items()}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            data.setdefault(section, {})[name] = convert_value(SECTIONS[section], name, value)
    return AdaptConfig.from_dict(data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ttrv",
        description="Test-time reinforcement learning (TTRV) for vision-language models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("adapt", help="adapt a model to unlabeled images (LoRA + GRPO)")
    p.add_argument("images", nargs="*", help="image files or folders (default: demo images)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<time>)")
    p.add_argument("--config", type=Path, help="JSON config (flags override it)")
    p.add_argument("--labels", type=Path, help="CSV file,label used only for evaluation")
    p.add_argument("--resume", type=Path, help="resume from a checkpoint folder")
    p.add_argument("--store", action="store_true", help="also record the run as an app session")
    p.add_argument("--data-dir", type=Path, help="session store folder (with --store)")
    p.add_argument("--name", help="session name (with --store)")
    p.add_argument(
        "--session",
        metavar="ID",
        help="run a session the app created, with its own config and images, recorded in "
        "it (the app starts runs on several devices this way; --data-dir names its store)",
    )
    p.add_argument(
        "--review",
        type=int,
        default=0,
        metavar="N",
        help="after the run, play a reviewer who marks up to N changed answers (seeded "
        "random) from --labels, then keep the adapter or roll back as the verdict says",
    )
    add_config_flags(p)

    a = sub.add_parser("answer", help="answer images greedily, with or without an adapter")
    a.add_argument("images", nargs="*", help="image files or folders (default: demo images)")
    a.add_argument("--adapter", type=Path, help="adapter folder written by `adapt`")
    a.add_argument("--labels", type=Path, help="CSV file,label to score the answers")
    a.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    add_config_flags(a, ["model", "task"])
    # The answer length is the rollouts' (RolloutConfig.max_new_tokens): declared once, so
    # `answer --adapter` answers as the run's own before/after answers did.
    add_config_flags(a, ["rollout"], only=("max_new_tokens",))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        if args.command == "adapt":
            return cmd_adapt(args, argv)
        return cmd_answer(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # once, not once per process
            print("interrupted" + _resume_hint(args), file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a CLI shows a clean message, not a traceback
        from .images import ImageError
        from .loading import ModelLoadError

        if isinstance(e, ImageError | ModelLoadError | FileNotFoundError | ValueError):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


# -- commands ------------------------------------------------------------------------------


def _load_items(paths: list[str], labels: Path | None, quiet: bool = False) -> list[Any]:
    from .images import load_items

    if not paths:
        from .config import BUNDLED_MODEL

        demo = Path(BUNDLED_MODEL).parent.parent / "demo" / "digits"
        paths = [str(demo)]
        if labels is None and (demo / "labels.csv").exists():
            labels = demo / "labels.csv"
    items, warnings = load_items(paths, labels_csv=labels)
    for w in warnings if not quiet else ():  # once, not once per process
        print(f"warning: {w}", file=sys.stderr)
    return items


def _warn_labels(items: list[Any], cfg: AdaptConfig) -> None:
    """Labels that are no answer of the task are not scored: said, with examples."""
    from .evaluate import unscorable_labels

    odd = unscorable_labels(items, cfg.task)
    if odd:
        shown = ", ".join(repr(x) for x in odd[:3]) + (", ..." if len(odd) > 3 else "")
        print(f"warning: {len(odd)} label value(s) are no answer of this "
              f"{cfg.task.kind.replace('_', ' ')} task ({shown}): those images are not "
              "scored (the labels must be answers the task asks for)", file=sys.stderr)  # fmt: skip


def _warn_task(cfg: AdaptConfig) -> None:
    """The app's notes on asking this model this task (`ttrv.digits.task_notes`)."""
    from .digits import task_notes

    for note in task_notes(cfg.model.model, cfg.task):
        print(f"warning: {note}", file=sys.stderr)


def _warn_images(items: list[Any], cfg: AdaptConfig) -> None:
    """As the app warns: for the digits model, the images unlike its training data."""
    from .digits import is_digits_model, unlike_training_digits

    if not is_digits_model(cfg.model.model):
        return
    off = [(it.name, r) for it in items if (r := unlike_training_digits(it.image))]
    if off:
        named = "; ".join(f"{n} ({', '.join(r)})" for n, r in off[:5])
        more = f"; and {len(off) - 5} more" if len(off) > 5 else ""
        print(f"warning: {len(off)} of {len(items)} images do not look like what this model "
              f"was trained on (8x8 grey handwritten digits, dark on white): {named}{more}. "
              "It answers a digit (or junk) for anything; adapting on them teaches it nothing "
              "useful.", file=sys.stderr)  # fmt: skip


def _progress(total: int):
    """A sink that prints one line per step with rate and ETA."""
    start = time.perf_counter()

    def sink(kind: str, data: dict[str, Any]) -> None:
        if kind == "step":
            done = data["step"] + 1
            elapsed = time.perf_counter() - start
            eta = elapsed / done * max(0, total - done)
            print(
                f"step {done}/{total}  reward {data['reward_mean']:.3f}  "
                f"consensus {data['consensus']:.2f}  invalid {data['invalid_rate']:.2f}  "
                f"loss {data['loss']:+.4f}  {data['seconds']:.2f}s/step  eta {eta:.0f}s",
                file=sys.stderr,
            )
        elif kind == "answers":
            print(f"answered {len(data['answers'])} images ({data['phase']})", file=sys.stderr)
        elif kind == "guard":
            print(
                f"guard at step {data['step']}: {data['action']}: {data['reason']}", file=sys.stderr
            )
        elif kind == "forecast":
            print(f"forecast: {data['message']}", file=sys.stderr)
        elif kind == "run_start" and data.get("split"):
            print(data["split"]["note"], file=sys.stderr)
        elif kind == "checkpoint":
            print(f"checkpoint: {data['path']}", file=sys.stderr)

    return sink


class _Unrecorded:
    """The run recorder without `--store`: the output folder is the whole record. Has the
    interface of `sessions.runs.Run`, which records the run as an app session."""

    def __enter__(self) -> _Unrecorded:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def sink(self, kind: str, data: dict[str, Any]) -> None:
        return None

    def stop_requested(self) -> bool:
        return False

    def record_review(self, review: dict[str, Any]) -> None:
        return None

    def finish(self, result: Any, adapter: Path) -> str:
        return result.status


def _store_front_end() -> Any:
    """`sessions.runs`, the one recorded-run lifecycle the app's worker uses too. Looked up
    when `--store` is given, by name, so that the engine package (`ttrv`) does not depend
    on the session store: it runs without it."""
    import importlib

    return importlib.import_module("sessions.runs")


def cmd_adapt(args: argparse.Namespace, argv: list[str]) -> int:
    from .distributed import current, launched

    if args.session:
        return _adapt_session(args, argv)
    # A resumed run continues with its own settings (its output folder's config.json),
    # not the defaults; flags given now override them, and each change is said.
    saved = _run_config(args.resume) if args.resume else None
    base = json.loads(args.config.read_text()) if args.config else saved
    cfg = config_from_args(args, base)
    if saved is not None:
        if args.out is None:  # the same folder: its checkpoints, events and adapter
            args.out = _run_folder(args.resume)
        run = AdaptConfig.from_dict(saved).to_dict()  # an older run's file, completed
        args.notes = [f"resuming with {d['key']} = {d['b']!r} (the run had {d['a']!r})"
                      for d in config_diff(run, cfg.to_dict())]  # fmt: skip
        relaunching = cfg.model.data_parallel() > 1 and not launched()
        if not relaunching and os.environ.get("RANK", "0") == "0":  # said once
            for note in args.notes:
                print(f"warning: {note}", file=sys.stderr)
    if args.review < 0:
        raise ConfigError(f"--review must be >= 0 (got {args.review}).")
    if not args.resume and args.out is not None and (args.out / "events.jsonl").exists():
        # A second run there would replace its adapter and mix two runs' events and
        # checkpoints (which --resume could then pick from the wrong run).
        raise ConfigError(
            f"{args.out} already holds a run: give another --out, or continue that run with "
            f"--resume {args.out / 'checkpoints'}/<its latest>."
        )
    relaunched = _launch_if_asked(cfg, argv)
    if relaunched is not None:
        return relaunched
    dist = current()  # joins the launcher's group, if any, before the model is loaded
    items = _load_items(args.images, args.labels, quiet=not dist.is_main)
    if dist.is_main:
        _warn_labels(items, cfg)
        _warn_images(items, cfg)
    if args.review and not any(it.label is not None for it in items):
        raise ConfigError(
            "--review plays a reviewer from the labels: give --labels CSV."
            if args.labels is None
            else f"--review plays a reviewer from the labels, but no row of {args.labels} "
            "names one of these images (its file column holds names like 0001.png, or "
            "paths relative to the image folder)."
        )
    return _adapt_in_group(args, cfg, items, dist, runs=_store_front_end() if args.store else None)


def _resume_hint(args: argparse.Namespace) -> str:
    """How to continue an interrupted `adapt` from its latest checkpoint, if it has one."""
    out = getattr(args, "out", None)
    if getattr(args, "command", None) != "adapt" or out is None:
        return ""
    if getattr(args, "session", None):
        return "; resume it from the app (Adapt tab, Resume)"
    saved = sorted(
        (Path(out) / "checkpoints").glob("*/state.json"), key=lambda p: p.stat().st_mtime
    )
    if not saved:
        return " (no checkpoint was saved yet: start again)"
    command = ["python -m ttrv adapt", *args.images, "--resume", str(saved[-1].parent)]
    return "; continue with: " + " ".join(command)


def _run_folder(checkpoint: Path) -> Path:
    """The output folder of the run a checkpoint (`<out>/checkpoints/<tag>`) belongs to."""
    return Path(checkpoint).resolve().parent.parent


def _run_config(checkpoint: Path) -> dict[str, Any] | None:
    """The config.json of the run a checkpoint belongs to (None when it has none)."""
    path = _run_folder(checkpoint) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stop_check(recorder: Any, sink: Any) -> Any:
    """The run's stop question: the recorder's (a stop asked in the app), or the app that
    started this run being gone (`ttrv.launch.WATCH_PID_ENV`), said once as a warning."""
    from .launch import watched_process_gone

    said = False

    def stop() -> bool:
        nonlocal said
        if watched_process_gone():
            if not said:
                sink("warning", {"message": "The app that started this run is gone: stopping "
                                 "after this step (resume it from the app)."})  # fmt: skip
                said = True
            return True
        return bool(recorder.stop_requested())

    return stop


def _launch_if_asked(cfg: AdaptConfig, argv: list[str]) -> int | None:
    """Outside a launcher: refuse devices this machine lacks (before images are read or
    processes start), then, when the config asks for several processes, run this command
    under the launcher and return its exit status; None to run here."""
    from .distributed import launched

    if launched():
        return None
    from .placement import check_gpus

    check_gpus(cfg.model)
    return _relaunch(cfg, argv) if cfg.model.data_parallel() > 1 else None


def _relaunch(cfg: AdaptConfig, argv: list[str]) -> int:
    """This same command again, under `accelerate launch` in as many processes as the
    config asks for (`ttrv.launch`); its exit status is this one's."""
    import subprocess

    import torch

    from .launch import launch_command

    command, env = launch_command(cfg.model, argv, cuda_available=torch.cuda.is_available())
    print(f"starting {cfg.model.data_parallel()} processes: {' '.join(command)}", file=sys.stderr)
    child = subprocess.Popen(command, env={**os.environ, **env})
    try:
        return child.wait()
    except KeyboardInterrupt:
        # The launcher got the terminal's Ctrl-C too and stops the run's processes (torch
        # starts them in sessions of their own: they never see it). Wait for that, so
        # that the prompt comes back when they are gone, not before.
        try:
            return child.wait(timeout=60)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            child.terminate()
            return child.wait()


def _adapt_session(args: argparse.Namespace, argv: list[str]) -> int:
    """`adapt --session ID`: the session's own config and images (read by the main
    process, handed to the others), recorded in that session."""
    from .distributed import current

    given = {"images": args.images, "--config": args.config, "--labels": args.labels,
             "--review": args.review, "--store": args.store, "--name": args.name}  # fmt: skip
    given.update({f"--{flag_name(*k.split('.', 1))}": v for k, v in vars(args).items()
                  if "." in k and v is not None})  # fmt: skip
    extra = [name for name, value in given.items() if value]
    if extra:
        raise ConfigError(
            f"--session runs a session with its own config and images, so {', '.join(extra)} "
            "cannot go with it: give only --data-dir, --out and --resume."
        )
    runs = _store_front_end()
    dist = current()
    data: Any = None
    if dist.is_main:
        try:
            data = runs.session_data(args.data_dir, args.session)
        except runs.StoreError as e:  # said by every process, not left waiting for data
            data = str(e)
    data = dist.broadcast(data)
    if isinstance(data, str):
        raise ValueError(data)
    cfg = AdaptConfig.from_dict(data[0])
    relaunched = _launch_if_asked(cfg, argv)  # an imported session may name absent GPUs
    if relaunched is not None:
        return relaunched
    return _adapt_in_group(args, cfg, runs.load_session_items(data[1]), dist, runs=runs)


def _adapt_in_group(
    args: argparse.Namespace, cfg: AdaptConfig, items: list[Any], dist: Any, runs: Any
) -> int:
    """The run on this process (one of `dist.size`): only the main process writes."""
    # The main process's folder name for all: a default name is the time, which can differ.
    out = dist.broadcast(args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    args.out = out  # for the resume hint of an interrupted run
    if dist.is_main:  # only the main process writes: the folder, events, store, adapter
        _warn_task(cfg)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    runs = runs if dist.is_main else None
    # The store's errors (a full disk among them) carry a message that says what to do.
    store_errors: tuple[type[BaseException], ...] = (
        (runs.StoreError, runs.DiskFullError) if runs else ()
    )
    try:
        return _adapt_recorded(args, cfg, items, out, runs, dist)
    except store_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        dist.close()


def _adapt_recorded(
    args: argparse.Namespace,
    cfg: AdaptConfig,
    items: list[Any],
    out: Path,
    runs: Any,
    dist: Any,
) -> int:
    from .adapt import adapt, steps_per_run
    from .evaluate import accuracy
    from .events import JsonlSink, fanout, null_sink, rewind_jsonl
    from .loading import load_model
    from .lora import attach_lora, save_adapter

    if not dist.is_main:  # the main process shows progress; the others stay quiet
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    planned = steps_per_run(cfg, len(items))
    recorder: Any = _Unrecorded()
    if runs is not None:
        # The session first: a resume into a session that is still running elsewhere is
        # refused before the model is loaded.
        if args.session:
            recorder = runs.session_run(args.data_dir, args.session, out, args.resume)
        else:
            recorder = runs.cli_run(args.data_dir, out, cfg, items, args.name, args.resume)
        print(f"session {recorder.session_id} in {recorder.store.data_dir}", file=sys.stderr)
    with recorder:
        if dist.is_main:
            print(f"loading {cfg.model.model} ...", file=sys.stderr)
        loaded = load_model(cfg.model)
        loaded.model = attach_lora(loaded.model, cfg.lora, seed=cfg.optim.seed)
        sink: Any = null_sink  # the other processes' events are the main process's
        if dist.is_main:
            if args.resume:  # the same folder: its log as of the checkpoint, then this run's
                rewind_jsonl(out / "events.jsonl", args.resume)
            jsonl = JsonlSink(out / "events.jsonl")
            sink = fanout(jsonl, _progress(planned), recorder.sink)
            for note in getattr(args, "notes", ()):  # kept with the run (and its session)
                jsonl("warning", {"message": note})
                recorder.sink("warning", {"message": note})
        result = adapt(
            loaded, items, cfg, sink, _stop_check(recorder, sink), output_dir=out,
            resume_from=args.resume, dist=dist,
        )  # fmt: skip
        if not dist.is_main:  # the main process holds the same weights and writes them
            return 0
        # What the run changed, before a review may revert it.
        changed = sum(
            b["answer"] != a["answer"] for b, a in zip(result.before, result.after, strict=True)
        )
        accuracy_before = accuracy(result.before, items, cfg.task)
        accuracy_run = accuracy(result.after, items, cfg.task)
        review = None
        if args.review:
            review = play_review(loaded.model, result, items, cfg, args.review, out)
            jsonl("review", review)
            recorder.record_review(review)
        # The adapter is on disk before the session may say "done".
        adapter = save_adapter(loaded.model, out / "adapter")
        recorder.finish(result, adapter)
    summary = {
        "status": result.status,
        "reason": result.reason,
        "steps": result.steps,
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_run,
        "changed": changed,
        "images": len(items),
        "adapter": str(adapter),
        "watch_pool": len(result.split.watch) if result.split else 0,
        # the step whose weights a guard trip restored (0: the unadapted model), else null
        "rolled_back_to": result.target_step if result.status == "guard_stopped" else None,
        "review": review,
        # a reverted run answers as before adaptation
        "accuracy_final": (
            accuracy_before if review and review["applied"] == "revert" else accuracy_run
        ),
        "processes": dist.size,
        "planned_steps": planned,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "answers.json").write_text(
        json.dumps({"before": result.before, "after": result.after}, indent=1)
    )
    print(_summary_text(summary, out))
    return 0


def play_review(
    model: Any, result: Any, items: list[Any], cfg: AdaptConfig, n: int, out: Path
) -> dict[str, Any]:
    """A reviewer who knows the labels marks up to `n` flips (seeded order), then the
    verdict is applied: keep the adapter, or put the unadapted weights back (the adapted
    ones are kept in `adapter-rejected/`) and make the answers after equal those before."""
    from .adapt import unadapted_state
    from .evaluate import gold
    from .lora import load_adapter_state, save_adapter
    from .review import labelled_review

    before = {b["image_id"]: b["answer"] for b in result.before}
    after = {a["image_id"]: a["answer"] for a in result.after}
    labels = {it.image_id: g for it in items  # scorable labels only
              if it.label is not None and (g := gold(it.label, cfg.task)) is not None}  # fmt: skip
    marks, v = labelled_review(before, after, labels, cfg.optim.seed, n)
    applied = "keep"
    if v.recommendation == "revert":
        save_adapter(model, out / "adapter-rejected")
        load_adapter_state(model, unadapted_state(model))
        result.after = [dict(b) for b in result.before]
        applied = "revert"
    return {"marks": marks, "verdict": v.to_dict(), "applied": applied}


def _summary_text(s: dict[str, Any], out: Path) -> str:
    ended = {"done": "finished", "guard_stopped": "rolled back by the guard"}
    lines = [f"{ended.get(s['status'], s['status'])} after {s['steps']} steps: {s['reason']}"]
    planned = s.get("planned_steps") or 0
    if s["status"] == "done" and s["steps"] < planned:
        lines.append(
            f"({planned - s['steps']} of the {planned} planned steps were not needed: images "
            "whose rollouts all agreed were skipped in later rounds)"
        )
    reverted = bool(s.get("review")) and s["review"]["applied"] == "revert"
    if s["status"] == "guard_stopped" and s["rolled_back_to"] == 0 or reverted:
        lines.append("kept: nothing - the saved adapter answers as the unadapted model")
    elif s["status"] == "guard_stopped":
        lines.append(
            f"kept: the weights after step {s['rolled_back_to']} (the last clearly healthy "
            "guard check)"
        )
    lines.append(f"{s['changed']} of {s['images']} greedy answers changed")
    if s["accuracy_before"] is not None:
        lines.append(
            f"accuracy (labels, evaluation only): {s['accuracy_before']:.1%} -> "
            f"{s['accuracy_after']:.1%}"
        )
    if s.get("review"):
        lines.append(f"review: {s['review']['verdict']['message']}")
        applied = s["review"]["applied"]
        if applied == "revert":
            lines.append("review applied: reverted to the unadapted model (the adapted weights "
                         "are in adapter-rejected/)")  # fmt: skip
        elif s["status"] == "guard_stopped" and s["rolled_back_to"] == 0:
            lines.append("review: nothing to keep or revert (the guard already restored the "
                         "unadapted model)")  # fmt: skip
        else:
            lines.append("review applied: keep the adapter")
    lines.append(f"events, answers and adapter in {out}")
    return "\n".join(lines)


def cmd_answer(args: argparse.Namespace) -> int:
    from .images import ImageError

    cfg = config_from_args(args)
    _warn_task(cfg)
    try:
        items = _load_items(args.images, args.labels)
        _warn_labels(items, cfg)
        _warn_images(items, cfg)
    except ImageError as e:
        # Said here, before loading the model imports torch (seconds, hundreds of MB);
        # `main` would import the model loader just to recognise this error.
        print(f"error: {e}", file=sys.stderr)
        return 1
    from .adapt import make_policy
    from .evaluate import accuracy, correct
    from .loading import load_model
    from .lora import load_adapter
    from .rollout import greedy_answers
    from .screening import screen_items

    loaded = load_model(cfg.model)
    if args.adapter:
        loaded.model = load_adapter(loaded.model, args.adapter, trainable=False)
    policy = make_policy(loaded)
    # Images this model's processor refuses are skipped, by name, before any is answered.
    items, rejected = screen_items(policy, items, cfg.task)
    for r in rejected:
        print(f"warning: {r.message}; skipped", file=sys.stderr)
    if not items:
        print("error: the model cannot use any of the given images (see above)", file=sys.stderr)
        return 1
    answers = greedy_answers(policy, items, cfg.task, cfg.rollout)
    for it, a in zip(items, answers, strict=True):
        if args.json:
            print(json.dumps({"name": it.name, **a, "label": it.label}))
        else:
            verdict = None if it.label is None else correct(a["answer"], it.label, cfg.task)
            mark = {True: "  ok", False: "  x", None: ""}[verdict]
            print(f"{it.name:30s} {a['answer']:12s} {a['response']!r}{mark}")
    acc = accuracy(answers, items, cfg.task)
    if acc is not None:
        scored = sum(it.label is not None and correct(a["answer"], it.label, cfg.task) is not None
                     for it, a in zip(items, answers, strict=True))  # fmt: skip
        print(f"accuracy: {acc:.1%} on {scored} labelled images", file=sys.stderr)
    return 0
