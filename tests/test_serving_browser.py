"""The chat page in a real headless Chromium (Debian's, driven by Playwright): a person chats (the
answer streams in), clicks 👍, edits the answer in place, asks again (the first answer's dwell is
sent) and leaves the page without a word on the second (its dwell and an abandon are sent as the page
goes); every feedback event arrives in Kafka."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ingest.config import load_config
from ingest.events import parse_event
from serving.publisher import read_topic
from serving.serve import BackgroundServer, Config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from test_serving import private_topics  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: run infra/setup-browser.sh")


def _ask(page, question: str, nth: int):  # noqa: ANN001, ANN202 - a playwright Locator
    page.fill("#input", question)
    page.click("#send")
    answer = page.locator(".msg.assistant[data-response-id]").nth(nth)
    answer.wait_for(timeout=30_000)
    return answer


def test_chat_page_streams_and_sends_every_signal(stack, tiny_model, tmp_path):
    from playwright.sync_api import sync_playwright

    cfg = load_config(Config, REPO / "serving/configs/serve.tiny.yaml", [
        "http.port=0", "registry.enabled=false", f"events.spool_dir={tmp_path / 'spool'}",
        "generation.max_tokens=12"])
    dialogs: list[str] = []
    edited = "A clearer answer, written by the user."
    with private_topics(stack.kafka) as topics, BackgroundServer(cfg) as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(srv.url + "/")
            first = _ask(page, "How do I learn faster?", 0)
            first_id = first.get_attribute("data-response-id")
            assert first_id and first.locator(".text").inner_text().strip()
            assert int(first.get_attribute("data-chunks")) >= 2, "the answer arrived in one piece, not streamed"
            first.locator("button[data-action=thumbs_up]").click()
            page.wait_for_function("document.querySelector('.status').dataset.kind === 'thumbs_up'",
                                   timeout=10_000)
            first.locator("button[data-action=edit]").click()  # in place: a text box, no dialog
            first.locator(".edit-box").fill(edited)
            first.locator("button[data-action=save_edit]").click()
            page.wait_for_function("document.querySelector('.status').dataset.kind === 'edit'", timeout=10_000)
            assert first.locator(".text").inner_text() == edited
            page.wait_for_timeout(1200)  # the first answer stays on screen a moment before the next question
            second = _ask(page, "And how do I remember it?", 1)
            second_id = second.get_attribute("data-response-id")
            page.wait_for_function("document.querySelector('.status').dataset.sent.includes('dwell')",
                                   timeout=10_000)
            page.screenshot(path=str(tmp_path / "chat.png"))
            page.goto("about:blank")  # leaves without rating the second answer
        finally:
            browser.close()
        assert dialogs == [], dialogs
        assert srv.service.publisher.wait_idle(30), srv.service.publisher.state()
    events = [parse_event(json.dumps(e)) for e in read_topic(stack.kafka, topics["feedback"].name, timeout=20)]
    got = {rid: {e.kind: e for e in events if e.response_id == rid} for rid in (first_id, second_id)}
    assert set(got[first_id]) == {"thumbs_up", "edit", "dwell"}, got[first_id]
    assert set(got[second_id]) == {"dwell", "abandon"}, got[second_id]
    assert got[first_id]["edit"].edited_text == edited
    assert got[first_id]["dwell"].dwell_seconds >= 1.0
    assert got[first_id]["thumbs_up"].user_id.startswith("web-")
