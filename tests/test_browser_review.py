"""The flip review walked in a real headless Chromium: open Inspect, mark flips, read the
verdict, apply it. The session's answers before and after are written directly (no run),
so the walk takes seconds."""

from __future__ import annotations

import pytest

from sessions import review
from tests.test_browser import ARTIFACTS, CHROMIUM, page, shot  # noqa: F401 - fixture
from tests.test_review_ui import app  # noqa: F401 - the app fixture with a flipped session

pytestmark = [pytest.mark.browser, pytest.mark.slow]
assert CHROMIUM and ARTIFACTS  # the module skips itself when Chromium is missing


def test_walk_the_flip_review_in_the_browser(app, page):  # noqa: F811
    try:
        page.goto(app.url)
        page.locator("#current-session").get_by_text("flips").first.wait_for()  # page loaded
        page.click("#tab-inspect-button")
        verdict = page.locator("#review-verdict")
        verdict.get_by_text("3 of 5 answers changed").first.wait_for()
        page.locator("#review-flip").get_by_text("Flip 1 of 3").first.wait_for()
        page.locator("#review-after").click()
        verdict.get_by_text("reviewed 1").first.wait_for()
        page.locator("#review-flip").get_by_text("Flip 2 of 3").first.wait_for()
        page.locator("#review-after").click()
        verdict.get_by_text("reviewed 2").first.wait_for()
        verdict.get_by_text("Recommendation: keep the adapter").first.wait_for()
        shot(page, "review")
        page.locator("#review-keep").click()
        page.locator("#review-status").get_by_text("keeps its adapter").first.wait_for()
        assert review.applied(app.store, app.sid) == "keep"
        assert sorted(app.store.review_marks(app.sid).values()) == ["after", "after"]
    except BaseException:
        shot(page, "review-failure")
        raise
