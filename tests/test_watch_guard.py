"""The guard in the loop: watch pool, checks every few steps, what a rollback restores,
resume, seeds and skipped converged images (on a tiny LLaVA, greedy answers scripted)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import ttrv.adapt as adapt_mod
from tests.test_engine import loaded_model, make_items, small_config
from tests.test_screening import strips_pass_loading  # noqa: F401 - a fixture
from ttrv.adapt import adapt, unadapted_state
from ttrv.lora import ADAPTER_FILE, adapter_state

OPTIONS = ["cat", "dog", "bird", "fish"]


def scripted_greedy(monkeypatch, script):
    """Replace greedy answers by `script(steps_done, image_index, real_answer)`; the number
    of steps done is read from the run's own step events (so a resumed run continues)."""
    real = adapt_mod.greedy_answers
    progress = {"steps": 0}

    def fake(policy, items, task, rollout):
        out = real(policy, items, task, rollout)
        for a, it in zip(out, items, strict=True):
            a["answer"] = script(progress["steps"], int(it.name[3:]), a["answer"])
        return out

    monkeypatch.setattr(adapt_mod, "greedy_answers", fake)

    def sink_into(events):
        def sink(kind, data):
            if kind == "step":
                progress["steps"] = data["step"] + 1
            events.append((kind, data))

        return sink

    return progress, sink_into


def varied(i: int) -> str:
    return OPTIONS[i % 4]


def lora_close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_healthy_round_then_collapse_restores_that_rounds_weights_exactly(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Kills "never update the rollback target": round 1 answers exactly as before (clearly
    healthy), round 2 collapses; the run must end on round 1's weights, not the start's."""
    folder = tiny_model_dir("llava")
    cfg = small_config(folder, rounds=3)
    loaded = loaded_model(folder, cfg)
    start = adapter_state(loaded.model)
    # 4 images, 2 per step: round 1 ends after step 2, round 2 after step 4
    _, sink_into = scripted_greedy(
        monkeypatch, lambda steps, i, _: "fish" if steps >= 4 else varied(i)
    )
    events: list = []
    result = adapt(loaded, make_items(4), cfg, sink_into(events), output_dir=tmp_path)
    guard = [d for k, d in events if k == "guard"]
    assert [(g["step"], g["action"], g["healthy"]) for g in guard] == [
        (2, "keep", True),
        (4, "rollback", False),
    ]
    assert guard[1]["rolled_back_to"] == "the weights after step 2"
    assert result.status == "guard_stopped" and result.target_step == 2
    round1 = load_file(tmp_path / "checkpoints" / "round-1" / ADAPTER_FILE)
    now = adapter_state(loaded.model)
    saved = {k.replace(".default", ""): v for k, v in now.items()}
    assert set(round1) == set(saved)
    assert all(torch.equal(round1[k], saved[k]) for k in round1)
    assert not lora_close(now, start)  # and round 1 had moved the weights


def test_no_clearly_healthy_check_rolls_back_to_the_unadapted_model(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Round 1 within bounds but near them (1 of 4 answers moved, bound 30%, margin 50%);
    round 2 collapses: the run ends on the unadapted model, not on round 1."""
    folder = tiny_model_dir("llava")
    cfg = small_config(folder, rounds=3)
    cfg.guard.max_changed_answers = 0.3
    cfg.guard.max_marginal_entropy_drop = 0.5
    cfg.guard.forecast_images = 0  # no unexplained-flips signal: scripted answers only
    loaded = loaded_model(folder, cfg)
    start = adapter_state(loaded.model)

    def script(steps, i, _):
        if steps >= 4:
            return "fish"
        if steps >= 2 and i == 0:
            return "dog"  # one answer in four moved: 25% < 30% but > 15%
        return varied(i)

    _, sink_into = scripted_greedy(monkeypatch, script)
    events: list = []
    result = adapt(loaded, make_items(4), cfg, sink_into(events), output_dir=tmp_path)
    guard = [d for k, d in events if k == "guard"]
    assert [(g["action"], g["healthy"]) for g in guard] == [("keep", False), ("rollback", False)]
    assert "changed" not in guard[0]["reason"] or "near" in guard[0]["reason"]
    assert guard[1]["rolled_back_to"] == "the unadapted model"
    assert lora_close(adapter_state(loaded.model), start)
    assert result.target_step == 0


def test_resumed_run_decides_exactly_as_an_uninterrupted_one(tiny_model_dir, tmp_path, monkeypatch):
    """Resume must not move the rollback target to the weights at resume time: stop inside
    round 2 (after round 1 became the target), resume, collapse: same final weights."""
    folder = tiny_model_dir("llava")
    cfg = small_config(folder, rounds=3)
    progress, sink_into = scripted_greedy(
        monkeypatch, lambda steps, i, _: "fish" if steps >= 4 else varied(i)
    )
    full = loaded_model(folder, cfg)
    events: list = []
    adapt(full, make_items(4), cfg, sink_into(events), output_dir=tmp_path / "full")
    want = adapter_state(full.model)
    want_guard = [d for k, d in events if k == "guard"][-1]

    progress["steps"] = 0
    part = loaded_model(folder, cfg)
    events = []
    stopped = adapt(
        part, make_items(4), cfg, sink_into(events), lambda: progress["steps"] >= 3,
        output_dir=tmp_path / "part",
    )  # fmt: skip
    assert stopped.status == "stopped" and stopped.steps == 3
    resumed_model = loaded_model(folder, cfg)
    events = []
    result = adapt(
        resumed_model, make_items(4), cfg, sink_into(events),
        output_dir=tmp_path / "part", resume_from=stopped.checkpoint,
    )  # fmt: skip
    got_guard = [d for k, d in events if k == "guard"][-1]
    assert result.status == "guard_stopped"
    assert got_guard["rolled_back_to"] == want_guard["rolled_back_to"] == "the weights after step 2"
    assert lora_close(adapter_state(resumed_model.model), want)


def test_old_checkpoint_without_a_rollback_file_rolls_back_to_unadapted(tiny_model_dir):
    """A checkpoint from before the rollback file existed: the target is the unadapted model
    (every LoRA B zero), never the weights at resume time."""
    folder = tiny_model_dir("llava")
    cfg = small_config(folder)
    loaded = loaded_model(folder, cfg)
    with torch.no_grad():
        for n, p in loaded.model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.5)
    zero = unadapted_state(loaded.model)
    assert all(torch.count_nonzero(v) == 0 for k, v in zero.items() if "lora_B" in k)
    assert any(torch.count_nonzero(v) for k, v in zero.items() if "lora_A" in k)


def test_two_seeds_sample_differently(tiny_model_dir):
    """Kills "ignore the seed when sampling": the same weights, seeds 0 and 1, differ in the
    first step's rollouts; the same seed twice gives the same rollouts."""
    folder = tiny_model_dir("llava")
    responses = []
    for seed in (0, 1, 0):
        cfg = small_config(folder, rounds=1)
        loaded = loaded_model(folder, cfg)  # LoRA init from seed 0 in all three
        cfg.optim.seed = seed
        events: list = []
        adapt(loaded, make_items(2), cfg, lambda k, d, ev=events: ev.append((k, d)))
        first = next(d for k, d in events if k == "rollouts")
        responses.append([r["response"] for r in first["rollouts"]])
    assert responses[0] == responses[2]
    assert responses[0] != responses[1]


def test_converged_images_cost_no_further_steps(tiny_model_dir, monkeypatch):
    """Kills "skip_converged never skips": an image whose rollouts all agreed is not rolled
    out again in later rounds (and is with skip_converged off)."""
    folder = tiny_model_dir("llava")
    seen = {}
    for skip in (True, False):
        cfg = small_config(folder, rounds=2, skip_converged=skip)
        loaded = loaded_model(folder, cfg)
        items = make_items(4)
        converged_id = items[0].image_id
        monkeypatch.setattr(
            adapt_mod, "is_converged", lambda g, cid=converged_id: g.item.image_id == cid
        )
        events: list = []
        result = adapt(loaded, items, cfg, lambda k, d, ev=events: ev.append((k, d)))
        per_step = [{r["image_id"] for r in d["rollouts"]} for k, d in events if k == "rollouts"]
        seen[skip] = (result.steps, per_step, converged_id)
    steps, per_step, cid = seen[True]
    assert steps == 2 + 2  # round 2 has 3 images: still 2 steps of 2 images
    assert sum(cid in ids for ids in per_step) == 1  # round 1 only
    assert sum(len(ids) for ids in per_step[2:]) == 3
    steps_off, per_step_off, cid = seen[False]
    assert sum(cid in ids for ids in per_step_off) == 2


def test_watch_pool_is_never_trained_on_and_its_drift_trips_the_guard(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Adapt on 4 of 40 images; the other 36 are the watch pool (>= min_watch_images). The
    adapted images keep their answers, but a third of the pool's answers move: the guard
    sees it on the pool, at a mid-round check, and rolls back to the unadapted model."""
    folder = tiny_model_dir("llava")
    cfg = small_config(folder, rounds=2, adapt_images=4, images_per_step=1)
    cfg.guard.check_every = 3
    cfg.guard.forecast_images = 0
    loaded = loaded_model(folder, cfg)
    start = adapter_state(loaded.model)
    items = make_items(40)
    holder: dict = {}

    def script(steps, i, _):
        watch = holder.get("watch", set())
        if steps >= 3 and items[i].image_id in watch and i % 3 == 0:
            return "dog" if varied(i) != "dog" else "cat"
        return varied(i)

    _, sink_into = scripted_greedy(monkeypatch, script)
    events: list = []

    def sink(kind, data):
        if kind == "run_start":
            holder["watch"] = set(data["split"]["watch_ids"])
        sink_into(events)(kind, data)

    result = adapt(loaded, items, cfg, sink, output_dir=tmp_path)
    start_event = next(d for k, d in events if k == "run_start")
    assert start_event["split"]["adapt"] == 4 and start_event["split"]["watch"] == 36
    assert "never trains on" in start_event["split"]["note"]
    trained = {r["image_id"] for k, d in events if k == "rollouts" for r in d["rollouts"]}
    assert trained and not trained & holder["watch"]
    guard = [d for k, d in events if k == "guard"]
    assert guard[-1]["action"] == "rollback" and guard[-1]["phase"] == "step-3"
    assert guard[-1]["reason"].startswith("watch pool:")
    assert "watch" in guard[-1]["signals"] and "adapted" in guard[-1]["signals"]
    assert result.status == "guard_stopped" and result.steps == 3
    assert lora_close(adapter_state(loaded.model), start)
    after = {a["image_id"] for a in result.after}
    assert after == {it.image_id for it in items}  # every image answered after


def test_small_session_says_it_has_no_watch_pool(tiny_model_dir):
    folder = tiny_model_dir("llava")
    cfg = small_config(folder, rounds=1)
    events: list = []
    adapt(loaded_model(folder, cfg), make_items(4), cfg, lambda k, d: events.append((k, d)))
    split = next(d for k, d in events if k == "run_start")["split"]
    assert split["watch"] == 0 and "too few for a watch pool" in split["note"]


def test_forecast_event_precedes_training(tiny_model_dir):
    folder = tiny_model_dir("llava")
    cfg = small_config(folder, rounds=1)
    events: list = []
    adapt(loaded_model(folder, cfg), make_items(3), cfg, lambda k, d: events.append((k, d)))
    kinds = [k for k, _ in events]
    assert "forecast" in kinds and kinds.index("forecast") < kinds.index("step")
    fc = events[kinds.index("forecast")][1]
    assert fc["images"] == 3 and fc["outlook"] in (
        "likely_help",
        "no_format",
        "little_gain",
        "risky",
    )
    assert fc["message"]


@pytest.mark.parametrize("every,expected", [(0, ["round-1"]), (2, ["step-2", "round-1"])])
def test_guard_checks_every_few_steps(tiny_model_dir, every, expected):
    folder = tiny_model_dir("llava")
    cfg = small_config(folder, rounds=1, images_per_step=1)
    cfg.guard.check_every = every
    cfg.guard.forecast_images = 0
    events: list = []
    adapt(loaded_model(folder, cfg), make_items(3), cfg, lambda k, d: events.append((k, d)))
    assert [d["phase"] for k, d in events if k == "guard"] == expected


@pytest.mark.usefixtures("strips_pass_loading")
def test_an_image_the_processor_refuses_is_skipped_and_the_run_goes_on(tiny_model_dir, tmp_path):
    """A folder with a 4000x3 strip (Qwen2-VL's processor refuses it): the run adapts on the
    other images and says which file it skipped and why."""
    from tests.test_screening import folder_items

    folder = tiny_model_dir("qwen2_vl")
    cfg = small_config(folder, rounds=1)
    items = folder_items(tmp_path / "imgs")
    events: list = []
    result = adapt(loaded_model(folder, cfg), items, cfg, lambda k, d: events.append((k, d)))
    warnings = [d["message"] for k, d in events if k == "warning"]
    assert len(warnings) == 1 and "thin.png" in warnings[0]
    assert result.status == "done" and len(result.after) == 3
