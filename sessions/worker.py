"""The background worker: owns the loaded model and runs the store's job queue.

One thread, one model (loaded once, reloaded only when a job asks for another), jobs taken
from the store in order; a second thread takes the light jobs (`jobs.LIGHT_KINDS`: a prompt
preview needs the processor, never the model), so they do not wait for a running adaptation. Every job reports through the store: progress through the engine's
sink, state through session and job rows. Nothing else talks to the worker, so the UI stays
responsive and a closed tab cannot stop or orphan a run.

Failure policy: an exception or an out-of-memory error inside a job marks that job (and
its session) failed with the error text and traceback, keeps everything written so far,
frees accelerator memory, and leaves the worker ready for the next job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import logging
import os
import signal
import threading
import time
import traceback as tb
from pathlib import Path
from typing import Any

from . import jobs, review, runs
from .paths import LAUNCH_LOG
from .runs import oom_message as _oom_message
from .schema import ACTIVE_STATUSES
from .store import Store

log = logging.getLogger(__name__)

# Statuses of a session whose adaptation failed before its `runs.Run` took it over.
NOT_TAKEN_OVER = ("queued", "interrupted")
PROJECT_ROOT = Path(__file__).resolve().parent.parent  # where `python -m ttrv` is found
WATCH_S = 0.5  # how often a waiting worker looks for a stop asked while a run starts


def free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass


@functools.lru_cache(maxsize=4)
def cached_processor(source: str, trust_remote_code: bool) -> Any:
    """The processor of a model (no weights). Raises ttrv.loading.ModelLoadError."""
    from transformers import AutoConfig

    from ttrv.loading import load_processor

    local = Path(source).expanduser()
    config_file = local / "config.json"
    if config_file.is_file():
        model_type = json.loads(config_file.read_text())["model_type"]
    else:
        model_type = AutoConfig.from_pretrained(
            source, trust_remote_code=trust_remote_code
        ).model_type
    return load_processor(str(local) if local.is_dir() else source, model_type, trust_remote_code)


def render_preview(request: dict[str, Any]) -> dict[str, Any]:
    """The exact prompt text of a preview request ({"model", "trust_remote_code", "task":
    a TaskConfig dict, "item": image_id, name, question, options}) through the model's chat
    template: {"prompt", "options", "note"}; when the template is unavailable, the user
    text alone with `note` saying why."""
    from ttrv.config import AdaptConfig
    from ttrv.tasks import Item, build_prompt, render_prompt

    task = AdaptConfig.from_dict({"task": request["task"]}).task
    item = Item(image=None, **request["item"])  # build_prompt never looks at the pixels
    prompt = build_prompt(task, item)
    try:
        processor = cached_processor(request["model"], bool(request.get("trust_remote_code")))
        text, note = render_prompt(processor, prompt), None
    except Exception as exc:  # noqa: BLE001 - the user text is still worth showing
        text, note = prompt.text, f"{type(exc).__name__}: {str(exc)[:200]}"
    return {"prompt": text, "options": list(prompt.options), "note": note}


class Worker:
    """Runs jobs from `store` on a daemon thread. `start()` then leave it be."""

    def __init__(self, store: Store, poll_s: float = 0.25) -> None:
        self.store = store
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._children: set[Any] = set()  # the launched processes of a data-parallel run
        self._children_lock = threading.Lock()
        self._light: threading.Thread | None = None
        self.loaded: Any = None  # ttrv.loading.LoadedModel with a LoRA adapter attached
        self._loaded_key: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Worker:
        if self.store.read_only:  # browsing only: no job can be claimed or recorded
            log.warning("the data directory %s is read-only: no jobs run", self.store.data_dir)
            return self
        runs.mark_interrupted(self.store)
        jobs.recover(self.store)
        self._thread = threading.Thread(target=self._loop, name="ttrv-worker", daemon=True)
        self._light = threading.Thread(target=self._loop, args=(jobs.LIGHT_KINDS,),
                                       name="ttrv-worker-light", daemon=True)  # fmt: skip
        self._thread.start()
        self._light.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        # A data-parallel run goes down with the app, as an in-process run does (its session
        # is then marked interrupted, and can be resumed). SIGTERM, not SIGKILL: the
        # launcher passes it on to the run's processes, which torch starts in their own
        # sessions.
        with self._children_lock:  # a run starting now sees _stop and starts nothing
            for child in list(self._children):
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signal.SIGTERM)
        for thread in (self._thread, self._light):
            if thread:
                thread.join(timeout)

    def _loop(self, kinds: tuple[str, ...] | None = None) -> None:
        while not self._stop.is_set():
            try:
                job = jobs.claim_next(self.store, kinds)
            except Exception:  # noqa: BLE001 - a store hiccup must not kill the worker
                log.exception("claiming a job failed")
                job = None
            if job is None:
                self._stop.wait(self.poll_s)
                continue
            self.run_job(job)

    def run_job(self, job: dict[str, Any]) -> None:
        """Run one claimed job to completion, recording the outcome in the store."""
        sid = job.get("session_id")
        try:
            handler = getattr(self, f"_job_{job['kind']}")
            result = handler(job)
            jobs.finish(self.store, job["id"], "done", result=result)
        except BaseException as exc:  # noqa: BLE001 - every failure is recorded, then we go on
            trace = tb.format_exc()
            message = runs.failure_message(exc)
            log.error("job %s failed: %s", job["id"], message)
            jobs.finish(self.store, job["id"], "failed", error=message, traceback=trace)
            # An adaptation's `runs.Run` records its own end (once); other jobs, and an
            # adaptation that failed before its run took the session over, end here.
            if sid is not None:
                with contextlib.suppress(Exception):
                    if job["kind"] != "adapt" or self.store.status(sid) in NOT_TAKEN_OVER:
                        self.store.set_status(sid, "failed", error=message, traceback=trace)
            if _oom_message(exc):
                self._drop_model()
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
        finally:
            free_memory()

    # -- the model ---------------------------------------------------------------------------

    def _drop_model(self) -> None:
        self.loaded, self._loaded_key = None, None
        free_memory()

    def ensure_model(self, model_cfg: dict[str, Any], lora_cfg: dict[str, Any], seed: int) -> Any:
        """The loaded model for this config, with a fresh LoRA adapter."""
        from ttrv.config import LoraConfig, ModelConfig
        from ttrv.loading import load_model
        from ttrv.lora import attach_lora

        key = json.dumps(model_cfg, sort_keys=True)
        if self._loaded_key != key:
            self._drop_model()
            loaded = load_model(ModelConfig(**model_cfg))
            self.loaded, self._loaded_key = loaded, key
        base = self.loaded.model
        unload = getattr(base, "unload", None)
        if callable(unload) and hasattr(base, "peft_config"):
            base = unload()  # drop the previous session's adapter (nothing merged)
        self.loaded.model = attach_lora(base, LoraConfig(**lora_cfg), seed=seed)
        return self.loaded

    # -- jobs ----------------------------------------------------------------------------------

    def _job_load_model(self, job: dict[str, Any]) -> dict[str, Any]:
        from ttrv.loading import gpu_memory_mib, parameter_counts

        req = job["request"]
        loaded = self.ensure_model(req["model"], req.get("lora") or {}, seed=0)
        # Counted after the adapter is attached: what a run will train, not the frozen base.
        total, trainable = parameter_counts(loaded.model)
        info = dict(loaded.info, total_params=total, trainable_params=trainable)
        info["gpu_memory_mib"] = gpu_memory_mib(loaded.device)
        return {"info": info}

    def _session_setup(self, sid: str) -> tuple[Any, list[Any], Any]:
        from ttrv.config import AdaptConfig

        session = self.store.get_session(sid)
        cfg = AdaptConfig.from_dict(session["config"])
        items = self.session_items(sid)
        parts = cfg.to_dict()
        self._check_imported_model(sid, parts["model"]["model"])
        loaded = self.ensure_model(parts["model"], parts["lora"], seed=cfg.optim.seed)
        shown = {e["data"].get("message") for e in self.store.events(sid, kind="warning")}
        for message in getattr(loaded, "info", {}).get("warnings", ()):  # e.g. pickle weights
            if message not in shown:  # once per session, not once per job
                self.store.sink(sid)("warning", {"message": message})
        return cfg, items, loaded

    def _check_imported_model(self, sid: str, model: str) -> None:
        """Refuse to load (or download) a model an imported archive names but this machine
        does not have; see `sessions.archive.imported_model_problem`."""
        from .archive import imported_model_problem

        problem = imported_model_problem(self.store, sid, model)
        if problem:
            raise FileNotFoundError(problem)

    def session_items(self, sid: str) -> list[Any]:
        return runs.load_session_items(runs.image_rows(self.store, sid))

    def _job_adapt(self, job: dict[str, Any]) -> dict[str, Any]:
        from ttrv.adapt import adapt
        from ttrv.config import AdaptConfig
        from ttrv.lora import save_adapter

        sid = job["session_id"]
        resume = None
        if job["request"].get("resume"):
            ckpt = self.store.latest_checkpoint(sid)
            if ckpt is None or ckpt["missing"]:
                # Said before the run takes the session over (which would mark it failed).
                raise FileNotFoundError(
                    "No checkpoint to resume from: start the adaptation again instead."
                )
            resume = ckpt["path"]
        model = AdaptConfig.from_dict(self.store.get_session(sid)["config"]).model
        if model.data_parallel() > 1:
            return self._adapt_launched(sid, model, resume, job.get("started") or "")
        with runs.Run(self.store, sid, resume_from=resume) as run:
            cfg, items, loaded = self._session_setup(sid)
            out = self.store.adapter_dir(sid)
            result = adapt(
                loaded, items, cfg, run.sink, run.stop_requested, output_dir=out,
                resume_from=resume,
            )  # fmt: skip
            adapter = result.checkpoint
            if adapter is None:
                adapter = save_adapter(loaded.model, out / f"final-step-{result.steps}")
            run.finish(result, adapter)
        return {"status": result.status, "steps": result.steps, "reason": result.reason}

    def _adapt_launched(
        self, sid: str, model: Any, resume: str | None, claimed: str
    ) -> dict[str, Any]:
        """A data-parallel run: `python -m ttrv adapt --session` under `accelerate launch`
        (`ttrv.launch`) on the session's devices, recorded by its main process exactly as
        an in-process run records itself (`runs.Run`: heartbeat, stop requests, the end).
        This thread waits for it; the model this worker holds is dropped first so that the
        run's processes get the devices. The launcher's output goes to `launch.log` in
        the session's adapter folder; an exit without a recorded end fails the session
        with its last lines."""
        import subprocess

        import torch

        from ttrv.launch import WATCH_PID_ENV, launch_command
        from ttrv.placement import check_gpus

        self._check_imported_model(sid, model.model)
        check_gpus(model)  # e.g. a resumed or imported session naming GPUs this box lacks
        self._drop_model()
        out = self.store.adapter_dir(sid)
        out.mkdir(parents=True, exist_ok=True)
        args = ["adapt", "--session", sid, "--data-dir", str(self.store.data_dir), "--out",
                str(out), *(["--resume", str(resume)] if resume else [])]  # fmt: skip
        command, env = launch_command(model, args, cuda_available=torch.cuda.is_available())
        log_path = out / LAUNCH_LOG
        with log_path.open("ab") as log_file:
            log_file.write(f"$ {' '.join(command)}\n".encode())
            log_file.flush()
            # The run watches this process (WATCH_PID_ENV): if the app dies without shutting
            # down, the run stops after its step instead of training on, unseen.
            env[WATCH_PID_ENV] = str(os.getpid())
            with self._children_lock:
                if self._stop.is_set():  # shut down meanwhile: start nothing it cannot stop
                    raise RuntimeError("The app is closing: the run was not started.")
                child = subprocess.Popen(
                    command, stdout=log_file, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
                    env={**os.environ, **env}, start_new_session=True,
                )  # fmt: skip
                self._children.add(child)
            try:
                code, stopped_early = self._wait_for_run(child, sid, claimed)
            finally:
                with self._children_lock:
                    self._children.discard(child)
        session = self.store.get_session(sid)
        if self._stop.is_set():  # the app is closing: marked interrupted when it next starts
            return {"status": session["status"], "exit_code": code}
        unended = session["status"] in (*NOT_TAKEN_OVER, *ACTIVE_STATUSES)
        if stopped_early and unended:
            self.store.set_status(sid, "stopped", reason="stopped before it started")
            return {"status": "stopped", "reason": "stopped before it started", "exit_code": code}
        if unended:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-8:]
            message = (
                f"The {model.data_parallel()}-process run ended (exit code {code}) before "
                f"recording its end; its log is {log_path}. Last lines:\n" + "\n".join(tail)
            )
            self.store.set_status(sid, "failed", error=message)
            raise RuntimeError(message)
        return {"status": session["status"], "reason": session.get("reason"),
                "processes": model.data_parallel(), "exit_code": code}  # fmt: skip

    def _wait_for_run(self, child: Any, sid: str, claimed: str) -> tuple[int, bool]:
        """Wait for a launched run: (exit code, stopped before it started). A stop asked
        while its processes start (`jobs.request_stop` leaves a STOP_BEFORE_START event,
        after `claimed`, when the job was claimed) is passed on once the run has taken the
        session over, or ends the launch if it has not by the time it is seen."""
        import subprocess

        while True:
            try:
                return child.wait(timeout=WATCH_S), False
            except subprocess.TimeoutExpired:
                pass
            # The status first: once the run has begun, a stop asked later reaches it the
            # usual way (request_stop sees it running), and one asked earlier left its event.
            begun = self.store.status(sid) in ACTIVE_STATUSES
            asked = any(e["created"] >= claimed
                        for e in self.store.events(sid, kind=jobs.STOP_BEFORE_START))  # fmt: skip
            if asked and not begun:
                child.send_signal(signal.SIGTERM)  # the launcher stops its processes
                return child.wait(), True
            if asked:
                jobs.request_stop(self.store, sid)
            if begun:  # nothing left to watch for: the run answers stops itself
                return child.wait(), False

    def _answer_phase(self, sid: str, phase: str, with_adapter: bool) -> dict[str, Any]:
        from ttrv.adapt import load_adapter_weights, make_policy
        from ttrv.rollout import greedy_answers

        cfg, items, loaded = self._session_setup(sid)
        reverted, ckpt = review.result_adapter(self.store, sid)
        if with_adapter and not reverted:
            if ckpt is None:
                raise FileNotFoundError("This session has no adapter yet: adapt first.")
            load_adapter_weights(loaded.model, ckpt["path"])
        answers = greedy_answers(make_policy(loaded), items, cfg.task, cfg.rollout)
        self.store.sink(sid)("answers", {"phase": phase, "answers": answers})
        return {"answers": len(answers)}

    def _job_baseline(self, job: dict[str, Any]) -> dict[str, Any]:
        return self._answer_phase(job["session_id"], "before", with_adapter=False)

    def _job_evaluate(self, job: dict[str, Any]) -> dict[str, Any]:
        return self._answer_phase(job["session_id"], "after", with_adapter=True)

    def _job_ask(self, job: dict[str, Any]) -> dict[str, Any]:
        """One image and a question, answered by the base model and the adapted one."""
        from ttrv.adapt import load_adapter_weights, make_policy
        from ttrv.config import AdaptConfig, RolloutConfig, TaskConfig
        from ttrv.images import load_image
        from ttrv.rollout import greedy_answers
        from ttrv.tasks import Item, image_sha256

        req = job["request"]
        sid = job.get("session_id") or req.get("session_id")
        cfg = AdaptConfig.from_dict(self.store.get_session(sid)["config"]) if sid else None
        model_cfg = req.get("model") or (cfg.to_dict()["model"] if cfg else {})
        if sid and not req.get("model"):  # the session's own model, maybe from an archive
            self._check_imported_model(sid, model_cfg["model"])
        lora_cfg = cfg.to_dict()["lora"] if cfg else {}
        loaded = self.ensure_model(model_cfg, lora_cfg, seed=0)
        image = load_image(req["image_path"])
        item = Item(image_sha256(image), Path(req["image_path"]).name, image)
        base_task = cfg.task if cfg else TaskConfig()
        task = TaskConfig(**{**base_task.__dict__, "question": req.get("question") or
                             base_task.question})  # fmt: skip
        # One answer length (RolloutConfig.max_new_tokens): the session's own, so Ask answers
        # as its before/after answers did, unless the request names one (then checked by
        # the dataclass: not rounded, not above its bound).
        rollout = cfg.rollout if cfg else RolloutConfig()
        if req.get("max_new_tokens") is not None:
            rollout = dataclasses.replace(rollout, max_new_tokens=req["max_new_tokens"])
        policy = make_policy(loaded, cache_images=False)
        with loaded.model.disable_adapter():
            base = greedy_answers(policy, [item], task, rollout)[0]
        adapted = None
        if sid:
            _, ckpt = review.result_adapter(self.store, sid)  # None once reverted by review
            if ckpt is not None:
                load_adapter_weights(loaded.model, ckpt["path"])
                adapted = greedy_answers(policy, [item], task, rollout)[0]
        return {"base": base, "adapted": adapted, "question": task.question}

    def _job_preview(self, job: dict[str, Any]) -> dict[str, Any]:
        return render_preview(job["request"])

    def _job_export_model(self, job: dict[str, Any]) -> dict[str, Any]:
        """The model a session answers with, as one folder that plain transformers loads
        (`AutoModelForImageTextToText` + `AutoProcessor`): its latest adapter merged into
        the base weights (peft `merge_and_unload`), or the unadapted model when its flip
        review reverted it. Merging needs unquantised weights and changes them in place, so
        a fresh full-precision copy is loaded, after dropping the worker's own."""
        import shutil

        from ttrv.config import AdaptConfig
        from ttrv.loading import load_model
        from ttrv.lora import load_adapter

        sid = job["request"]["session_id"]  # not the job's session: a failed export
        # must not mark a finished session failed
        cfg = AdaptConfig.from_dict(self.store.get_session(sid)["config"])
        self._check_imported_model(sid, cfg.model.model)
        reverted, ckpt = review.result_adapter(self.store, sid)
        if not reverted and ckpt is None:
            raise FileNotFoundError("This session has no adapter saved yet: adapt first.")
        self._drop_model()
        loaded = load_model(dataclasses.replace(cfg.model, quantization="none"))
        model = loaded.model if reverted else load_adapter(loaded.model, ckpt["path"])
        if not reverted:
            model = model.merge_and_unload()
        dest = self.store.data_dir / "exports" / f"{sid}-model"
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial, safe_serialization=True)
        loaded.processor.save_pretrained(partial)
        shutil.rmtree(dest, ignore_errors=True)
        partial.rename(dest)
        del model, loaded
        return {"path": str(dest), "adapted": not reverted,
                "step": ckpt["step"] if ckpt else None}  # fmt: skip


def run_until_idle(worker: Worker, timeout: float = 300.0) -> None:
    """Run queued jobs on the calling thread until none is left (tests, CLI)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = jobs.claim_next(worker.store)
        if job is None:
            return
        worker.run_job(job)
    raise TimeoutError("jobs still queued after the timeout")
