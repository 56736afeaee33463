"""Flip review through the store (marks, verdict, apply, export) and the CLI's reviewer."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sessions import Store, review
from tests.test_store import png
from ttrv.config import AdaptConfig, ModelConfig, TaskConfig


@pytest.fixture
def reviewed(tmp_path: Path):
    """A session of 6 images answered before and after; 4 answers changed."""
    with Store(tmp_path / "data") as store:
        sid = store.create_session("r", AdaptConfig().to_dict(), "tiny", "open")
        items = [
            {"image_id": f"i{k}", "name": f"{k}.png", "path": png(tmp_path / f"{k}.png", (k, 0, 0))}
            for k in range(6)
        ]
        store.add_images(sid, items)
        before = ["1", "2", "3", "4", "5", "6"]
        after = ["1", "2", "7", "8", "9", "0"]
        sink = store.sink(sid)
        for phase, answers in (("before", before), ("after", after)):
            sink(
                "answers",
                {
                    "phase": phase,
                    "answers": [
                        {"image_id": f"i{k}", "response": a, "answer": a}
                        for k, a in enumerate(answers)
                    ],
                },
            )
        yield store, sid


def test_queue_holds_only_flips_in_a_seeded_order(reviewed):
    store, sid = reviewed
    state = review.queue(store, sid)
    ids = [f["image_id"] for f in state["flips"]]
    assert sorted(ids) == ["i2", "i3", "i4", "i5"] and state["images"] == 6
    assert ids == [f["image_id"] for f in review.queue(store, sid)["flips"]]
    assert state["verdict"]["recommendation"] == "review" and state["applied"] is None
    first = review.flip(store, sid, state["flips"][0])
    assert first["before"] != first["after"] and first["mark"] is None


def test_marks_update_the_verdict_and_skip_clears(reviewed):
    store, sid = reviewed
    review.mark(store, sid, "i2", "after")
    state = review.mark(store, sid, "i3", "after")
    assert state["verdict"]["after_right"] == 2 and state["verdict"]["recommendation"] == "keep"
    assert state["verdict"]["estimate"] == pytest.approx(4 / 6)
    state = review.mark(store, sid, "i4", "before")
    state = review.mark(store, sid, "i5", "before")
    assert state["verdict"]["recommendation"] == "revert"  # 2 vs 2: not shown to help
    assert state["verdict"]["low"] == state["verdict"]["high"] == 0.0  # every flip reviewed
    state = review.mark(store, sid, "i5", "skip")
    assert state["verdict"]["reviewed"] == 3
    with pytest.raises(ValueError, match="did not change"):
        review.mark(store, sid, "i0", "after")
    with pytest.raises(Exception, match="Unknown review mark"):
        store.set_review_mark(sid, "i2", "maybe")


def test_apply_revert_is_an_event_and_drops_the_adapter(reviewed, tmp_path):
    store, sid = reviewed
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    store.add_checkpoint(sid, 1, 4, str(folder))
    assert review.session_adapter(store, sid) is not None
    review.mark(store, sid, "i2", "before")
    state = review.apply(store, sid, "revert")
    assert state["applied"] == "revert"
    event = store.events(sid, kind="review_applied")[-1]["data"]
    assert event["decision"] == "revert" and event["marks"] == {"i2": "before"}
    assert review.session_adapter(store, sid) is None
    assert "unadapted model" in review.verdict_text(review.queue(store, sid))
    review.apply(store, sid, "keep")
    assert review.session_adapter(store, sid) is not None
    with pytest.raises(ValueError, match="keep or revert"):
        review.apply(store, sid, "maybe")


def test_marks_travel_with_an_exported_session(reviewed, tmp_path):
    store, sid = reviewed
    review.mark(store, sid, "i3", "neither")
    archive = store.export_session(sid, tmp_path / "out.zip")
    with Store(tmp_path / "other") as other:
        new = other.import_archive(archive)
        assert other.review_marks(new) == {"i3": "neither"}


def test_cli_reviewer_reverts_a_harmful_run(tiny_model_dir, tmp_path):
    """`--review N` with labels that say every flip was right before: the verdict reverts,
    the adapted weights go to adapter-rejected/, the model is the unadapted one."""
    from ttrv.cli import play_review
    from ttrv.loading import load_model
    from ttrv.lora import attach_lora
    from ttrv.tasks import Item

    cfg = AdaptConfig(model=ModelConfig(model=str(tiny_model_dir("llava"))), task=TaskConfig())
    loaded = load_model(cfg.model)
    model = attach_lora(loaded.model, cfg.lora, seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)  # an "adapted" model
    items = [Item(f"i{k}", f"{k}.png", None, label=str(k)) for k in range(5)]
    before = [{"image_id": f"i{k}", "answer": str(k)} for k in range(5)]
    after = [{"image_id": f"i{k}", "answer": str(k if k < 2 else 9)} for k in range(5)]
    result = SimpleNamespace(before=before, after=after)
    out = play_review(model, result, items, cfg, 2, tmp_path)
    assert out["applied"] == "revert" and len(out["marks"]) == 2
    assert set(out["marks"].values()) == {"before"}
    assert out["verdict"]["flips"] == 3 and out["verdict"]["reviewed"] == 2
    assert (tmp_path / "adapter-rejected" / "adapter_model.safetensors").exists()
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if "lora_B" in n)
    assert result.after == before

    # the same run with labels that favour the new answers is kept, weights untouched
    items = [Item(f"i{k}", f"{k}.png", None, label=str(k if k < 2 else 9)) for k in range(5)]
    result = SimpleNamespace(before=before, after=list(after))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)
    out = play_review(model, result, items, cfg, 2, tmp_path / "keep")
    assert out["applied"] == "keep" and result.after == after
    assert any(torch.count_nonzero(p) for n, p in model.named_parameters() if "lora_B" in n)


def test_an_archive_from_before_reviews_still_imports(reviewed, tmp_path):
    import zipfile

    store, sid = reviewed
    archive = store.export_session(sid, tmp_path / "out.zip")
    old = tmp_path / "old.zip"
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(old, "w") as dst:
        for info in src.infolist():
            if info.filename != "tables/reviews.json":
                dst.writestr(info, src.read(info.filename))
    with Store(tmp_path / "other") as other:
        new = other.import_archive(old)
        assert other.review_marks(new) == {}
        assert len(other.answers(new)) == 6
