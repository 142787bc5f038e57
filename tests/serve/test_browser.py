"""The pages in a real browser (Debian's Chromium driven by Playwright): on the chat page send a message, see
the reply with its badges, thumbs down, pick the right intent; on the admin page find that correction in the
review queue and approve it, label a suggested message; then find that feedback in the database."""

from __future__ import annotations

import contextlib
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from live_server import LiveServer

from tuneloop.feedback.log import PredictionLog
from tuneloop.serve.app import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium; .ci/run installs it)",
    ),
]


def shop(assistant_setup):
    """(the app serving the toy shop's assistant with admin key "root", its settings)."""
    config, definition = assistant_setup
    config.serve.assistant = definition
    config.admin_keys = "root"
    return create_app(config), config


@contextlib.contextmanager
def chat_page(app) -> Iterator[tuple[LiveServer, Any]]:
    """The app on a live server and Chromium's page on its chat page, the assistant's name shown."""
    playwright = pytest.importorskip("playwright.sync_api")
    with LiveServer(app) as server, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('title').textContent === 'shop'")
            yield server, page
        finally:
            browser.close()


def test_chat_page_correction_then_approved_in_the_admin_review_queue(assistant_setup, tmp_path):
    app, config = shop(assistant_setup)
    # The thumbs-down must land on an in-scope turn (an out-of-scope turn's rating is not stored); whether the
    # toy model's tuned threshold accepts this message varied between runs, so the scope check is off here.
    app.state.tuneloop.chat.runtime.thresholds["toy@1"] = None
    with chat_page(app) as (server, page):
        page.fill("#message", "where is my parcel courier late")
        page.click("#send")
        reply = page.locator(".msg.bot").first
        reply.wait_for()
        badges = reply.locator(".badge").all_inner_texts()
        assert any(b.startswith("intent:") for b in badges), badges
        assert any(b.startswith("sentiment:") for b in badges), badges
        reply.locator("button.thumb.down").click()
        page.wait_for_selector(".msg.bot .thanks:has-text('thanks!')")
        assert reply.locator("button.thumb.down").get_attribute("aria-pressed") == "true"
        reply.locator("select.correct-intent").select_option("password")
        page.wait_for_selector(".msg.bot .thanks:has-text('noted as password')")
        page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)  # kept in the temporary folder
        turn_id = reply.get_attribute("data-turn-id")
        page.fill("#message", "my account got locked after travel")  # unlabelled: a suggestion to label
        page.click("#send")
        page.locator(".msg.bot").nth(1).wait_for()

        page.goto(server.url + "/admin")
        page.fill("#key", "root")
        page.press("#key", "Enter")
        page.dispatch_event("#key", "change")
        queued = page.locator("#review table.review tbody tr")
        queued.first.wait_for()
        assert queued.count() == 1 and "where is my parcel courier late" in queued.first.inner_text()
        assert "password" in queued.first.inner_text() and "anonymous ×1" in queued.first.inner_text()
        queued.first.locator("button:has-text('approve')").click()
        page.wait_for_selector("#status:has-text('approved 1 feedback rows on toy')")
        page.wait_for_selector("#review:has-text('Nothing waits for review.')")
        # Why the turn got its intent: the text shaded word by word in the latest feedback's table.
        page.locator("#feedback tbody tr").first.locator("button:has-text('why')").click()
        words = page.locator("#feedback tbody tr").first.locator(".explained span")
        words.first.wait_for()
        assert words.all_inner_texts() == ["where", "is", "my", "parcel", "courier", "late"]
        colours = words.evaluate_all("spans => spans.map((s) => getComputedStyle(s).backgroundColor)")
        assert any(c.startswith("rgba(26, 127, 55") or c.startswith("rgba(207, 34, 46") for c in colours)
        # To label: the unlabelled message is suggested (the one with feedback is not); chosen and saved.
        toy = page.locator(".labeller[data-model='toy']")
        page.wait_for_selector(".labeller[data-model='toy'] blockquote:has-text('my account got locked after travel')")
        assert toy.locator(".progress").inner_text() == "1 of 1"
        toy.locator("input.label-filter").fill("password")
        toy.locator("button:has-text('save')").click()
        page.wait_for_selector("#status:has-text('as password')")
        page.screenshot(path=str(tmp_path / "admin.png"), full_page=True)
    log = PredictionLog(config.registry.resolved_database_url(), config.registry.home)
    rows = log.feedback_for("toy")
    log.close()
    assert [(f.rating, f.corrected_label, f.review) for f, _ in rows] == [
        (-1, None, "pending"),  # a rating alone teaches no label: nothing to approve
        (None, "password", "approved"),
        (None, "password", "pending"),  # the admin's label: trusted, so it trains without review
    ]
    assert rows[2][0].trusted and rows[2][1].text == "my account got locked after travel"
    assert rows[0][1].text == "where is my parcel courier late" and turn_id


def test_out_of_scope_from_the_chat_page_and_the_admin_pages_and_the_point_moved_on_the_curve(assistant_setup):
    app, config = shop(assistant_setup)
    with chat_page(app) as (server, page):
        for message in ("what is the capital of peru", "is it raining in lima"):
            page.fill("#message", message)
            page.click("#send")
            page.locator(".msg.bot").nth(0 if message.startswith("what") else 1).wait_for()
        reply = page.locator(".msg.bot").first
        reply.locator("select.correct-intent").select_option(label="out of scope (not for this assistant)")
        page.wait_for_selector(".msg.bot .thanks:has-text('noted as out of scope')")

        page.goto(server.url + "/admin")
        page.fill("#key", "root")
        page.press("#key", "Enter")  # the key is committed: clicking elsewhere later reloads nothing
        queued = page.locator("#review table.review tbody tr")
        queued.first.wait_for()
        assert "what is the capital of peru" in queued.first.inner_text()
        assert "out_of_scope" in queued.first.inner_text()
        # To label: nothing preselected for a message the model was unsure of, and out of scope on offer.
        toy = page.locator(".labeller[data-model='toy']")
        page.wait_for_selector(".labeller[data-model='toy'] blockquote:has-text('is it raining in lima')")
        assert toy.locator("ul.choices li[aria-selected='true']").count() == 0
        assert "out of scope" in toy.locator("ul.choices li").all_inner_texts()
        toy.locator("button:has-text('save')").click()
        page.wait_for_selector("#status:has-text('choose a label')")
        toy.locator("ul.choices li", has_text="out of scope").click()
        toy.locator("button:has-text('save')").click()
        page.wait_for_selector("#status:has-text('as out of scope')")
        # The curve, its point, and a move with what it is expected to do.
        page.locator("#scope svg.scope-plot circle.now").wait_for()
        assert "at most 5% rejected" in page.locator("#scope .scope-summary").inner_text()
        slider = page.locator("#scope input.scope-slider")
        before = page.locator("#scope .scope-consequence").inner_text()
        slider.fill(slider.get_attribute("max"))  # the strictest point
        after = page.locator("#scope .scope-consequence").inner_text()
        assert after != before and "turn away 100.0%" in after
        page.locator("#scope button:has-text('use this point')").click()
        page.wait_for_selector("#status:has-text('now answers at threshold')")
        page.wait_for_selector("#scope .scope-moves li:has-text('moved it to threshold')")
    log = PredictionLog(config.registry.resolved_database_url(), config.registry.home)
    rows = log.feedback_for("toy")
    log.close()
    assert sorted((f.corrected_label, f.trusted, p.text) for f, p in rows) == [
        ("out_of_scope", False, "what is the capital of peru"),
        ("out_of_scope", True, "is it raining in lima"),
    ]
    assert app.state.tuneloop.chat.runtime.moves("toy@1")[-1]["by"].startswith("key:")


def admin_get(server: LiveServer, path: str) -> Any:
    """A GET of the admin API on the live server with the key "root"."""
    request = urllib.request.Request(server.url + path, headers={"x-api-key": "root"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


# More messages than the page's 20 suggestions, so that some are listed under others as similar.
PLACES = ["lima", "paris", "tokyo", "rome", "oslo", "cairo", "quito", "delhi", "lagos", "seoul", "perth", "dakar"]
SIMILAR_TEXTS = [f"my account got locked after travel to {place}" for place in PLACES] + [
    f"where is my parcel sent to {place}" for place in PLACES
]


def test_to_label_one_message_at_a_time_by_keyboard_with_its_similar_messages(assistant_setup):
    """The To-label queue as a support team uses it: one message, nothing chosen for them, a label typed in part
    and saved with Enter for the message and its similar ones in one request, Shift+S to skip, the progress and what
    the next retrain learns shown; no mouse."""
    app, config = shop(assistant_setup)
    with chat_page(app) as (server, page):
        # The predictions feed the suggestions (the intent model's own labels, no chat turn needed).
        urllib.request.urlopen(
            urllib.request.Request(
                server.url + "/v1/predict",
                json.dumps({"model": "toy", "texts": SIMILAR_TEXTS}).encode(),
                {"content-type": "application/json"},
            ),
            timeout=30,
        ).close()
        offered = admin_get(server, "/v1/admin/suggestions?model=toy&budget=20")["suggestions"]
        # The first message with similar ones (24 messages for 20 suggestions: some are listed under others).
        at = next(i for i, suggestion in enumerate(offered) if suggestion["similar"])
        first = offered[at]

        page.goto(server.url + "/admin")
        page.fill("#key", "root")
        page.press("#key", "Enter")
        toy = page.locator(".labeller[data-model='toy']")
        message, progress = toy.locator("blockquote.message"), toy.locator(".progress")
        page.wait_for_selector(f".labeller[data-model='toy'] blockquote:text-is({json.dumps(offered[0]['text'])})")
        box = toy.locator("input.label-filter")
        assert box.evaluate("box => document.activeElement === box")  # the list takes the focus from the key box
        assert progress.inner_text() == f"1 of {len(offered)}"
        page.keyboard.press("Shift+S")  # skip
        assert progress.inner_text() == f"2 of {len(offered)} (1 done)"
        assert message.inner_text() == offered[1]["text"]
        page.keyboard.press("ArrowLeft")  # back to the first, then on to the one with similar messages
        for _ in range(at):
            page.keyboard.press("ArrowRight")
        assert message.inner_text() == first["text"] and progress.inner_text().startswith(f"{at + 1} of ")
        assert f"The model's guess: {first['predicted']}" in toy.locator(".guess").inner_text()
        assert box.input_value() == "" and toy.locator("ul.choices li[aria-selected='true']").count() == 0
        ticks = toy.locator("fieldset.similar input[type=checkbox]")
        assert ticks.count() == len(first["similar"]) and all(t.is_checked() for t in ticks.all())
        page.keyboard.type("passw")
        assert toy.locator("ul.choices li").all_inner_texts() == ["password"]
        page.keyboard.press("Enter")
        page.wait_for_selector(".labeller[data-model='toy'] .next-retrain:has-text('the next retrain learns')")
        labelled = 1 + len(first["similar"])
        assert toy.locator(".next-retrain").inner_text() == f"the next retrain learns {labelled} examples of 1 labels"
        assert progress.inner_text().endswith(" done)") and message.inner_text() != first["text"]
        assert page.evaluate("document.activeElement.classList.contains('label-filter')")
    log = PredictionLog(config.registry.resolved_database_url(), config.registry.home)
    rows = log.feedback_for("toy")
    log.close()
    expected = {first["prediction_id"], *(near["prediction_id"] for near in first["similar"])}
    assert {p.id for _, p in rows} == expected
    assert all(f.corrected_label == "password" and f.trusted for f, _ in rows)
