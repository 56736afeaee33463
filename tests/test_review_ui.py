"""The flip review in Inspect, through the app's HTTP API (no worker: a session whose
answers before and after are written directly)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sessions import Store, review
from tests.test_store import png
from tests.test_ui import client, free_port
from ttrv.config import AdaptConfig


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from types import SimpleNamespace

    from ui.workbench import create_app, launch_options

    tmp: Path = tmp_path_factory.mktemp("review-ui")
    store = Store(tmp / "data")
    sid = store.create_session("flips", AdaptConfig().to_dict(), "tiny", "open")
    store.add_images(
        sid,
        [{"image_id": f"i{k}", "name": f"{k}.png", "path": png(tmp / f"{k}.png", (40 * k, 0, 0)),
          "label": str(k)} for k in range(5)],
    )  # fmt: skip
    sink = store.sink(sid)
    for phase, answers in (("before", "01234"), ("after", "01999")):
        rows = [{"image_id": f"i{k}", "response": a, "answer": a} for k, a in enumerate(answers)]
        sink("answers", {"phase": phase, "answers": rows})
    store.set_status(sid, "done")  # a finished run (a queued one would draw the Adapt tab)
    demo = create_app(store)
    demo.launch(prevent_thread_lock=True, quiet=True, server_port=free_port(),
                **launch_options(store))  # fmt: skip
    yield SimpleNamespace(url=demo.local_url, store=store, sid=sid)
    demo.close()
    store.close()


def test_walk_the_flip_review_to_a_verdict_and_apply_it(app):
    c = client(app)
    c.predict(api_name="/attach")  # the page load picks the session
    verdict, _, flip, _, _ = c.predict(api_name="/review_before")
    # the first flip was marked "before was right"; the next unmarked one is shown
    marks = app.store.review_marks(app.sid)
    assert list(marks.values()) == ["before"] and len(marks) == 1
    assert "3 of 5 answers changed" in verdict and "reviewed 1" in verdict
    assert "Flip 2 of 3" in flip and "→ after: **9**" in flip
    verdict, *_ = c.predict(api_name="/review_before")
    assert "Recommendation: roll back to the unadapted model" in verdict
    assert "-40.0 points" in verdict or "interval" in verdict
    *_, status = c.predict(api_name="/review_revert")
    assert "unadapted model" in status
    assert review.applied(app.store, app.sid) == "revert"
    verdict, *_ = c.predict(api_name="/review_skip")
    assert "Applied: the session&#x27;s result is the unadapted model" in verdict
    *_, status = c.predict(api_name="/review_keep")
    assert review.applied(app.store, app.sid) == "keep"
