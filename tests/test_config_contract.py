"""One config contract: every bound is declared once, in a field's metadata, enforced by the
dataclass, and the UI form and the CLI refuse the same values with the same message
(issue 11: the CLI took `--dropout 0.95` and `--max-new-tokens 5000`, which the UI refused;
the UI rounded images-per-step 2.5 to 2; learning rate 0 got through)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pytest

from ttrv.cli import build_parser, config_from_args, flag_name
from ttrv.config import BUNDLED_MODEL, SECTIONS, ConfigError, RolloutConfig, field_type
from ui import forms

DIGIT = Path(BUNDLED_MODEL).parent.parent / "demo" / "digits" / "test-0000.png"
BOUND_KEYS = ("minimum", "greater_than", "maximum", "less_than")


def _outside(key: str, limit: float, typ: type) -> float:
    """A value just outside one declared bound."""
    step = 1 if typ is int else 0.01
    return {"minimum": limit - step, "greater_than": limit, "maximum": limit + step,
            "less_than": limit}[key]  # fmt: skip


VIOLATIONS = [
    pytest.param(
        section,
        f.name,
        _outside(k, f.metadata[k], field_type(cls, f.name)),
        id=f"{section}.{f.name}-{k}",
    )  # fmt: skip
    for section, cls in SECTIONS.items()
    for f in dataclasses.fields(cls)
    for k in BOUND_KEYS
    if f.metadata.get(k) is not None
]


def _refusal(build) -> str:
    with pytest.raises(ConfigError) as caught:
        build()
    return str(caught.value)


def _cli(section: str, name: str, value: object, command: str = "adapt") -> str:
    args = build_parser().parse_args([command, f"--{flag_name(section, name)}={value}"])
    return _refusal(lambda: config_from_args(args))


def test_every_section_declares_bounds():
    """The parametrised test below must not pass vacuously."""
    assert len(VIOLATIONS) > 30


@pytest.mark.parametrize(("section", "name", "value"), VIOLATIONS)
def test_each_declared_bound_is_enforced_with_one_message_everywhere(section, name, value):
    """The dataclass refuses a value outside a declared bound, and the UI form and the CLI
    flag refuse it with exactly the dataclass's message."""
    message = _refusal(lambda: SECTIONS[section](**{name: value}))
    typed = field_type(SECTIONS[section], name)(value)  # the message shows 0 as 0.0 for a float
    assert message.startswith(f"{section}.{name} must be ") and f"(got {typed})" in message
    assert _refusal(lambda: forms.config_from_values({forms.key(section, name): value})) == message
    assert _cli(section, name, value) == message


@pytest.mark.parametrize(
    ("section", "name", "value"),
    [
        pytest.param(section, f.name, f.metadata[k], id=f"{section}.{f.name}-{k}")
        for section, cls in SECTIONS.items()
        for f in dataclasses.fields(cls)
        for k in ("minimum", "maximum")
        if f.metadata.get(k) is not None
    ],
)
def test_inclusive_bounds_are_accepted(section, name, value):
    extra = {"n_train": 2} if name == "n_rollouts" else {}  # K <= N
    assert getattr(SECTIONS[section](**{name: value}, **extra), name) == value


def test_cli_refuses_dropout_095_with_the_uis_message():
    """Issue 11, done when: `python -m ttrv adapt --dropout 0.95` is refused with the same
    message the UI shows (it used to start a run)."""
    ui_message = _refusal(lambda: forms.config_from_values({"lora__dropout": 0.95}))
    proc = subprocess.run(
        [sys.executable, "-m", "ttrv", "adapt", "--dropout", "0.95"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == f"error: {ui_message}\n"
    assert ui_message == "lora.dropout must be <= 0.9 (got 0.95)."


def test_max_new_tokens_5000_is_refused_by_adapt_and_answer():
    ui_message = _refusal(lambda: forms.config_from_values({"rollout__max_new_tokens": 5000}))
    assert "must be <= 4096" in ui_message
    assert _cli("rollout", "max_new_tokens", 5000) == ui_message
    assert _cli("rollout", "max_new_tokens", 5000, command="answer") == ui_message


def test_ui_does_not_round_a_fraction_for_an_int_field():
    """gr.Number(precision=0) rounded 2.5 to 2 before the handler saw it."""
    f = next(f for f in dataclasses.fields(SECTIONS["optim"]) if f.name == "images_per_step")
    with gr.Blocks():
        component = forms.field_component("optim", f)
    sent = component.preprocess(2.5)
    assert sent == 2.5
    message = _refusal(lambda: forms.config_from_values({"optim__images_per_step": sent}))
    assert message.startswith("optim.images_per_step must be a whole number (got 2.5)")
    assert _cli("optim", "images_per_step", "2.5") == message
    # whole numbers still pass, as ints
    assert forms.config_from_values({"optim__images_per_step": 3.0}).optim.images_per_step == 3


def test_learning_rate_zero_is_refused_everywhere():
    message = _refusal(lambda: forms.config_from_values({"optim__learning_rate": 0}))
    assert message.startswith("optim.learning_rate must be > 0 (got 0.0)")
    assert _cli("optim", "learning_rate", 0) == message


def test_text_for_a_number_is_converted_or_refused_by_both_front_ends():
    for raw, needle in (("", "is empty"), ("many", "must be a number")):
        ui = _refusal(lambda raw=raw: forms.config_from_values({"optim__rounds": raw}))
        assert needle in ui
        assert _cli("optim", "rounds", raw) == ui
    assert forms.config_from_values({"optim__rounds": " 3 "}).optim.rounds == 3


def test_form_shows_the_declared_range():
    fields = {f.name: f for f in dataclasses.fields(SECTIONS["optim"])}
    with gr.Blocks():
        lr = forms.field_component("optim", fields["learning_rate"])
    assert lr.info.endswith("[> 0, < 1]")
    assert forms.range_text({"minimum": 0, "maximum": 0.9}) == " [0 .. 0.9]"


def test_answer_length_is_declared_once():
    """`answer` and Ask take RolloutConfig.max_new_tokens (they had 16 and 32 of their own)."""
    answer = build_parser().parse_args(["answer"])
    assert config_from_args(answer).rollout == RolloutConfig()


@pytest.mark.slow
def test_ask_answers_at_the_sessions_answer_length(tmp_path, monkeypatch):
    """The worker's Ask job answered at 32 tokens of its own; it now takes the session's
    RolloutConfig.max_new_tokens, and a requested length is checked like any config value."""
    import ttrv.rollout
    from sessions import Store
    from sessions import jobs as jobs_mod
    from sessions.worker import Worker, run_until_idle
    from ttrv.config import AdaptConfig
    from ttrv.images import load_items

    image = DIGIT
    store = Store(tmp_path / "data")
    cfg = AdaptConfig(rollout=RolloutConfig(n_rollouts=4, n_train=4, max_new_tokens=3))
    items, _ = load_items([str(image)])
    sid = store.create_session("ask", cfg.to_dict(), cfg.model.model, cfg.task.kind)
    store.add_images(sid, items)
    lengths: list[int] = []
    real = ttrv.rollout.greedy_answers

    def spy(policy, items, task, rollout):
        lengths.append(rollout.max_new_tokens)
        return real(policy, items, task, rollout)

    monkeypatch.setattr(ttrv.rollout, "greedy_answers", spy)
    worker = Worker(store)
    asked = jobs_mod.submit(store, "ask", {"image_path": str(image), "session_id": sid})
    too_long = jobs_mod.submit(
        store, "ask", {"image_path": str(image), "session_id": sid, "max_new_tokens": 5000}
    )
    run_until_idle(worker)
    assert jobs_mod.get(store, asked)["result"]["base"]["answer"]
    assert lengths == [3]
    failed = jobs_mod.get(store, too_long)
    assert failed["status"] == "failed" and "max_new_tokens must be <= 4096" in failed["error"]
