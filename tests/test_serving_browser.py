"""The chat page in a real headless Chromium (Debian's, driven by Playwright): a person chats,
clicks 👍 and edits an answer, and the feedback events arrive in Kafka."""

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


def test_chat_page_thumbs_up_and_edit_reach_kafka(stack, tiny_model, tmp_path):
    from playwright.sync_api import sync_playwright

    cfg = load_config(Config, REPO / "serving/configs/serve.tiny.yaml", [
        "http.port=0", "registry.enabled=false", f"events.spool_dir={tmp_path / 'spool'}",
        "generation.max_tokens=12"])
    with private_topics(stack.kafka) as topics, BackgroundServer(cfg) as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.on("dialog", lambda d: d.accept("A clearer answer, written by the user."))
            page.goto(srv.url + "/")
            page.fill("#input", "How do I learn faster?")
            page.click("#send")
            answer = page.locator(".msg.assistant").first
            answer.wait_for(timeout=30_000)
            response_id = answer.get_attribute("data-response-id")
            assert response_id and answer.locator(".text").inner_text().strip()
            answer.locator("button[data-action=thumbs_up]").click()
            page.wait_for_function("document.querySelector('.status').dataset.kind === 'thumbs_up'",
                                   timeout=10_000)
            answer.locator("button[data-action=edit]").click()
            page.wait_for_function("document.querySelector('.status').dataset.kind === 'edit'", timeout=10_000)
            page.screenshot(path=str(tmp_path / "chat.png"))
        finally:
            browser.close()
        assert srv.service.publisher.wait_idle(30), srv.service.publisher.state()
    events = read_topic(stack.kafka, topics["feedback"].name, timeout=20)
    mine = {e.kind: e for e in (parse_event(json.dumps(e)) for e in events if e["response_id"] == response_id)}
    assert set(mine) == {"thumbs_up", "edit"}, mine
    assert mine["edit"].edited_text == "A clearer answer, written by the user."
    assert mine["thumbs_up"].user_id.startswith("web-")
