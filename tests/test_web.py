"""The web chat in a real browser: Debian's headless Chromium driven by Playwright.

Chromium comes from the system (``apt-get install chromium``, done by ``make browser``, which ``make
test`` runs); Playwright only drives it (``executable_path``), it downloads nothing. Without a
Chromium the test is skipped, except under CI (``CI`` set), where that is a failure. The screenshot is
kept in ``$ORION_TEST_ARTIFACTS`` (default ``test-artifacts/``). The login that guards the web chat
when the server has an API key is tested in-process (FastAPI's ``TestClient``), without a browser.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from orion_mllm.serve.app import WEB_LOGIN_MESSAGE, create_app
from orion_mllm.serve.background import BackgroundServer
from orion_mllm.serve.openai_api import ServeConfig
from serve_utils import micro_pipeline

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("ORION_TEST_ARTIFACTS", "test-artifacts"))


@pytest.fixture(scope="module")
def web_server(tmp_path_factory):
    out = tmp_path_factory.mktemp("web")
    srv = BackgroundServer(create_app(micro_pipeline(), ServeConfig(model_name="m"), web_dir=out))
    yield srv, out
    srv.stop()


def test_web_chat_generates_an_image_answers_about_it_and_edits_it(web_server):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium on PATH: `make browser` installs Debian's package")
        pytest.skip("no chromium on PATH (make browser installs it)")
    from playwright.sync_api import sync_playwright

    srv, out = web_server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1000})
            page.goto(srv.url + "/")
            box = page.locator("#prompt textarea")
            # 1. Ask for an image: it appears inline in the chat and in the downloads list.
            page.locator("#draw input[type=checkbox]").check()
            box.fill("a red circle above a blue square")
            box.press("Enter")
            page.locator("#chat img").first.wait_for(timeout=120_000)
            generated = sorted(out.glob("*.png"))
            assert len(generated) == 1
            page.locator("#downloads a[download]").first.wait_for(timeout=30_000)
            assert ".png" in page.locator("#downloads").inner_text()
            # 2. Ask about it: a text answer arrives after the question.
            page.locator("#draw input[type=checkbox]").uncheck()
            answers_before = page.locator("#chat [data-testid='bot']").count()
            assert answers_before >= 1
            box.fill("How many circles are there?")
            box.press("Enter")
            page.locator("#chat").get_by_text("How many circles are there?").wait_for(timeout=60_000)
            page.wait_for_function(
                "n => document.querySelectorAll(\"#chat [data-testid='bot']\").length > n",
                arg=answers_before,
                timeout=120_000,
            )
            assert len(sorted(out.glob("*.png"))) == 1  # the question produced text, not another image
            # 3. Click the generated image to edit it: the next message is the instruction.
            page.locator("#chat img").first.click()
            page.locator("#edit-note").get_by_text("Editing the selected image").wait_for(timeout=30_000)
            box.fill("Make the circle blue.")
            box.press("Enter")
            # The source comes back as the user's image, then the edited one: three images in the chat.
            page.wait_for_function(
                "() => document.querySelectorAll('#chat img').length >= 3", timeout=120_000
            )
            assert len(sorted(out.glob("*.png"))) == 2
            page.screenshot(path=str(ARTIFACTS / "web_chat.png"), full_page=True)
        finally:
            browser.close()


def test_with_an_api_key_the_web_chat_asks_for_it_as_the_login_password(tmp_path):
    key = "web-key-4411"
    app = create_app(micro_pipeline(), ServeConfig(model_name="m", api_key=key), web_dir=tmp_path)
    with TestClient(app) as c:
        # Gradio's own check guards the chat's config and its event queue (where turns reach the model).
        r = c.get("/config")
        assert r.status_code == 401 and r.json()["detail"]["auth_message"] == WEB_LOGIN_MESSAGE
        r = c.post("/gradio_api/queue/join", json={})
        assert r.status_code == 401 and r.json()["detail"]["error"] == "Not authenticated"
        assert c.post("/login", data={"username": "anyone", "password": "wrong"}).status_code == 400
        assert c.post("/login", data={"username": "anyone", "password": key[:-1]}).status_code == 400
        assert c.get("/config").status_code == 401
        r = c.post("/login", data={"username": "anyone", "password": key})
        assert r.status_code == 200 and r.json() == {"success": True}
        assert c.get("/config").status_code == 200
        assert c.post("/gradio_api/queue/join", json={}).status_code == 422  # let in (an empty event)
        # The login cookie is not the key: the API still wants the Bearer header; /health stays open.
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/no-such-route").status_code == 401  # not Gradio's 404 (the chat is at /)
        assert c.get("/v1/models", headers={"authorization": f"Bearer {key}"}).status_code == 200
        assert c.get("/health").status_code == 200


def test_without_an_api_key_the_web_chat_needs_no_login(tmp_path):
    app = create_app(micro_pipeline(), ServeConfig(model_name="m"), web_dir=tmp_path)
    with TestClient(app) as c:
        assert c.get("/config").status_code == 200
        assert c.get("/v1/models").status_code == 200
