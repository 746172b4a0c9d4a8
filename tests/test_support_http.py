"""The support routes through real clients: httpx against the server's app (auth on and off, bad input
in OpenAI's error shape), and the chat page in headless Chromium against a real uvicorn server."""

import asyncio
import shutil
import socket
import threading
import time

import httpx
import pytest
from test_support_dialogue import tiny_engine  # noqa: F401 (a fixture)

from r1kit.apps.support.actions import DemoShop
from r1kit.apps.support.assistant import Assistant
from r1kit.apps.support.config import SupportConfig
from r1kit.apps.support.generation import EngineGenerator
from r1kit.apps.support.intent import ZeroShotRecognizer
from r1kit.apps.support.routes import SupportApp, mount
from r1kit.apps.support.store import SessionStore
from r1kit.serve.app import build_app

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def app(tiny_engine, tmp_path_factory):  # noqa: F811
    state = tiny_engine
    folder = tmp_path_factory.mktemp("support-http")
    recognizer = ZeroShotRecognizer(_tiny_model(state), state.tokenizer, state.template, threshold=0.5)
    shop = DemoShop(folder / "shop.sqlite")
    assistant = Assistant(SupportConfig(max_new_tokens=8), recognizer, EngineGenerator(state), shop.actions(), SessionStore(folder / "s.sqlite"), shop.catalogue())
    application = build_app(state)
    mount(application, SupportApp(assistant))
    return application, state


def _tiny_model(state):
    """A fresh tiny model of the engine's config for the recogniser (zero-shot: no training data needed)."""
    from r1kit.model import R1kitForCausalLM

    return R1kitForCausalLM(state.engine.engine.model.config).eval()


def requests(app, calls):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            return [await c.request(*call[:2], **(call[2] if len(call) > 2 else {})) for call in calls]

    return asyncio.run(go())


def test_session_message_and_state(app):
    application, _ = app
    (created,) = requests(application, [("POST", "/v1/support/sessions")])
    sid = created.json()["id"]
    posted, got = requests(application, [("POST", f"/v1/support/sessions/{sid}/messages", {"json": {"content": "Where is my order A10023?"}}),
                                         ("GET", f"/v1/support/sessions/{sid}")])  # fmt: skip
    body = posted.json()
    assert posted.status_code == 200 and body["slots"]["order_id"] == "A10023" and isinstance(body["reply"], str)
    assert {"intent", "confidence", "decision", "action", "state"} <= set(body)
    assert got.status_code == 200 and got.json()["turns"][0]["user"] == "Where is my order A10023?"


@pytest.mark.parametrize("call,status,param", [
    (("POST", "/v1/support/sessions/nope/messages", {"json": {"content": "hi"}}), 404, "session_id"),
    (("GET", "/v1/support/sessions/nope"), 404, "session_id"),
    (("POST", "/v1/support/sessions/{sid}/messages", {"json": {"content": "   "}}), 400, "content"),
    (("POST", "/v1/support/sessions/{sid}/messages", {"json": {"content": "x" * 100_000}}), 400, "content"),
    (("POST", "/v1/support/sessions/{sid}/messages", {"json": {"content": 123}}), 400, "content"),
    (("POST", "/v1/support/sessions/{sid}/messages", {"json": {"text": "hi"}}), 400, None),
    (("POST", "/v1/support/sessions/{sid}/messages", {"content": b"{not json"}), 400, None),
])  # fmt: skip
def test_bad_input_gets_openai_errors(app, call, status, param):
    application, _ = app
    (created,) = requests(application, [("POST", "/v1/support/sessions")])
    method, path, *rest = call
    (response,) = requests(application, [(method, path.format(sid=created.json()["id"]), *rest)])
    error = response.json()["error"]
    assert response.status_code == status and set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param


def test_auth_covers_the_support_routes(app):
    application, state = app
    state.api_key = "sekret"
    try:
        refused, allowed, page = requests(application, [("POST", "/v1/support/sessions"),
                                                        ("POST", "/v1/support/sessions", {"headers": {"Authorization": "Bearer sekret"}}),
                                                        ("GET", "/support")])  # fmt: skip
    finally:
        state.api_key = None
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    assert allowed.status_code == 200
    # the page itself is static and public (a browser cannot send the key when it opens it); every call it makes sends the key
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


def test_chat_page_in_headless_chromium(app):
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"Chromium is not installed at {CHROMIUM}")
    playwright = pytest.importorskip("playwright.sync_api")
    import uvicorn

    application, _ = app
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(application, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/support")
            page.fill("#text", "I need an invoice for order A10025, my email is li.wei@qq.com")
            page.click("#send")
            page.wait_for_selector(".msg.bot", timeout=60_000)
            page.wait_for_selector("#slots tr[data-slot='order_id']", timeout=30_000)
            assert page.inner_text("#slots tr[data-slot='order_id'] td:nth-child(2)") == "A10025"
            assert page.inner_text("#slots tr[data-slot='email'] td:nth-child(2)") == "li.wei@qq.com"
            assert page.inner_text("#session") != "-" and page.inner_text("#error") == ""
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
