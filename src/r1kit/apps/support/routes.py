"""The assistant over HTTP, mounted on r1kit's server app (``r1kit serve --app support``):

* ``POST /v1/support/sessions``: a new session;
* ``POST /v1/support/sessions/{id}/messages`` ``{"content": "..."}``: one customer message; the reply
  with its intent, confidence, slots, decision and action;
* ``GET /v1/support/sessions/{id}``: the session (turns, summary, tracked state);
* ``GET /support``: the chat page (one self-contained HTML file), showing the conversation and the state live.

The server's guard covers these paths (API key, body limits), its handlers give errors OpenAI's
shape (bad input: 400 naming the field; an unknown session: 404). The assistant arrives once the
model is loaded; until then the routes answer 503 as the rest of the API does.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, StrictStr

from r1kit.apps.support.assistant import Assistant
from r1kit.apps.support.store import SessionNotFound
from r1kit.serve.app import APIError


class MessageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: StrictStr


class SupportApp:
    """Holds the assistant for the routes; ``assistant`` is None while the model loads."""

    def __init__(self, assistant: Assistant | None = None) -> None:
        self.assistant = assistant

    def ready(self) -> Assistant:
        if self.assistant is None:
            raise APIError(503, "the support assistant is still loading; retry when /health answers 200", "service_unavailable")
        return self.assistant


async def _session(support: SupportApp, session_id: str):
    try:
        return await support.ready().load(session_id)
    except SessionNotFound as exc:
        raise APIError(404, str(exc), "not_found_error", "session_id", "session_not_found") from None


def mount(app: FastAPI, support: SupportApp) -> SupportApp:
    """Add the support routes and the chat page to ``app`` (built by :func:`r1kit.serve.app.build_app`)."""
    page = (resources.files("r1kit.apps.support") / "page.html").read_text(encoding="utf-8")

    @app.post("/v1/support/sessions")
    async def create_session():
        session = await support.ready().create()
        return {"id": session.id, "object": "support.session", "created": int(session.created), "state": session.state.to_dict()}

    @app.post("/v1/support/sessions/{session_id}/messages")
    async def post_message(session_id: str, body: MessageRequest):
        await _session(support, session_id)  # an unknown session is a 404 before the message is looked at
        try:
            return {"object": "support.reply", **await support.ready().respond(session_id, body.content)}
        except SessionNotFound as exc:
            raise APIError(404, str(exc), "not_found_error", "session_id", "session_not_found") from None

    @app.get("/v1/support/sessions/{session_id}")
    async def get_session(session_id: str):
        session = await _session(support, session_id)
        return {"object": "support.session", **session.to_dict(), "summary_text": session.summary_text()}

    @app.get("/support", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(page)

    return support
